"""What the API, the CLI and the status page show of a node: plain dicts read from the
controller's state, built here so the controller keeps only the state itself."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node import health_path
from node.decision_log import shares
from node.vip_source import source_status

if TYPE_CHECKING:
    from node.controller import Controller


def node_status(c: "Controller") -> dict[str, Any]:
    desired = c.desired
    vips = desired.vips if desired else {}
    st = c.self_test
    return {
        "node_id": c.config.node_id,
        "uptime": round(c.clock() - c.started_at, 1),
        "warmup_over": c.warmup_over,
        "node_drained": c.node_drained,
        "disable": c.disable.status(),
        "forwarder": {
            "ok": st.ok and c.forwarder_error is None,
            "mode": c.attach_mode,
            "interfaces": c.config.forwarder.interfaces,
            "last_self_test": {"ok": st.ok, "reason": st.reason, "at": st.at},
            "error": c.forwarder_error,
        },
        "bgp": c.speaker.status(),
        "health_tunnel": health_path.tunnel_status(getattr(c, "tunnel", None)),
        "vips": {
            name: {"announced": d.announce, "state": d.state, "reason": d.reason,
                   "reason_code": d.policy.code, "fallback_in_use": d.policy.use_fallback,
                   "serving": len(d.serving), "health_path": health_path.path_of(d.vip),
                   "backends": len(d.backends), "digest": d.table.digest() if d.table else None}
            for name, d in vips.items()
        },
        "last_reload": c.last_reload.__dict__ if c.last_reload else None,
        "tasks": c.supervisor.status(),
        "config_source": source_status(c),
        "recent_events": list(c.events.recent)[-20:],
    }


def vip_view(c: "Controller", name: str, counters: dict[str, Any] | None = None) -> dict[str, Any]:
    """One VIP in full: its decision, each backend's health, share and counters."""
    vip = c.vips[name]
    d = c.desired.vips.get(name) if c.desired else None
    snapshot = c.health.snapshot()
    table_shares = shares(d) if d else {}
    total_weight = sum(b.weight for b in d.backends if b.serving) if d else 0
    vip_counters = (counters or {}).get("vips", {}).get(name, {})
    # Per (VIP, backend): a backend shared by several VIPs has figures of its own in each.
    backend_counters = (counters or {}).get("vip_backends", {}).get(name, {})
    backends = []
    for b in vip.all_backends:
        bd = next((x for x in d.backends if x.key == b.key), None) if d else None
        target = c.targets.get((name, b.key))
        status = snapshot.get(target) if target is not None else None
        last = getattr(status, "last", None)
        backends.append({
            "key": b.key,
            "address": str(b.address),
            "port": vip.backend_port(b),
            "weight": b.weight,
            "configured_state": b.state,
            "state": bd.admin if bd else b.state,
            "health": bd.health.value if bd else "unknown",
            "data_state": bd.data_state if bd else None,
            "serving": bd.serving if bd else False,
            "fallback": bd.fallback if bd else b in vip.fallback_backends,
            "last_reason": getattr(last, "reason", None) if target is not None else "no health check (static)",
            "last_latency": getattr(last, "latency", None),
            "table_share": table_shares.get(b.key, 0.0),
            "expected_share": (b.weight / total_weight) if bd and bd.serving and total_weight else 0.0,
            "counters": backend_counters.get(b.key, {}),
        })
    return {
        "name": name,
        "address": str(vip.address),
        "protocol": vip.protocol,
        "port": vip.port,
        "table_size": vip.table_size,
        "health_path": health_path.path_of(vip),
        "source": str(c.vip_sources.get(name, "")),
        "announced": d.announce if d else False,
        "state": d.state if d else "withdrawn",
        "reason": d.reason if d else "not reconciled yet",
        "reason_code": d.policy.code if d else None,
        "fallback_in_use": d.policy.use_fallback if d else False,
        "digest": d.table.digest() if d and d.table else None,
        "backends": backends,
        "counters": vip_counters,
        "config": vip.model_dump(mode="json"),
    }
