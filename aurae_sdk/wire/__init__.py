"""The wire layer: what the daemon, the SDK and the CLI must agree on.

`generated/` holds the protobuf messages and gRPC stubs of the Standard
Library (`aurae_sdk.wire.generated.pb.<proto dir>.<name>_pb2`); beside it sit
the grammars and facts both ends share: socket targets (`targets`), SPIFFE
IDs (`spiffe`), DNS names (`dns`), default paths (`paths`) and certificate
minting (`pki`).

This package imports nothing of the client (`aurae_sdk.client`, `rpc`,
`config`, ...) nor of `aurae_cli` or `auraed`: the daemon imports it, and
must never need the client side to start.
"""
