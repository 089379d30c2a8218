"""The `maglev` command.

Each subcommand lives in its own module under ``node.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``. Discovery keeps
this file free of merge traffic: a new command is a new module.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from node import __version__
from node import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maglev", description="Maglev-style L4 load balancer: node, operator and lab commands"
    )
    parser.add_argument("--version", action="version", version=f"maglev-lb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"node.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
