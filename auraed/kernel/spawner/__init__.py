"""The spawner: the fork server that is the parent of every workload, in parts.

protocol  the typed messages both sides exchange (and the protocol version)
server    the fork server's loop (`python -m auraed.kernel.spawner`), standard library only
child     the steps a forked child runs between fork and exec
direct    starting a workload with no Python in its child (fork_exec, a vfork)
client    the daemon side: `Spawner` runs the fork server and talks to it

Nothing is imported here: the fork server starts by importing this package and must start fast.
"""
