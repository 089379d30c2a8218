"""Prometheus text exposition for the node, written by hand (the format is small and stable).

Names follow Prometheus conventions: a ``maglev_`` prefix, ``_total`` on counters, base units
(seconds, bytes), labels for VIP and backend.
"""

from __future__ import annotations

from typing import Any, Iterable


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._declared: set[str] = set()

    def metric(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, Any], float]]) -> None:
        if name not in self._declared:
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")
            self._declared.add(name)
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{label_text}}} {float(value):g}" if label_text else f"{name} {float(value):g}")

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


BGP_STATES = ("idle", "connecting", "established")
COUNTER_FIELDS = {
    "packets": ("packets_total", "Packets forwarded"),
    "bytes": ("bytes_total", "Bytes forwarded (inner packet length)"),
    "new_flows": ("new_flows_total", "New flows hashed through the Maglev table"),
    "ct_hits": ("conntrack_hits_total", "Packets that matched a connection-tracking entry"),
    "ct_misses": ("conntrack_misses_total", "Packets that missed connection tracking"),
}


def render(controller: Any, counters: dict[str, Any]) -> str:
    """Everything an operator graphs or alerts on, from one controller snapshot."""
    ex = Exposition()
    c = controller
    d = c.desired
    ex.metric("maglev_node_info", "gauge", "Node identity", [({"node": c.config.node_id}, 1)])
    ex.metric("maglev_node_drained", "gauge", "1 when the operator drained the node", [({}, int(c.node_drained))])
    ex.metric("maglev_warmup_over", "gauge", "1 once warm-up is over", [({}, int(c.warmup_over))])
    fwd_ok = c.self_test.ok and c.forwarder_error is None
    ex.metric("maglev_forwarder_up", "gauge", "1 when the forwarder's last self-test passed", [({}, int(fwd_ok))])
    ex.metric("maglev_forwarder_self_tests_total", "counter", "Forwarder self-tests by result",
              [({"result": "pass" if k else "fail"}, v) for k, v in sorted(c.metrics.self_tests.items())])
    ex.metric("maglev_forwarder_sync_seconds", "gauge", "Duration of the last forwarder programming",
              [({}, c.metrics.sync_seconds)])
    ex.metric("maglev_forwarder_syncs_total", "counter", "Times the forwarder was programmed (a table or backend state changed)",
              [({}, c.metrics.syncs)])
    ex.metric("maglev_table_builds_total", "counter", "Maglev tables built (cache misses)",
              [({}, c.tables.builds)])
    ex.metric("maglev_table_build_seconds_total", "counter", "Time spent building Maglev tables",
              [({}, c.tables.build_seconds)])
    ex.metric("maglev_table_last_build_seconds", "gauge", "Duration of the last Maglev table build",
              [({}, c.tables.last_build_seconds)])
    ex.metric("maglev_config_reloads_total", "counter", "VIP config reloads by result",
              [({"result": "success" if k else "failure"}, v) for k, v in sorted(c.metrics.reloads.items())])
    last_ok = c.last_reload.ok if c.last_reload else True
    ex.metric("maglev_config_last_reload_successful", "gauge", "1 when the last reload was applied",
              [({}, int(last_ok))])

    vips = d.vips if d else {}
    ex.metric("maglev_vip_announced", "gauge", "1 when the VIP is announced to the routers",
              [({"vip": n, "address": str(v.vip.address)}, int(v.announce)) for n, v in vips.items()])
    ex.metric("maglev_vip_serving_backends", "gauge", "Backends with table entries",
              [({"vip": n}, len(v.serving)) for n, v in vips.items()])
    health_samples = []
    for n, v in vips.items():
        for b in v.backends:
            health_samples.append(({"vip": n, "backend": b.key, "health": b.health.value}, 1))
    ex.metric("maglev_backend_health", "gauge", "Backend health state (1 for the current state)", health_samples)
    ex.metric("maglev_backend_serving", "gauge", "1 when the backend has table entries",
              [({"vip": n, "backend": b.key}, int(b.serving)) for n, v in vips.items() for b in v.backends])
    ex.metric("maglev_backend_transitions_total", "counter", "Backend health transitions",
              [({"vip": vip, "backend": key, "to": to}, n) for (vip, key, to), n in sorted(c.metrics.transitions.items())])

    bgp = c.speaker.status() or {}
    sessions = bgp.get("sessions", {})
    samples = []
    for peer, info in sorted(sessions.items()):
        state = info.get("state") if isinstance(info, dict) else getattr(info, "state", "idle")
        for s in BGP_STATES:
            samples.append(({"peer": peer, "state": s}, int(state == s)))
    ex.metric("maglev_bgp_session_state", "gauge", "BGP session state per peer (1 for the current state)", samples)
    ex.metric("maglev_bgp_speaker_up", "gauge", "1 while ExaBGP is running under supervision",
              [({}, int(bool(getattr(c.speaker, "healthy", False))))])
    bfd_peers = (bgp.get("bfd") or {}).get("peers") or {}
    ex.metric("maglev_bfd_peer_up", "gauge", "1 while the BFD session with the peer is up (bgp.bfd.enabled)",
              [({"peer": p}, int(i.get("status") == "up")) for p, i in sorted(bfd_peers.items())])
    announced = c.speaker.announced()
    ex.metric("maglev_bgp_announced_routes", "gauge", "Routes currently announced", [({}, len(announced))])

    for field, (suffix, help_text) in COUNTER_FIELDS.items():
        ex.metric(f"maglev_vip_{suffix}", "counter", f"{help_text}, per VIP",
                  [({"vip": n}, vc.get(field, 0)) for n, vc in sorted(counters.get("vips", {}).items())])
    for field in ("packets", "bytes", "new_flows"):
        suffix, help_text = COUNTER_FIELDS[field]
        ex.metric(f"maglev_backend_{suffix}", "counter", f"{help_text}, per backend",
                  [({"backend": k}, bc.get(field, 0)) for k, bc in sorted(counters.get("backends", {}).items())])
    ex.metric("maglev_forwarder_drops_total", "counter", "Packets dropped by the forwarder, by reason",
              [({"reason": r}, n) for r, n in sorted(counters.get("drops", {}).items())])
    return ex.render()
