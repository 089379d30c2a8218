"""`maglev table VIPFILE [--vip NAME] [--json]`: show the Maglev table a node would build.

Operators use it to check, before applying a change, how new flows would spread over the
backends, and to compare tables across nodes: every node builds the same table from the same
file, so the digests must match. Only backends in state ``active`` take table entries here;
``drain`` and ``disabled`` backends are listed with none. (The running node also leaves out
backends that fail their health check; this command does not probe anything.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from node.config import ConfigError, VipConfig, load_vip_file
from node.maglev import build_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table",
        help="show each backend's share of a VIP's Maglev table, and the table digest",
        description="Build the Maglev table of each VIP in VIPFILE from its active backends and "
        "print, per backend, its entries, its share of the table and the share its weight asks "
        "for, plus the table digest (equal on every node with the same config). Drain and "
        "disabled backends take no entries. Exit 2 on a config error.",
    )
    p.add_argument("vipfile", type=Path, metavar="VIPFILE")
    p.add_argument("--vip", metavar="NAME", help="only this VIP")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def describe(vip: VipConfig) -> dict[str, Any]:
    """The table of one VIP as plain data (the --json output for that VIP)."""
    active = {b.key: b.weight for b in vip.backends if b.state == "active"}
    table = build_table(active, vip.table_size)
    counts = table.counts()
    expected = table.expected_shares()
    rows = []
    for b in vip.backends:
        entries = counts.get(b.key, 0)
        rows.append(
            {
                "key": b.key,
                "address": str(b.address),
                "port": b.port,
                "state": b.state,
                "weight": b.weight,
                "entries": entries,
                "share": entries / table.size,
                "expected_share": expected.get(b.key, 0.0),
            }
        )
    return {
        "name": vip.name,
        "address": str(vip.address),
        "protocol": vip.protocol,
        "port": vip.port,
        "table_size": table.size,
        "active_backends": len(table.backends),
        "digest": table.digest(),
        "backends": rows,
    }


def format_text(info: dict[str, Any]) -> str:
    head = (
        f"VIP {info['name']} ({info['protocol']} {info['address']} port {info['port']}): "
        f"table size {info['table_size']}, {info['active_backends']} active backend(s), "
        f"digest {info['digest']}"
    )
    rows = info["backends"]
    width = max([len("backend")] + [len(r["key"]) for r in rows])
    lines = [head, f"  {'backend':<{width}}  {'state':<8}  {'weight':>8}  {'entries':>8}  {'share':>8}  {'expected':>8}"]
    for r in rows:
        lines.append(
            f"  {r['key']:<{width}}  {r['state']:<8}  {r['weight']:>8g}  {r['entries']:>8}  "
            f"{r['share']:>8.3%}  {r['expected_share']:>8.3%}"
        )
    inactive = [r["key"] for r in rows if r["state"] != "active"]
    if not info["active_backends"]:
        lines.append("  no active backends: the table is empty and new flows to this VIP are dropped")
    if inactive:
        lines.append(
            f"  note: {', '.join(inactive)} take no entries (drain keeps its existing flows, "
            "disabled gets none)"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        vips = load_vip_file(args.vipfile)
    except ConfigError as exc:
        for p in exc.problems:
            print(f"error: {p}")
        return 2
    if args.vip is not None:
        chosen = [v for v in vips if v.name == args.vip]
        if not chosen:
            names = ", ".join(v.name for v in vips) or "none"
            print(f"error: {args.vipfile}: no VIP named {args.vip!r} (VIPs in this file: {names})")
            return 2
        vips = chosen
    infos = [describe(v) for v in vips]
    if args.json:
        print(json.dumps({"file": str(args.vipfile), "vips": infos}, indent=2))
    else:
        print("\n\n".join(format_text(i) for i in infos) if infos else f"{args.vipfile}: no VIPs")
    return 0
