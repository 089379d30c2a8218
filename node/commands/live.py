"""Live views of a running node: `maglev top` (rates per VIP and backend, the way `ipvsadm
--rate` and `katran -s` show them), `maglev conntrack` (tracked flows, either design) and
`maglev events` (the timeline, `--follow` to keep reading). Human tables by default, --json for
scripts; `top --once` and `events` without --follow end by themselves."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from node.client import API_PREFIX, Client
from node.commands.ops import _common, _wrap, table
from node.metrics import counter_rates

CLEAR = "\x1b[H\x1b[2J"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="live rates per VIP and backend (packets, bits, new flows, conntrack hits)")
    p.add_argument("--interval", "-i", type=float, default=2.0, help="seconds between samples (default 2)")
    p.add_argument("--once", action="store_true", help="two samples INTERVAL apart, one report, exit")
    p.add_argument("--vip", help="only this VIP")
    _common(p)
    p.set_defaults(func=_wrap(cmd_top))

    p = sub.add_parser("conntrack", help="flows in the forwarder's connection-tracking map")
    p.add_argument("--vip", help="only flows of this VIP")
    p.add_argument("--limit", "-n", type=int, default=100, help="at most N flows (default 100)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_conntrack))

    p = sub.add_parser("events", help="the node's event timeline (backend up/down, announce, reload...)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events until Ctrl-C")
    p.add_argument("--interval", type=float, default=1.0, help="--follow: seconds between polls (default 1)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_events))


# ---------------------------------------------------------------------- top


def _page(client: Client, vip: str | None) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    data = client.get(f"{API_PREFIX}/page")
    vips = [v for v in data["vips"] if vip is None or v["name"] == vip]
    return time.monotonic(), vips, data


def top_rows(vips: list[dict[str, Any]], rates: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per VIP, then one per backend under it: what `top` prints (and --json gives)."""
    rows = []
    for v in vips:
        r = rates.get(v["name"], {})
        rows.append({"vip": v["name"], "backend": None, "state": v.get("state") or ("announced" if v["announced"] else "withdrawn"),
                     "share": None, "rates": {k: r.get(k) for k in ("packets", "bytes", "new_flows", "ct_hits")},
                     "counters": v.get("counters") or {}})
        for b in v["backends"]:
            br = (r.get("backends") or {}).get(b["key"], {})
            rows.append({"vip": v["name"], "backend": b["key"], "state": f"{b['state']}/{b['health']}",
                         "share": b["table_share"],
                         "rates": {k: br.get(k) for k in ("packets", "bytes", "new_flows", "ct_hits")},
                         "counters": b.get("counters") or {}})
    return rows


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def format_top(rows: list[dict[str, Any]], node: str, seconds: float) -> str:
    lines = [f"node {node}  rates over the last {seconds:.1f} s"]
    cells = []
    for r in rows:
        rate = r["rates"]
        name = r["vip"] if r["backend"] is None else f"  -> {r['backend']}"
        cells.append([name, r["state"], "" if r["share"] is None else f"{r['share']:.1%}",
                      _num(rate["packets"]), _num(None if rate["bytes"] is None else rate["bytes"] * 8),
                      _num(rate["new_flows"]), _num(rate["ct_hits"]), r["counters"].get("packets", "")])
    lines.append(table(cells, ["VIP / BACKEND", "STATE", "SHARE", "PPS", "BIT/S", "NEW FLOWS/S", "CT HITS/S",
                               "PACKETS"]))
    return "\n".join(lines)


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    if args.interval <= 0:
        print("error: --interval must be above 0 seconds", file=sys.stderr)
        return 2
    t0, before, _ = _page(client, args.vip)
    if args.vip and not before:
        print(f"error: no VIP named {args.vip!r}", file=sys.stderr)
        return 2
    live = sys.stdout.isatty() and not args.once and not args.json
    while True:
        time.sleep(args.interval)
        t1, after, data = _page(client, args.vip)
        rows = top_rows(after, counter_rates(before, after, t1 - t0))
        if args.json:  # one JSON document per sample: a stream of lines a script can read
            print(json.dumps({"node_id": data["status"]["node_id"], "seconds": round(t1 - t0, 3), "rows": rows},
                             sort_keys=True), flush=True)
        else:
            text = format_top(rows, data["status"]["node_id"], t1 - t0)
            print((CLEAR if live else "") + text + ("" if live else "\n"), flush=True)
        if args.once:
            return 0
        t0, before = t1, after


# ---------------------------------------------------------------------- conntrack


def cmd_conntrack(client: Client, args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    if args.vip:
        query["vip"] = args.vip
    data = client.get(f"{API_PREFIX}/conntrack", **query)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    rows = [[f["vip"], f["protocol"], _endpoint(f["src"], f["sport"]), _endpoint(f["dst"], f["dport"]),
             f["backend"], "-" if f["idle_seconds"] is None else f"{f['idle_seconds']:.1f}"] for f in data["flows"]]
    print(table(rows, ["VIP", "PROTO", "SOURCE", "DESTINATION", "BACKEND", "IDLE S"]))
    more = " (limit reached: --limit N for more)" if len(rows) >= data["limit"] else ""
    print(f"{len(rows)} flow(s) shown; conntrack design {data['design']!r}, capacity {data['capacity']}{more}")
    return 0


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# ---------------------------------------------------------------------- events


def format_event(e: dict[str, Any]) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e["ts"]))
    return f"{stamp} {e['level'].upper():5} {e['event']}: {e['msg']}"


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    since, printed = 0.0, set()  # events at exactly `since` already printed (ts has ms steps)
    while True:
        events = client.get(f"{API_PREFIX}/events", since=repr(since))["events"]
        for e in events:
            key = json.dumps(e, sort_keys=True)
            if key in printed:
                continue
            print(key if args.json else format_event(e), flush=True)
            if float(e["ts"]) > since:
                since, printed = float(e["ts"]), set()
            printed.add(key)
        if not args.follow:
            return 0
        time.sleep(args.interval)
