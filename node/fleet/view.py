"""The fleet view: do the live nodes agree, and if not, why. Pure: records in, a view out.

Maglev's promise (any node sends a flow to the same backend) holds for a VIP only while every
node has the same table for it. Two nodes build the same table from the same config revision
and the same set of serving backends, so when digests differ the cause is one of:
- a different config revision (a node is behind, or refused a revision);
- a different health view of a backend (one node's probes fail where the others' pass);
- an operator override (drain/disable) made on one node only;
- the VIP missing on a node.
Each differing VIP lists every cause found, naming the nodes and the backend.
"""

from __future__ import annotations

from typing import Any


def compare(records: list[dict[str, Any]]) -> dict[str, Any]:
    nodes = sorted(records, key=lambda r: r.get("node_id", ""))
    names = sorted({v for r in nodes for v in r.get("vips", {})})
    vips = {name: _compare_vip(name, nodes) for name in names}
    return {
        "nodes": [
            {"node_id": r.get("node_id"), "revision": r.get("revision"), "stale": bool(r.get("stale")),
             "drained": bool(r.get("drained")), "api": r.get("api"), "vips": len(r.get("vips", {})),
             "announced": sorted(n for n, v in r.get("vips", {}).items() if v.get("announced"))}
            for r in nodes
        ],
        "revisions": sorted({r.get("revision") for r in nodes if r.get("revision") is not None}),
        "vips": vips,
        "differing": [n for n, v in vips.items() if not v["agree"]],
    }


def _compare_vip(name: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    digests = {r["node_id"]: r.get("vips", {}).get(name, {}).get("digest") for r in nodes}
    present = [r for r in nodes if name in r.get("vips", {})]
    agree = len(set(digests.values())) <= 1
    out: dict[str, Any] = {"agree": agree, "digests": digests, "reasons": []}
    if not agree:
        out["reasons"] = _reasons(name, nodes, present)
    return out


def _reasons(name: str, nodes: list[dict[str, Any]], present: list[dict[str, Any]]) -> list[str]:
    reasons = []
    missing = [r["node_id"] for r in nodes if r not in present]
    if missing:
        reasons.append(f"not configured on {', '.join(missing)}")
    revisions = {r["node_id"]: r.get("revision") for r in nodes}
    if len(set(revisions.values())) > 1:
        reasons.append("different revision: " + ", ".join(f"{n} at {v}" for n, v in revisions.items()))
    backends = sorted({k for r in present for k in r["vips"][name].get("backends", {})})
    for key in backends:
        seen = {r["node_id"]: r["vips"][name].get("backends", {}).get(key, {}) for r in present}
        health = {n: b.get("health", "absent") for n, b in seen.items()}
        if len(set(health.values())) > 1:
            reasons.append(f"different health view of backend {key}: " + _by_value(health))
        overrides = {n: b.get("override") for n, b in seen.items() if b.get("override")}
        if overrides:
            reasons.append(f"operator override of backend {key} on "
                           + ", ".join(f"{n} ({state})" for n, state in overrides.items()))
    if not reasons:
        reasons.append("same revision, health and overrides but different tables: "
                       "compare `maglev table` on these nodes")
    return reasons


def _by_value(values: dict[str, str]) -> str:
    groups: dict[str, list[str]] = {}
    for node, value in values.items():
        groups.setdefault(value, []).append(node)
    return "; ".join(f"{value} on {', '.join(nodes)}" for value, nodes in sorted(groups.items()))


def render(fleet: dict[str, Any]) -> str:
    """The human form of `maglev fleet status`."""
    lines = [f"{'NODE':<16} {'REVISION':>8} {'STATE':<8} {'VIPS':>4}  ANNOUNCED"]
    for n in fleet["nodes"]:
        state = "stale" if n["stale"] else ("drained" if n["drained"] else "ok")
        lines.append(f"{n['node_id']:<16} {n['revision']!s:>8} {state:<8} {n['vips']:>4}  "
                     + (", ".join(n["announced"]) or "-"))
    if not fleet["nodes"]:
        lines.append("(no live node in the registry)")
    lines.append("")
    if not fleet["differing"]:
        lines.append(f"all {len(fleet['vips'])} VIP(s) have the same table digest on every live node")
    for name in fleet["differing"]:
        v = fleet["vips"][name]
        lines.append(f"VIP {name}: DIGESTS DIFFER: "
                     + ", ".join(f"{n}={d or 'none'}" for n, d in v["digests"].items()))
        lines.extend(f"  - {r}" for r in v["reasons"])
    return "\n".join(lines)
