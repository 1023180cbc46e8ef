"""Command line of the generator: `aurae-codegen [--check]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codegen.generate import differences, generate, write
from codegen.protoc import ProtocError
from codegen.schema import UnsupportedSchema


def _project_root() -> Path:
    # The generator works on a source checkout: proto/ and templates/ sit
    # beside the codegen package.
    return Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aurae-codegen",
        description="Generate the SDK, CLI, REPL namespace, daemon bases and docs from proto/.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the committed generated code differs from a fresh run",
    )
    parser.add_argument("--root", type=Path, default=_project_root(), help="project root")
    args = parser.parse_args(argv)

    root: Path = args.root
    try:
        generation = generate(root / "proto", root / "templates")
    except ProtocError as error:
        print(f"aurae-codegen: protoc failed:\n{error}", file=sys.stderr)
        return 2
    except UnsupportedSchema as error:
        print(f"aurae-codegen: {error}", file=sys.stderr)
        return 2

    if args.check:
        problems = differences(generation, root)
        if problems:
            for problem in problems:
                print(problem, file=sys.stderr)
            print(
                f"aurae-codegen: {len(problems)} generated file(s) out of date; "
                "run `aurae-codegen` and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"aurae-codegen: {len(generation.files)} generated files up to date")
        return 0

    changed = write(generation, root)
    for path in changed:
        print(f"wrote {path}")
    print(f"aurae-codegen: {len(generation.files)} files, {len(changed)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
