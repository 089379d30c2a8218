"""The node's Prometheus metrics, exposed through ``prometheus_client``.

Two kinds of figures:

- **recorded as they happen** (``NodeMetrics``): reloads, health transitions, self-tests, and
  histograms of reconcile, forwarder-sync and probe durations. The controller and the health
  monitor feed them; prometheus_client's own Counter/Histogram objects keep them thread-safe.
- **read at scrape time** from a ``Snapshot`` of the controller: VIP decisions, backend health,
  table shares and digests, BGP/BFD sessions, the forwarder's counters.

A scrape takes the snapshot on the event loop (only references and small copies: the decision
objects are never mutated once made) and renders it in a worker thread, so a big pool does not
stall health checks or BGP while Prometheus reads. Names follow Prometheus conventions: a
``maglev_`` prefix, ``_total`` on counters, base units, labels for VIP and backend.
"""

from __future__ import annotations

import gc
import gzip
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.process_collector import ProcessCollector

BGP_STATES = ("idle", "connecting", "established")
BFD_STATES = ("up", "down", "init", "unknown")
STAT_HELP = {
    "packets": ("packets", "Packets forwarded"),
    "bytes": ("bytes", "Bytes forwarded (inner packet length)"),
    "new_flows": ("new_flows", "New flows hashed through the Maglev table (conntrack inserts)"),
    "ct_hits": ("conntrack_hits", "Packets steered by a connection-tracking entry"),
    "ct_misses": ("conntrack_misses", "Packets that missed connection tracking"),
}
# Durations of a reconcile or a forwarder sync: sub-millisecond with a few VIPs, seconds at
# tens of thousands of backends.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
PROBE_SERIES_KEPT = 200_000  # targets whose metric children on_probe keeps at hand
PROBE_REASONS_KEPT = 16  # (verdict, reason) pairs kept per target
CONNTRACK_RECOUNT = 10.0  # seconds: counting a full LRU conntrack walks every key


class NodeMetrics:
    """Figures recorded when things happen; the snapshot covers the rest."""

    def __init__(self) -> None:
        self.reloads: dict[bool, int] = {}
        self.transitions: dict[tuple[str, str, str], int] = {}
        self.self_tests: dict[bool, int] = {}
        self.syncs = 0
        self.sync_seconds = 0.0
        self.self_test_glitches = 0  # failed once, passed on the fresh run: not acted on
        self.reconcile_duration = Histogram(
            "maglev_reconcile_duration_seconds", "Time one reconcile took (decide, program, announce)",
            buckets=DURATION_BUCKETS, registry=None)
        self.sync_duration = Histogram(
            "maglev_forwarder_sync_duration_seconds", "Time programming the forwarder's maps took",
            buckets=DURATION_BUCKETS, registry=None)
        self.probe_duration = Histogram(
            "maglev_probe_duration_seconds", "Health probe latency, from start to verdict",
            ["backend", "check"], buckets=PROBE_BUCKETS, registry=None)
        self.probe_results = Counter(
            "maglev_probe_results", "Health probe verdicts by result and reason",
            ["backend", "check", "result", "reason"], registry=None)
        # target -> (its duration child, (verdict, reason) -> its results child, its labels)
        self._probe_series: dict[Any, tuple[Any, dict[tuple[str, str], Any], tuple[str, str]]] = {}

    def observe_sync(self, seconds: float) -> None:
        self.syncs += 1
        self.sync_seconds = seconds
        self.sync_duration.observe(seconds)

    def on_probe(self, target: Any, scheduled: float, started: float, result: Any) -> None:
        """HealthMonitor's probe hook: one histogram sample and one verdict per probe.

        It runs for every probe, thousands a second, so a target's series are looked up once
        and kept (formatting its labels and prometheus_client's ``labels()`` lookups were a
        sixth of a TCP probe's CPU); a probe then costs one observe and one increment."""
        series = self._probe_series.get(target)
        if series is None:
            series = self._new_probe_series(target)
        duration, results, labels = series
        duration.observe(max(0.0, float(result.latency)))
        verdict = "inconclusive" if result.inconclusive else ("ok" if result.ok else "fail")
        counter = results.get((verdict, result.reason))
        if counter is None:
            if len(results) >= PROBE_REASONS_KEPT:
                results.clear()  # reasons with variable detail: look them up again, not grow
            counter = results[(verdict, result.reason)] = self.probe_results.labels(
                *labels, verdict, reason_class(result.reason))
        counter.inc()

    def _new_probe_series(self, target: Any) -> tuple[Any, dict[tuple[str, str], Any], tuple[str, str]]:
        if len(self._probe_series) >= PROBE_SERIES_KEPT:
            self._probe_series.clear()  # targets come and go with reloads: start over, not grow
        backend = f"{target.address}:{target.probe_port}" if target.probe_port else str(target.address)
        if getattr(target, "tunnel", False):  # one series per VIP probed through the tunnel
            vip = f"[{target.vip}]" if target.vip.version == 6 else str(target.vip)
            backend = f"{target.address} via {vip}:{target.probe_port}"
        labels = (backend, target.check.type)
        series = (self.probe_duration.labels(*labels), {}, labels)
        self._probe_series[target] = series
        return series

    def collectors(self) -> list[Any]:
        return [self.reconcile_duration, self.sync_duration, self.probe_duration, self.probe_results]


