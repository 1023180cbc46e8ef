#!/usr/bin/env aurae-py
"""Start a process and follow its stdout and stderr as they are written."""

from aurae_sdk.script import client

name = "output-demo"
client.cells.allocate(cell={"name": name})
try:
    started = client.cells.start(cell_name=name, executable={
        "name": "talker",
        "command": "for i in 1 2 3; do echo \"line $i\"; echo \"warning $i\" >&2; sleep 0.2; done",
    })
    # The stream replays what was written before it began, then follows live,
    # and ends when the process has exited and everything has been sent.
    for response in client.observe.get_sub_process_stream(process_id=started.pid):
        print(f"{response.item.channel:>16} | {response.item.line}")
    status = client.cells.wait(cell_name=name, executable_name="talker").status
    print(f"talker exited with {status.exit_code}")
finally:
    client.cells.free(cell_name=name)
