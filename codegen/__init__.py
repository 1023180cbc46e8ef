"""aurae-codegen: renders the SDK, CLI, REPL namespace, daemon bases and API
reference from the .proto files in proto/.

Three stages, each testable alone: `protoc` (descriptors and _pb2 modules),
`schema` (frozen dataclasses templates read), `render` (Jinja2 templates).
"""