def reason_class(reason: str) -> str:
    """A probe reason without its variable detail, so the label stays bounded: "exit 1: disk
    full" -> "exit 1", "connection failed: [Errno 111] ..." -> "connection failed"."""
    head = str(reason).split(":", 1)[0].strip()
    return re.sub(r"\s+", " ", head)[:48] or "unknown"


@dataclass
class Snapshot:
    """What one scrape reads, taken on the event loop."""

    node_id: str
    drained: bool
    warmup_over: bool
    disabled: bool
    forwarder_ok: bool
    desired: Any
    self_tests: dict[bool, int]
    reloads: dict[bool, int]
    last_reload_ok: bool
    transitions: dict[tuple[str, str, str], int]
    syncs: int
    sync_seconds: float
    table_builds: int
    table_build_seconds: float
    table_last_build_seconds: float
    bgp: dict[str, Any]
    announced: set[str]
    speaker_up: bool
    session_transitions: dict[tuple[str, str], int]
    bfd_transitions: dict[tuple[str, str], int]
    counters: dict[str, Any] = field(default_factory=dict)
    conntrack: tuple[int, int] | None = None  # (in use, capacity)
    conntrack_mode: str = ""
    self_test_glitches: int = 0
    task_restarts: dict[str, int] = field(default_factory=dict)
    api: dict[str, int] | None = None  # the API's connection guard (node.api_server), when serving
    tunnel: dict[str, Any] | None = None  # the tunnel for health checks (node.health_path), if any
    # config_source etcd (node/fleet/): (name, type, help, [(labels, value)]) for revision,
    # staleness and fleet agreement.
    source: list[tuple[str, str, str, list]] = field(default_factory=list)


def snapshot(c: Any, counters: dict[str, Any], conntrack: tuple[int, int] | None = None) -> Snapshot:
    speaker = c.speaker
    bfd = getattr(speaker, "bfd", None)
    return Snapshot(
        node_id=c.config.node_id,
        drained=c.node_drained,
        warmup_over=c.warmup_over,
        disabled=bool(getattr(getattr(c, "disable", None), "state", None) and c.disable.state.active),
        forwarder_ok=c.self_test.ok and c.forwarder_error is None,
        desired=c.desired,
        self_tests=dict(c.metrics.self_tests),
        reloads=dict(c.metrics.reloads),
        last_reload_ok=c.last_reload.ok if c.last_reload else True,
        transitions=dict(c.metrics.transitions),
        syncs=c.metrics.syncs,
        sync_seconds=c.metrics.sync_seconds,
        table_builds=c.tables.builds,
        table_build_seconds=c.tables.build_seconds,
        table_last_build_seconds=c.tables.last_build_seconds,
        bgp=speaker.status() or {},
        announced=set(speaker.announced()),
        speaker_up=bool(getattr(speaker, "healthy", False)),
        session_transitions=dict(getattr(speaker, "session_transitions", {}) or {}),
        bfd_transitions=dict(getattr(bfd, "session_transitions", {}) or {}) if bfd is not None else {},
        counters=counters,
        conntrack=conntrack,
        conntrack_mode=str(getattr(c.config.forwarder, "conntrack", "")),
        self_test_glitches=getattr(c.metrics, "self_test_glitches", 0),
        task_restarts=c.supervisor.restarts() if hasattr(c, "supervisor") else {},
        tunnel=_tunnel_status(c),
        source=c.vip_source.metrics() if getattr(c, "vip_source", None) is not None else [],
    )


