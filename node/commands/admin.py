"""`maglev enable BACKEND --vip NAME` (back to serving after drain or disable) and `maglev
reload` (re-read the VIP directory now; a rejected reload changes nothing and says why)."""

from __future__ import annotations

import argparse
import json
import sys

from node.client import API_PREFIX, ApiError, Client
from node.commands.ops import _common, _out, _wrap, cmd_backend


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enable", help="enable a backend of a VIP: serve new flows again (after drain or disable)")
    p.add_argument("backend", help="backend key (address, [v6]:port or hash key)")
    p.add_argument("--vip", required=True)
    _common(p)
    p.set_defaults(func=_wrap(cmd_backend), action="enable")

    p = sub.add_parser("reload", help="re-read the VIP directory now (as SIGHUP); nothing changes if it is invalid")
    _common(p)
    p.set_defaults(func=_wrap(cmd_reload))


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    try:
        result = client.request("POST", f"{API_PREFIX}/reload", body={})
    except ApiError as exc:
        if exc.status != 400:
            raise
        # Rejected: the API answers 400 with the result; show the problems, keep serving.
        if args.json:
            print(json.dumps({"ok": False, "problems": exc.problems}, indent=2, sort_keys=True))
            return 1
        print("error: reload rejected, the node keeps its last good config:", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1

    def human(r):
        print(f"reload applied ({r['source']}): added {', '.join(r['added']) or 'none'}; "
              f"removed {', '.join(r['removed']) or 'none'}; changed {', '.join(r['changed']) or 'none'}")
    return _out(args, result, human)
