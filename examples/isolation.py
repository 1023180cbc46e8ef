#!/usr/bin/env aurae-py
"""An isolated cell: its own pid, mount, ipc, uts and network namespaces.

Inside it, /proc shows only the cell's processes, the hostname is the cell's
name, and the only network device is its own loopback — which the cell's
executables share with each other and with nobody else.
"""

import time

from aurae_sdk.script import client, observe

name = "sandbox"
client.cells.allocate(cell={"name": name, "isolate_process": True, "isolate_network": True})


def run(executable: str, command: str) -> str:
    started = client.cells.start(cell_name=name, executable={"name": executable, "command": command})
    lines = [r.item.line for r in client.observe.get_sub_process_stream(
        process_id=started.host_pid, channel_type=observe.LOG_CHANNEL_TYPE_STDOUT)]
    client.cells.stop(cell_name=name, executable_name=executable)
    return "\n".join(lines)


try:
    print("hostname:", run("hostname", "hostname"))
    print("processes:", run("ps", "ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '"))
    print("devices:", run("links", "ip -brief link"))

    # Two executables of the cell meet on the cell's own 127.0.0.1.
    server = client.cells.start(cell_name=name, executable={
        "name": "server",
        "command": "python3 -c \"import socket; s = socket.create_server(('127.0.0.1', 8000)); "
                   "c, _ = s.accept(); c.sendall(b'hello over the cell loopback')\""})
    print(f"server: pid {server.pid} in the cell, {server.host_pid} on the host")
    time.sleep(0.5)
    print("client got:", run("client", "python3 -c \"import socket; "
                             "print(socket.create_connection(('127.0.0.1', 8000)).recv(100).decode())\""))
finally:
    client.cells.free(cell_name=name)