def _tunnel_status(c: Any) -> dict[str, Any] | None:
    from node.health_path import tunnel_status

    return tunnel_status(getattr(c, "tunnel", None))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


class SnapshotCollector:
    """A prometheus_client collector over one Snapshot."""

    def __init__(self, snap: Snapshot) -> None:
        self.s = snap

    def collect(self) -> Iterator[Any]:
        yield from self._node()
        yield from self._vips()
        yield from self._bgp()
        yield from self._forwarder_counters()
        yield from self._api()
        yield from self._source()

    def _source(self) -> Iterator[Any]:
        for name, kind, doc, samples in self.s.source:
            labels = sorted({k for lbl, _ in samples for k in lbl})
            family = _counter(name.removesuffix("_total"), doc, labels) if kind == "counter" else _gauge(name, doc, labels)
            for lbl, value in samples:
                family.add_metric([str(lbl.get(k, "")) for k in labels], value)
            yield family

    def _node(self) -> Iterator[Any]:
        s = self.s
        info = InfoMetricFamily("maglev_node", "Node identity")
        info.add_metric([], {"node": s.node_id})
        yield info
        for name, doc, value in (
            ("maglev_node_drained", "1 when the operator drained the node", s.drained),
            ("maglev_node_disabled", "1 while the node's disable file exists (every VIP de-preferred or withdrawn)",
             s.disabled),
            ("maglev_warmup_over", "1 once warm-up is over", s.warmup_over),
            ("maglev_forwarder_up", "1 when the forwarder's last self-test passed", s.forwarder_ok),
            ("maglev_config_last_reload_successful", "1 when the last reload was applied", s.last_reload_ok),
            ("maglev_forwarder_sync_seconds", "Duration of the last forwarder programming", s.sync_seconds),
            ("maglev_table_last_build_seconds", "Duration of the last Maglev table build", s.table_last_build_seconds),
        ):
            g = _gauge(name, doc)
            g.add_metric([], float(value))
            yield g
        c = _counter("maglev_forwarder_self_tests", "Forwarder self-tests by result", ["result"])
        for ok in (True, False):
            c.add_metric(["pass" if ok else "fail"], s.self_tests.get(ok, 0))
        yield c
        c = _counter("maglev_forwarder_self_test_glitches",
                     "Self-tests that failed once and passed on a fresh run (reported, not acted on)")
        c.add_metric([], s.self_test_glitches)
        yield c
        c = _counter("maglev_task_restarts",
                     "Background tasks restarted after they crashed or ended unexpectedly, per task", ["task"])
        for name, n in sorted(s.task_restarts.items()):
            c.add_metric([name], n)
        yield c
        c = _counter("maglev_config_reloads", "VIP config reloads by result", ["result"])
        for ok in (True, False):
            c.add_metric(["success" if ok else "failure"], s.reloads.get(ok, 0))
        yield c
        for name, doc, value in (
            ("maglev_forwarder_syncs", "Times the forwarder was programmed (a table or backend state changed)", s.syncs),
            ("maglev_table_builds", "Maglev tables built (cache misses)", s.table_builds),
            ("maglev_table_build_seconds", "Time spent building Maglev tables", s.table_build_seconds),
        ):
            c = _counter(name, doc)
            c.add_metric([], value)
            yield c
        if s.conntrack is not None:
            used, capacity = s.conntrack
            g = _gauge("maglev_conntrack_entries", "Tracked flows in the conntrack map", ["design"])
            g.add_metric([s.conntrack_mode], used)
            yield g
            g = _gauge("maglev_conntrack_capacity", "Entries the conntrack map can hold", ["design"])
            g.add_metric([s.conntrack_mode], capacity)
            yield g

    def _api(self) -> Iterator[Any]:
        a = self.s.api
        if a is None:
            return
        for name, doc, value in (
            ("maglev_api_connections", "Open API connections", a["open"]),
            ("maglev_api_connection_limit", "API connections allowed (the rest of the file handles is kept "
             "for probes, self-tests and BGP)", a["limit"]),
        ):
            g = _gauge(name, doc)
            g.add_metric([], value)
            yield g
        for name, doc, value in (
            ("maglev_api_connection_limit_reached", "Times the API stopped accepting at its connection limit "
             "(new ones wait in the listen queue)", a["at_limit"]),
            ("maglev_api_accept_errors", "API accepts that failed (e.g. out of file handles)", a["accept_errors"]),
            ("maglev_api_connections_timed_out", "API connections closed for a slow request head or idling",
             a["timed_out"]),
        ):
            c = _counter(name, doc)
            c.add_metric([], value)
            yield c

    def _vips(self) -> Iterator[Any]:
        s = self.s
        vips = s.desired.vips if s.desired is not None else {}
        announced = _gauge("maglev_vip_announced", "1 when this node decided to announce the VIP", ["vip", "address"])
        confirmed = _gauge("maglev_vip_route_confirmed",
                           "1 when ExaBGP acknowledged the VIP's route (compare maglev_vip_announced)", ["vip", "address"])
        state = _gauge("maglev_vip_announce_state", "1 for the VIP's current announce state "
                       "(announced, depreferred, withdrawn) and the short reason for it", ["vip", "state", "reason"])
        fallback = _gauge("maglev_vip_fallback_in_use", "1 while the VIP's fallback pool serves it", ["vip"])
        serving = _gauge("maglev_vip_serving_backends", "Backends with table entries", ["vip"])
        digest = InfoMetricFamily("maglev_vip_table", "The VIP's Maglev table digest (same config: same digest on every node)",
                                  labels=["vip"])
        health = _gauge("maglev_backend_health", "Backend health state (1 for the current state)", ["vip", "backend", "health"])
        bserving = _gauge("maglev_backend_serving", "1 when the backend has table entries", ["vip", "backend"])
        share = _gauge("maglev_backend_table_share", "Fraction of the VIP's table entries that go to the backend", ["vip", "backend"])
        expected = _gauge("maglev_backend_expected_share", "The backend's weight over the serving backends' weights", ["vip", "backend"])
        path = _gauge("maglev_vip_health_check_path",
                      "1 for the path the VIP's health checks take: direct (to the backend) or tunnel "
                      "(to the VIP, GRE to the backend under test)", ["vip", "path"])
        for name, d in sorted(vips.items()):
            addr = str(d.vip.address)
            if d.vip.health_check is not None:
                path.add_metric([name, d.vip.health_check.via], 1)
            announced.add_metric([name, addr], int(d.announce))
            confirmed.add_metric([name, addr], int(d.vip.prefix in s.announced))
            state.add_metric([name, d.state, d.policy.code], 1)
            fallback.add_metric([name], int(d.policy.use_fallback))
            serving.add_metric([name], len(d.serving))
            digest.add_metric([name], {"digest": d.table.digest() if d.table else ""})
            shares = d.table.shares() if d.table is not None and d.table.backends else {}
            total = sum(b.weight for b in d.backends if b.serving)
            for b in d.backends:
                # The current state only: one series per backend keeps a big pool's scrape small.
                health.add_metric([name, b.key, b.health.value], 1)
                bserving.add_metric([name, b.key], int(b.serving))
                share.add_metric([name, b.key], shares.get(b.key, 0.0))
                expected.add_metric([name, b.key], b.weight / total if b.serving and total else 0.0)
        yield from (announced, state, fallback, confirmed, serving, digest, health, bserving, share, expected, path)
        yield from self._tunnel()
        t = _counter("maglev_backend_transitions", "Backend health transitions", ["vip", "backend", "to"])
        for (vip, key, to), n in sorted(s.transitions.items()):
            t.add_metric([vip, key, to], n)
        yield t

    def _tunnel(self) -> Iterator[Any]:
        t = self.s.tunnel
        if t is None:
            return
        up = _gauge("maglev_health_tunnel_up", "1 while the node's tunnel for health checks is set up")
        up.add_metric([], int(bool(t.get("ok"))))
        yield up
        c = _counter("maglev_health_tunnel_packets",
                     "Probe packets seen by the tunnel program (hc_tunnel.c), by outcome", ["outcome"])
        for outcome, n in sorted((t.get("counters") or {}).items()):
            c.add_metric([outcome], n)
        yield c

    def _bgp(self) -> Iterator[Any]:
        s = self.s
        state = _gauge("maglev_bgp_session_state", "BGP session state per peer (1 for the current state)", ["peer", "state"])
        for peer, info in sorted((s.bgp.get("sessions") or {}).items()):
            current = info.get("state") if isinstance(info, dict) else getattr(info, "state", "idle")
            for st in BGP_STATES:
                state.add_metric([peer, st], int(current == st))
        yield state
        yield self._transitions("maglev_bgp_session_transitions", "BGP session state changes per peer", s.session_transitions)
        g = _gauge("maglev_bgp_speaker_up", "1 while ExaBGP is running under supervision")
        g.add_metric([], int(s.speaker_up))
        yield g
        c = _counter("maglev_bgp_speaker_restarts", "Times ExaBGP was restarted by the node")
        c.add_metric([], int(s.bgp.get("restarts") or 0))
        yield c
        g = _gauge("maglev_bgp_announced_routes", "Routes acknowledged by ExaBGP")
        g.add_metric([], len(s.announced))
        yield g
        bfd = s.bgp.get("bfd") or {}
        enabled = bool(bfd.get("enabled"))  # bgp.bfd.enabled; the families stay, empty, without it
        up = _gauge("maglev_bfd_peer_up", "1 while the BFD session with the peer is up (bgp.bfd.enabled)", ["peer"])
        for peer, info in sorted((bfd.get("peers") or {}).items() if enabled else ()):
            up.add_metric([peer], int(info.get("status") == "up"))
        yield up
        yield self._transitions("maglev_bfd_session_transitions", "BFD session state changes per peer", s.bfd_transitions)
        c = _counter("maglev_bfdd_restarts", "Times bfdd was restarted by the node (bgp.bfd.enabled)")
        if enabled:
            c.add_metric([], int(bfd.get("restarts") or 0))
        yield c
        yield from self._graceful_restart(s.bgp.get("graceful_restart") or {})

    @staticmethod
    def _graceful_restart(gr: dict[str, Any]) -> Iterator[Any]:
        """bgp.graceful_restart: configured, its restart time, End-of-RIB still owed per peer
        (a router helping a restart keeps this node's old routes until it gets it)."""
        enabled = bool(gr.get("enabled"))
        g = _gauge("maglev_bgp_graceful_restart_enabled", "1 when the node offers BGP graceful restart")
        g.add_metric([], int(enabled))
        yield g
        g = _gauge("maglev_bgp_graceful_restart_time_seconds",
                   "Restart time offered to routers: how long they keep the routes of a node whose session went away")
        if enabled:
            g.add_metric([], float(gr.get("restart_time") or 0))
        yield g
        g = _gauge("maglev_bgp_end_of_rib_owed",
                   "1 while a session is up but has not had its End-of-RIB (its router may hold stale routes)", ["peer"])
        for peer in gr.get("end_of_rib_owed") or ():
            g.add_metric([peer], 1)
        yield g
        c = _counter("maglev_bgp_end_of_rib_sent", "End-of-RIB markers sent (graceful restart)")
        c.add_metric([], int(gr.get("end_of_rib_sent_total") or 0))
        yield c

    @staticmethod
    def _transitions(name: str, doc: str, data: dict[tuple[str, str], int]) -> CounterMetricFamily:
        c = _counter(name, doc, ["peer", "to"])
        for (peer, to), n in sorted(data.items()):
            c.add_metric([peer, to], n)
        return c

    def _forwarder_counters(self) -> Iterator[Any]:
        counters = self.s.counters
        for stat, (suffix, doc) in STAT_HELP.items():
            c = _counter(f"maglev_vip_{suffix}", f"{doc}, per VIP", ["vip"])
            for name, vc in sorted(counters.get("vips", {}).items()):
                c.add_metric([name], vc.get(stat, 0))
            yield c
        for stat, (suffix, doc) in STAT_HELP.items():
            if stat == "ct_misses":  # a miss has no backend yet
                continue
            c = _counter(f"maglev_backend_{suffix}", f"{doc}, per VIP and backend", ["vip", "backend"])
            for name, per in sorted(counters.get("vip_backends", {}).items()):
                for key, bc in sorted(per.items()):
                    c.add_metric([name, key], bc.get(stat, 0))
            yield c
        c = _counter("maglev_forwarder_drops", "Packets dropped by the forwarder, by reason", ["reason"])
        for reason, n in sorted(counters.get("drops", {}).items()):
            c.add_metric([reason], n)
        yield c
        c = _counter("maglev_forwarder_events", "Forwarder events that are not drops (passed, steered, bypassed...), by event",
                     ["event"])
        for event, n in sorted(counters.get("events", {}).items()):
            c.add_metric([event], n)
        yield c


