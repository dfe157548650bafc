"""The ``unifieddelta`` command. Each sub-command is a small function that parses, calls the module, reports.

Errors of the project (``UnifiedDeltaError``) are printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UnifiedDeltaError


def _book(args: argparse.Namespace) -> int:
    from .pipeline import build_book

    index = build_book(profile=args.profile, only=args.only, root=args.root, force=args.force)
    print(f"book built: {index}")
    return 0


def _add_book(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("book", help="execute the profile's notebooks (cached) and build the Jupyter Book")
    p.add_argument("--profile", default="tiny", help="a shipped profile name (tiny, paper) or a YAML file")
    p.add_argument("--only", nargs="+", metavar="NOTEBOOK", help="execute only these notebooks of the profile")
    p.add_argument("--root", default=None, help="the book's root folder (default: found from the current folder)")
    p.add_argument("--force", action="store_true", help="execute notebooks even when the cache has them")
    p.set_defaults(func=_book)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unifieddelta", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # One registration line per sub-command; the functions above hold the behaviour.
    _add_book(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UnifiedDeltaError as e:
        print(f"unifieddelta {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unifieddelta {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
