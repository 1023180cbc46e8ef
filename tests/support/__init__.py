"""What tests and benchmarks share: a throwaway daemon (`daemon`).

It lives here, not in `auraed`, because it needs both sides: the CLI's PKI
tooling and the SDK client. The daemon package must never import them.
"""
