"""Entry point of `aurae-py`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from aurae_cli.app import cli

    cli.main(args=sys.argv[1:] if argv is None else argv, prog_name="aurae-py")


if __name__ == "__main__":
    main()
