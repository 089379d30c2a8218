"""`maglev completion bash|zsh|fish`: the shell code for tab completion (argcomplete), e.g.
``eval "$(maglev completion bash)"`` in ~/.bashrc. Subcommands and options complete from the
parser; --vip completes VIP names from the node's API when it answers."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "fish", "tcsh", "powershell")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("completion", help="print shell code for tab completion: eval \"$(maglev completion bash)\"")
    p.add_argument("shell", choices=SHELLS, nargs="?", default="bash")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import argcomplete

    print(argcomplete.shellcode(["maglev"], shell=args.shell), end="")
    return 0


def vip_names(prefix: str, parsed_args: argparse.Namespace, **_: object) -> list[str]:
    """Completer for --vip: the node's VIP names (quickly, or nothing)."""
    from node.client import API_PREFIX, Client

    try:
        client = Client.from_args(getattr(parsed_args, "api", None), getattr(parsed_args, "token_file", None),
                                  getattr(parsed_args, "config", None))
        client.timeout = 0.5
        names = sorted(client.get(f"{API_PREFIX}/status")["vips"])
    except Exception:  # completion must never fail loudly
        return []
    return [n for n in names if n.startswith(prefix)]
