"""auraed: the Aurae node runtime daemon.

Layers, outermost first: `server` wires gRPC, mTLS and the services;
`services/` translate API messages to the runtime and its errors to gRPC
status codes; `runtime/` owns cells and executables; `kernel/` drives
cgroups, processes and namespaces and knows nothing of gRPC.
"""

__version__ = "0.1.0"