def registry_for(snap: Snapshot, recorded: NodeMetrics | None, describe: bool = False) -> CollectorRegistry:
    """describe: learn each collector's names at registration (one extra pass), which
    ``restricted_registry`` needs; a plain scrape skips it."""
    registry = CollectorRegistry(auto_describe=describe)
    registry.register(SnapshotCollector(snap))
    for collector in (recorded.collectors() if recorded is not None else []):
        registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def exposition(snap: Snapshot, recorded: NodeMetrics | None, accept: str = "", accept_encoding: str = "",
               names: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
    """Body and headers for one scrape, negotiated as prometheus_client does it: OpenMetrics
    when the Accept header asks for it, gzip when accepted, ``name[]`` to restrict the series.
    Runs in a worker thread."""
    with _collector_paused():
        return _exposition(snap, recorded, accept, accept_encoding, names)


def _exposition(snap: Snapshot, recorded: NodeMetrics | None, accept: str, accept_encoding: str,
                names: list[str] | None) -> tuple[bytes, dict[str, str]]:
    registry = registry_for(snap, recorded, describe=bool(names))
    if names:
        registry = registry.restricted_registry(names)
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    headers = {"Content-Type": content_type}
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return body, headers


_gc_lock = threading.Lock()
_gc_renders = 0
_gc_was_enabled = True


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a scrape renders. A big pool's exposition allocates
    hundreds of thousands of short-lived objects; a full collection over them holds the GIL
    for ~100 ms, stalling the event loop (measured by bench/metrics_scrape.py). Reference
    counting frees them when the render ends, so nothing is left for the collector to find."""
    global _gc_renders, _gc_was_enabled
    with _gc_lock:
        if _gc_renders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_renders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_renders -= 1
            if _gc_renders == 0 and _gc_was_enabled:
                gc.enable()


def render(controller: Any, counters: dict[str, Any]) -> str:
    """The text exposition of one controller, synchronously (tests and tools; the API renders
    in a worker thread through ``exposition``)."""
    body, _ = exposition(snapshot(controller, counters), getattr(controller, "metrics", None))
    return body.decode()


class ConntrackCounter:
    """Conntrack fill, recounted at most every CONNTRACK_RECOUNT seconds (an LRU count walks
    every key with one syscall each; at a million flows that is seconds of a worker thread)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._value: tuple[int, int] | None = None
        self._at = float("-inf")

    def read(self, forwarder: Any) -> tuple[int, int] | None:
        """Called in a worker thread."""
        if self._value is not None and self.clock() - self._at < CONNTRACK_RECOUNT:
            return self._value
        count = getattr(forwarder, "conntrack_count", None)
        capacity = getattr(forwarder, "ct_entries", None)
        if count is None or capacity is None:
            return None
        try:
            self._value = (int(count()), int(capacity))
        except Exception:  # a closed forwarder: no figure rather than a wrong one
            return self._value
        self._at = self.clock()
        return self._value


RATE_FIELDS = ("packets", "bytes", "new_flows", "ct_hits")


def counter_rates(before: list[dict[str, Any]], after: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Per-second rates between two lists of VIP views (``vip_view``): {vip: {field: rate,
    "backends": {key: {field: rate}}}}. A counter that went down (the forwarder's maps were
    recreated) restarts from zero rather than giving a negative rate."""
    if seconds <= 0:
        return {}

    def rate(old: dict[str, Any], new: dict[str, Any]) -> dict[str, float]:
        out = {}
        for f in RATE_FIELDS:
            a, b = old.get(f), new.get(f)
            if a is not None and b is not None:
                out[f] = (b - a if b >= a else b) / seconds
        return out

    old_vips = {v["name"]: v for v in before}
    out: dict[str, Any] = {}
    for v in after:
        old = old_vips.get(v["name"])
        if old is None:
            continue
        old_b = {b["key"]: b.get("counters") or {} for b in old["backends"]}
        entry: dict[str, Any] = rate(old.get("counters") or {}, v.get("counters") or {})
        entry["backends"] = {b["key"]: rate(old_b.get(b["key"], {}), b.get("counters") or {})
                             for b in v["backends"] if b["key"] in old_b}
        out[v["name"]] = entry
    return out
