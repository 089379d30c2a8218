"""The `maglev` command.

Each subcommand lives in its own module under ``node.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``. Discovery keeps
this file free of merge traffic: a new command is a new module.

Output is safe to pipe: a reader that goes away (``maglev events | head``) ends the command
quietly, as it does for other Unix tools. Tab completion comes from argcomplete
(``maglev completion bash``).
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    _vip_completion(sub)
    return parser


def _vip_completion(sub: argparse._SubParsersAction) -> None:
    """--vip of every subcommand completes VIP names from the running node."""
    from node.commands.completion import vip_names

    for p in sub.choices.values():
        for action in p._actions:
            if "--vip" in action.option_strings:
                action.completer = vip_names  # type: ignore[attr-defined]


def _autocomplete(parser: argparse.ArgumentParser) -> None:
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(parser)  # answers the shell and exits


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _autocomplete(parser)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (head, less quit). Point stdout at /dev/null so the interpreter's
        # final flush does not raise again, and exit as a pipe-killed tool would (128 + SIGPIPE).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
