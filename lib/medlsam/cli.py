"""The `medlsam` console command: dispatches to one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under medlsam.commands (dashes become underscores); each module defines
# add_parser(subparsers) which registers the parser and sets `func`.
SUBCOMMANDS = ("generate", "localize", "segment", "eval", "bench", "bench-localize", "train", "templates", "run")


class UserError(Exception):
    """A problem with the user's input: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlsam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"medlsam.commands.{name.replace('-', '_')}")
        except ModuleNotFoundError as exc:
            if exc.name != f"medlsam.commands.{name.replace('-', '_')}":
                raise
            continue  # not implemented yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"medlsam {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
