"""The aurae-py command line: the `aurae-py` CLI and its subcommands."""
