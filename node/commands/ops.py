"""Operator commands that talk to a running node's API: status, vips, drain/undrain/disable,
node-drain/node-undrain, trace. Human tables by default, --json for scripts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from node.client import API_PREFIX, ApiError, Client, quote


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", help="node API base URL (default: from --config, $MAGLEV_API, or http://127.0.0.1:9180)")
    p.add_argument("--token-file", type=Path, help="bearer token file (default: from --config or $MAGLEV_TOKEN_FILE)")
    p.add_argument("--config", "-c", type=Path, help="the node file, to find the API address and token")
    p.add_argument("--json", action="store_true", help="print JSON")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="node status: forwarder, BGP sessions, VIP summary")
    _common(p)
    p.set_defaults(func=_wrap(cmd_status))

    p = sub.add_parser("vips", help="VIPs with their backends, health, shares and counters")
    p.add_argument("name", nargs="?")
    _common(p)
    p.set_defaults(func=_wrap(cmd_vips))

    for action, text in (("drain", "keep existing flows, take no new ones"),
                         ("undrain", "serve new flows again"),
                         ("disable", "take the backend out completely")):
        p = sub.add_parser(action, help=f"{action} a backend of a VIP: {text}")
        p.add_argument("backend", help="backend key (address, [v6]:port or hash key)")
        p.add_argument("--vip", required=True)
        _common(p)
        p.set_defaults(func=_wrap(cmd_backend), action=action)

    for action, text in (("node-drain", "withdraw every VIP, keep forwarding existing flows"),
                         ("node-undrain", "announce the VIPs again")):
        p = sub.add_parser(action, help=text)
        _common(p)
        p.set_defaults(func=_wrap(cmd_node), action=action.split("-")[1])

    p = sub.add_parser("trace", help="which backend a flow from SRC_IP:SRC_PORT goes to")
    p.add_argument("source", metavar="SRC_IP:SRC_PORT")
    p.add_argument("--vip", required=True)
    p.add_argument("--dst-port", type=int, help="destination port (needed for 'all ports' VIPs)")
    _common(p)
    p.set_defaults(func=_wrap(cmd_trace))


def _wrap(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            client = Client.from_args(args.api, args.token_file, args.config)
            return fn(client, args)
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            for p in exc.problems:
                print(f"  {p}", file=sys.stderr)
            return 1 if exc.status in (0, 500) else 2
    return run


def _out(args: argparse.Namespace, data: Any, human) -> int:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(data)
    return 0


def table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_status(client: Client, args) -> int:
    data = client.get(f"{API_PREFIX}/status")

    def human(s):
        f = s["forwarder"]
        print(f"node {s['node_id']}  up {s['uptime']} s  warm-up {'over' if s['warmup_over'] else 'in progress'}"
              f"{'  DRAINED' if s['node_drained'] else ''}")
        d = s.get("disable") or {}
        if d.get("active"):
            print(f"DISABLED by {d['path']}: every VIP {'de-preferred' if d['action'] == 'deprefer' else 'withdrawn'} "
                  "(remove the file to announce again)")
        elif d.get("error"):
            print(f"disable file: {d['error']}")
        print(f"forwarder: {'OK' if f['ok'] else 'FAILING'} ({f.get('mode')}) on {', '.join(f['interfaces'])}: "
              f"{f['error'] or f['last_self_test']['reason']}")
        t = s.get("health_tunnel")
        if t:  # only once a tunnel check made the node set it up
            print(f"health tunnel: {'OK' if t.get('ok') else 'FAILING'}" + (
                f" ({t.get('targets')} backend(s) via {t.get('device')})" if t.get("ok") else f": {t.get('error')}"))
        src = s.get("config_source") or {}
        if src.get("type") == "etcd":  # a fleet node: which revision it serves, and whether etcd answers
            print(f"config: etcd {src['endpoint']} {src['prefix']}  revision {src['revision']}"
                  + (f"  STALE for {src['stale_for']} s ({src['stale_reason']}): serving the last good config"
                     if src["stale"] else "")
                  + ("  (from the local cache)" if src.get("served_from_cache") else ""))
            rejected = src.get("rejected")
            if rejected:
                print(f"config: etcd revision {rejected['revision']} REFUSED by this node: "
                      + "; ".join(rejected.get("problems") or []) + " (fix it with `maglev fleet apply`)")
        sessions = (s.get("bgp") or {}).get("sessions", {})
        bfd = (s.get("bgp") or {}).get("bfd") or {}
        if bfd.get("enabled"):  # bgp.bfd: each peer's BFD session next to its BGP session
            peers = bfd.get("peers") or {}
            rows = [[peer, i.get("state"), (peers.get(peer) or {}).get("status", "-"), i.get("last_error") or ""]
                    for peer, i in sorted(sessions.items())]
            print(table(rows, ["BGP PEER", "STATE", "BFD", "LAST ERROR"]) if rows else "BGP: no sessions")
        else:
            rows = [[peer, i.get("state"), i.get("last_error") or ""] for peer, i in sorted(sessions.items())]
            print(table(rows, ["BGP PEER", "STATE", "LAST ERROR"]) if rows else "BGP: no sessions")
        gr = (s.get("bgp") or {}).get("graceful_restart") or {}
        if gr.get("enabled"):  # bgp.graceful_restart: a router may hold stale routes until End-of-RIB
            owed = gr.get("end_of_rib_owed") or []
            print(f"graceful restart: on (restart time {gr.get('restart_time')} s); End-of-RIB "
                  + (f"owed to {', '.join(owed)} (routers keep this node's earlier routes until then)" if owed
                     else "sent to every session that is up"))
            if gr.get("negotiated_with"):
                print(f"graceful restart: negotiated with {', '.join(gr['negotiated_with'])}")
            if gr.get("not_negotiated_with"):  # that router does not help: a restart withdraws there
                print(f"graceful restart: NOT negotiated with {', '.join(gr['not_negotiated_with'])} (the router's "
                      "OPEN does not offer it: a restart of this node withdraws its routes there)")
        rows = [[n, _state(v), f"{v['serving']}/{v['backends']}", v["digest"], v["reason"]]
                for n, v in sorted(s["vips"].items())]
        print(table(rows, ["VIP", "ROUTE", "SERVING", "DIGEST", "WHY"]))
        r = s.get("last_reload")
        if r and not r["ok"]:
            print("last reload FAILED: " + "; ".join(r["problems"]))
        for w in (r or {}).get("warnings") or []:
            print(f"config warning: {w}")
    return _out(args, data, human)


def _state(v: dict[str, Any]) -> str:
    """announced / depreferred / withdrawn, '+fallback' while the fallback pool serves."""
    state = v.get("state") or ("announced" if v["announced"] else "withdrawn")
    return state + ("+fallback" if v.get("fallback_in_use") else "")


def _vip_human(v: dict[str, Any]) -> None:
    print(f"VIP {v['name']}  {v['protocol']} {v['address']} port {v['port']}  table {v['table_size']} "
          f"digest {v['digest']}  {_state(v).upper()}: {v['reason']}")
    if v.get("health_path"):
        print(f"health checks: {v['health_path']}"
              + (" (to the VIP, GRE to each backend)" if v["health_path"] == "tunnel" else ""))
    rows = []
    for b in v["backends"]:
        c = b.get("counters") or {}
        rows.append([b["key"] + (" (fallback)" if b.get("fallback") else ""), b["state"], b["health"], b["weight"], f"{b['table_share']:.1%}",
                     f"{b['expected_share']:.1%}", c.get("packets", ""), c.get("new_flows", ""),
                     b.get("last_reason") or ""])
    print(table(rows, ["BACKEND", "STATE", "HEALTH", "WEIGHT", "SHARE", "EXPECTED", "PACKETS", "NEW FLOWS", "LAST CHECK"]))


def cmd_vips(client: Client, args) -> int:
    if args.name:
        data = client.get(f"{API_PREFIX}/vips/{quote(args.name)}")
        return _out(args, data, _vip_human)
    data = client.get(f"{API_PREFIX}/vips")

    def human(d):
        for i, v in enumerate(d["vips"]):
            if i:
                print()
            _vip_human(v)
    return _out(args, data, human)


def cmd_backend(client: Client, args) -> int:
    data = client.post(f"{API_PREFIX}/vips/{quote(args.vip)}/backends/{quote(args.backend)}/{args.action}")
    return _out(args, data, _vip_human)


def cmd_node(client: Client, args) -> int:
    data = client.post(f"{API_PREFIX}/node/{args.action}")
    return _out(args, data, lambda s: print(f"node {s['node_id']}: {'drained' if s['node_drained'] else 'undrained'}"))


def cmd_trace(client: Client, args) -> int:
    query = {"src": args.source}
    if args.dst_port:
        query["dst_port"] = str(args.dst_port)
    data = client.get(f"{API_PREFIX}/vips/{quote(args.vip)}/trace", **query)

    def human(t):
        print(f"{t['flow']} -> backend {t['backend']}  (hash {t['hash']:#010x}, entry {t['index']} of "
              f"{t['table_size']}, table digest {t['digest']})")
        if t.get("live_backend"):
            print(f"live kernel table entry {t['index']}: {t['live_backend']}")
        if t.get("note"):
            print(t["note"])
    return _out(args, data, human)
