"""The node controller: one asyncio process that owns health checks, the forwarder and BGP.

It is a reconciler. Inputs (VIP config, backend health, forwarder self-test, operator actions,
warm-up) go through ``node.reconcile.decide`` into a desired state; effects are applied only
where the desired state changed since the last apply (forwarder maps when a table digest or a
backend state changed; BGP routes when the announced set changed). Any input change just marks
the state dirty; one loop does the work, so effects never interleave.

The controller holds the state and the loop; its parts live beside it: the persisted operator
overrides (node.admin_state), the health lookup (node.health_view), installing a VIP set and
the reload boundary (node.installer), the self-test policy (node.self_test), what a decision
turns into for the forwarder and BGP (node.effects), the operator events about decisions
(node.decision_log) and the API's views (node.views).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Callable

from node.admin_state import AdminStore
from node.announce_policy import DampingParams
from node.config import (
    NodeConfig,
    VipConfig,
    table_regions,
    tables_needed,
    vip_dir_signature,
)
from node.decision_log import DecisionLog
from node.dirs import node_dirs
from node.disable_switch import DisableSwitch
from node.effects import forwarder_spec, routes_for
from node.events import EventLog
from node.health_view import HealthView, held_until, health_of
from node.installer import ReloadResult
from node import health_path, installer
from node.metrics import NodeMetrics
from node.ports import ForwarderPort, HealthPort, SpeakerPort
from node.programming import SpecCache
from node.maglev import StopGapTable
from node.reconcile import AdminState, Desired, Health, Inputs, TableCache, VipDecision, decide
from node.self_test import SelfTest, SelfTester
from node.stop_gaps import StopGaps
from node.supervisor import Supervisor
from node.transitions import transition_events
from node.vip_reader import VipReader
from node.vip_source import initial_vips, watcher
from node import views

log = logging.getLogger("maglev.controller")

RECONCILE_DEBOUNCE = 0.02
WATCH_INTERVAL = 1.0
INLINE_BUILDS = 8  # exact tables built within the reconcile; more: stop-gaps, built behind


class Controller:
    def __init__(
        self,
        config: NodeConfig,
        *,
        health_factory: Callable[[Callable[[Any], None]], HealthPort],
        speaker: SpeakerPort,
        forwarder: ForwarderPort,
        events: EventLog | None = None,
        clock: Callable[[], float] = time.monotonic,
        base_dir: Path | None = None,
        spec_builder: Callable[[VipDecision], Any] | None = None,
        tunnel: Any | None = None,
        vip_source: Any = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.events = events or EventLog()
        self.health = health_factory(self._on_health_transition)
        self.speaker = speaker
        self.forwarder = forwarder
        self.tunnel = tunnel  # tunnel health checks (node.health_path); None: direct only
        self.spec_builder = spec_builder or forwarder_spec
        self.vip_dir = _resolve(config.vip_dir, base_dir)
        self.run_dir = _resolve(config.run_dir, base_dir)
        self.state_file = node_dirs(config, base_dir).state / "state.json"
        self.disable = DisableSwitch(_resolve(config.disable.path, base_dir) if config.disable.path
                                     else self.run_dir / "disable", config.disable.action)
        self.damping = DampingParams(config.bgp.flap_hold_down, config.bgp.flap_hold_down_max,
                                     config.bgp.flap_threshold, config.bgp.flap_window)

        # None: the VIP directory. Otherwise where the VIP set comes from instead (etcd: a
        # node.fleet.member.FleetMember); node/vip_source.py is the one place that tells them apart.
        self.vip_source = vip_source
        self.vips: dict[str, VipConfig] = {}
        self.vip_sources: dict[str, Path] = {}
        self.targets: dict[tuple[str, str], Any] = {}  # (vip, backend key) -> health Target
        self._static_pairs: set[tuple[str, str]] = set()
        self._owners: dict[Any, list[tuple[str, str]]] = {}
        self._dirty_vips: set[str] | None = None  # VIPs whose inputs changed; None: all
        self._decided_globals: tuple | None = None
        self._decided_verdict: dict = {}
        self.admin = AdminStore(self.state_file, self.events)
        self.forwarder_error: str | None = None
        self.attach_mode: str | None = None
        self.started_at = clock()
        self.warmup_over = False
        self.last_reload: ReloadResult | None = None
        self.desired: Desired | None = None
        self.tables = TableCache(defer=True)
        self.metrics = NodeMetrics()
        self.specs = SpecCache(self.spec_builder)
        self.self_tester = SelfTester(forwarder, self.metrics, self.events, self._self_test_changed,
                                      lambda: self.config.forwarder.self_test_interval)
        self.decision_log = DecisionLog(self.events)
        self.stop_gaps = StopGaps(forwarder, self.events, self._tables_patched)
        self._reconcile_lock = asyncio.Lock()
        self._forwarder_open = False

        self._dirty = asyncio.Event()
        self._builds_wanted = asyncio.Event()
        # Set by the first successful reconcile: `maglev node` then tells systemd it is ready.
        self.reconciled = asyncio.Event()
        self._stopping = asyncio.Event()
        self.supervisor = Supervisor(self.events)
        self.reader = VipReader()
        self._reload_lock = asyncio.Lock()  # one reload at a time, whoever asks
        self._reload_wanted = asyncio.Event()  # SIGHUP: the watcher reloads on its next turn
        self._applied_forwarder: tuple | None = None
        self._applied_routes: tuple | None = None
        self._routes_from: tuple | None = None  # (config, announce) per VIP of the last routes
        self._watch_signature: tuple | None = None

    @property
    def self_test(self) -> SelfTest:
        return self.self_tester.last

    @property
    def overrides(self) -> dict[tuple[str, str], AdminState]:
        return self.admin.overrides

    @property
    def node_drained(self) -> bool:
        return self.admin.node_drained

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load config (a broken VIP directory at start is fatal: there is no last good state
        to keep serving), open the forwarder, start health checks and BGP."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.admin.load()
        sources = await initial_vips(self)  # raises ConfigError
        self._install_vips(sources, "startup")
        self._watch_signature = self._dir_signature()
        size_tables = getattr(self.forwarder, "size_tables", None)
        if size_tables is not None:  # an unset table_capacity is sized from the VIPs
            size_tables(tables_needed(table_regions(self.vips.values())))
        await asyncio.to_thread(self.forwarder.open)
        self._forwarder_open = True
        self.attach_mode = await asyncio.to_thread(self.forwarder.attach)
        self.events.emit(
            "forwarder_attached",
            f"XDP forwarder attached ({self.attach_mode}) on {', '.join(self.config.forwarder.interfaces)}",
            mode=self.attach_mode,
        )
        await health_path.open_tunnel(self.tunnel, self.events, self.targets.values())
        await self.health.start()
        await self.speaker.start()
        self.events.emit(
            "node_started",
            f"node {self.config.node_id} started with {len(self.vips)} VIP(s); "
            f"announcing after warm-up (up to {self.config.warmup:g} s)",
        )
        self.supervisor.spawn("reconcile", self._reconcile_loop)
        self.supervisor.spawn("self-test", self._self_test_loop)
        self.supervisor.spawn(*watcher(self))
        self.supervisor.spawn("warmup", self._warmup_timer, once=True)
        self.supervisor.spawn("table-builds", self._table_build_loop)
        self.supervisor.spawn("stop-gaps", self.stop_gaps.run)
        self.supervisor.spawn("disable-watch", lambda: self.disable.watch(self.events, self.mark_dirty))
        self.mark_dirty()

    async def stop(self) -> None:
        """Graceful stop: withdraw everything, wait for routers to reconverge, stop ExaBGP, stop
        checks, then detach (or keep) the forwarder."""
        from bgp.graceful import keeps_routes_on_stop

        self._stopping.set()
        keep_routes = keeps_routes_on_stop(self.config.forwarder.on_stop, self.config.bgp)
        self.events.emit("node_stopping", (
            f"restarting: routes kept by BGP graceful restart (routers keep them up to "
            f"{self.config.bgp.graceful_restart.restart_time} s), forwarder stays attached"
            if keep_routes else "withdrawing every VIP, then stopping BGP"), keep_routes=keep_routes)
        await self.supervisor.stop()
        self.reader.close()
        try:
            await self.speaker.stop(graceful=True, keep_routes=keep_routes)
        finally:
            await self.health.stop()
            if self.config.forwarder.on_stop == "detach":
                await asyncio.to_thread(self.forwarder.detach)
                self.events.emit("forwarder_detached", "XDP forwarder detached")
            else:
                self.events.emit("forwarder_kept", "XDP forwarder left attached (on_stop: keep)")
            await asyncio.to_thread(self.forwarder.close)
            await health_path.close_tunnel(self.tunnel)
        self.events.emit("node_stopped", f"node {self.config.node_id} stopped")

    def mark_dirty(self) -> None:
        self._dirty.set()

    def alive(self) -> bool:
        """The reconcile loop is running (not crashed and waiting for its restart): the systemd
        watchdog is pinged only then, so a loop that keeps dying gets the node restarted."""
        info = self.supervisor.tasks.get("reconcile")
        return info is not None and info.running

    # ------------------------------------------------------------------ inputs

    def _mark_vips(self, names) -> None:
        """Only these VIPs' inputs changed (None: maybe every VIP's)."""
        if names is None:
            self._dirty_vips = None
        elif self._dirty_vips is not None:
            self._dirty_vips.update(names)

    def _on_health_transition(self, transition: Any) -> None:
        owners = self._owners.get(transition.target, [])
        self._mark_vips(vip for vip, _ in owners)
        new = health_of(transition.new)
        self.mark_dirty()  # first: the reconcile is due whatever the events below cost
        for e in transition_events(owners, new.value, transition.reason, getattr(transition, "dampened", False)):
            self.events.emit(e.name, e.message, level=e.level, **e.fields)
        if new is Health.DOWN:
            self._lost(owners)
        for vip, key in owners:
            self.metrics.transitions[(vip, key, new.value)] = self.metrics.transitions.get((vip, key, new.value), 0) + 1

    def _lost(self, pairs) -> None:
        """Backends that stopped serving: out of the live tables at once (node.stop_gaps), once
        tables are programmed and the forwarder's state is known."""
        if self.warmup_over and self._forwarder_open and self.forwarder_error is None:
            self.stop_gaps.lost(pairs)

    def _tables_patched(self, vips: set[str]) -> None:
        self.specs.outside(vips)
        self._mark_vips(vips)
        self.mark_dirty()

    def _self_test_changed(self, vips: set[str] | None) -> None:
        self._mark_vips(vips)
        self.mark_dirty()

    def _health_map(self) -> dict[tuple[str, str], Health]:
        view = self._health_view()
        return {pair: view[pair] for pair in view}

    def _health_view(self, snapshot: dict | None = None) -> HealthView:
        # One verdict per distinct target (many VIPs share backends), looked up per (VIP,
        # backend) only for the VIPs being decided.
        snapshot = self.health.snapshot() if snapshot is None else snapshot
        verdict = {t: health_of(st.state) for t, st in snapshot.items()}
        return HealthView(verdict, self.targets, self._static_pairs)

    def _mark_health_changes(self, view: HealthView) -> None:
        """Mark the owners of every target whose verdict differs from the last decision's
        (per distinct target: cheap), whether or not a transition callback said so."""
        before = self._decided_verdict
        for target, health in view.verdicts.items():
            if before.get(target, Health.UNKNOWN) is not health:
                self._mark_vips(vip for vip, _ in self._owners.get(target, ()))
        for target in before.keys() - view.verdicts.keys():
            self._mark_vips(vip for vip, _ in self._owners.get(target, ()))
        self._decided_verdict = view.verdicts

    def _inputs(self) -> Inputs:
        forwarder_ok = self.self_test.ok and self.forwarder_error is None
        reason = self.forwarder_error or self.self_test.reason
        snapshot = self.health.snapshot()  # one read for the verdicts and the hold-downs
        return Inputs(
            vips=self.vips,
            health=self._health_view(snapshot),
            overrides=self.overrides,
            forwarder_ok=forwarder_ok,
            forwarder_reason=reason,
            vip_faults=dict(self.self_tester.faults),
            warmup_over=self.warmup_over,
            node_drained=self.node_drained,
            node_disabled=self.disable.action if self.disable.state.active else None,
            disable_path=str(self.disable.path),
            held=held_until(snapshot, self._owners),
            now=self.clock(),
            damping=self.damping,
        )

    def _check_warmup(self, health: dict[tuple[str, str], Health]) -> None:
        if self.warmup_over:
            return
        elapsed = self.clock() - self.started_at
        known = all(h is not Health.UNKNOWN for h in health.values())
        if known or elapsed >= self.config.warmup:
            self.warmup_over = True
            why = "every backend has a health verdict" if known else f"warm-up time ({self.config.warmup:g} s) passed"
            self.events.emit("warmup_over", f"warm-up over after {elapsed:.1f} s: {why}")

    # ------------------------------------------------------------------ the loop

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wait_dirty()
            await asyncio.sleep(RECONCILE_DEBOUNCE)  # coalesce bursts (a reload, many transitions)
            self._dirty.clear()
            try:
                await self.reconcile()
                self.reconciled.set()
            except Exception as exc:  # never let one bad apply kill the node; report and retry
                self.events.emit("reconcile_failed", f"reconcile failed: {exc!r}; retrying in 1 s", level="error")
                await asyncio.sleep(1)
                self.mark_dirty()

    async def _wait_dirty(self) -> None:
        """Wait for an input change, or for the first announce-policy hold-down to end (a
        decision that changes with time alone): its VIPs are then decided again."""
        wakeups = self.desired.wakeups() if self.desired is not None else {}
        if not wakeups:
            await self._dirty.wait()
            return
        try:
            await asyncio.wait_for(self._dirty.wait(), max(0.0, min(wakeups.values()) - self.clock()) + 0.01)
        except TimeoutError:
            pass
        # However the wait ended: a busy node must not keep an ended hold-down forever.
        now = self.clock()
        self._mark_vips(name for name, at in wakeups.items() if at <= now)

    async def reconcile(self) -> Desired:
        # One at a time: the API's actions reconcile directly, next to the loop's.
        async with self._reconcile_lock:
            with self.metrics.reconcile_duration.time():
                return await self._reconcile()
    def _changed_vips(self, inputs: Inputs) -> set[str] | None:
        """The VIPs to decide again (None: all, when a node-wide input changed); taken on the
        event loop, where the marks are made."""
        # The forwarder's reason only shows in decisions while it is unhealthy ("3 VIP(s)
        # checked" changing with the sample size must not re-decide every VIP).
        reason = "" if inputs.forwarder_ok else inputs.forwarder_reason
        flags = (inputs.forwarder_ok, reason, inputs.warmup_over, inputs.node_drained, inputs.node_disabled)
        self._mark_health_changes(inputs.health)
        only, self._dirty_vips = self._dirty_vips, set()
        if flags != self._decided_globals or self.desired is None:
            only = None
        self._decided_globals = flags
        return only

    def _decide(self, inputs: Inputs, only: set[str] | None) -> tuple[Desired, set[str] | None]:
        """(desired, the VIPs decided again). A few tables waiting behind stop-gaps (one VIP
        drained, one backend down) are built right here; only a burst waits for the builder."""
        try:
            desired = decide(inputs, self.tables, self.desired, only)
            if 0 < len(self.tables.pending) <= INLINE_BUILDS:
                self.tables.add(self.tables.build(self.tables.take_pending()))
                gaps = {n for n, d in desired.vips.items() if isinstance(d.table, StopGapTable)}
                desired = decide(inputs, self.tables, desired, gaps)
                only = None if only is None else only | gaps
        except BaseException:
            self._dirty_vips = None
            raise
        self.desired = desired
        return desired, only

    async def _reconcile(self) -> Desired:
        await self.stop_gaps.settled()
        if not self.warmup_over:
            self._check_warmup(self._health_map())
        # Deciding builds the tables that changed: off the event loop (health probes and the
        # API keep running); the lock above keeps the table cache to one decide at a time.
        inputs = self._inputs()
        desired, touched = await asyncio.to_thread(self._decide, inputs, self._changed_vips(inputs))
        if self.warmup_over:
            programmed = await self._apply_forwarder(desired, touched)
            if programmed is not None:
                # New tables are announced only once a self-test has run over them (just
                # those: the periodic rounds cover the rotating sample).
                await self.run_self_test(programmed, sample=False)
            # A failed sync or self-test flips forwarder health; decide again so BGP sees it
            # (a no-op when it did not change).
            inputs = self._inputs()
            desired, again = self._decide(inputs, self._changed_vips(inputs))
            touched = None if touched is None or again is None else touched | again
        self._apply_routes(desired)
        if self.warmup_over:  # graceful restart: End-of-RIB may follow the first decision
            self.speaker.routes_ready()
        self.decision_log.decisions(desired, touched)
        self.desired = desired
        if self.tables.pending:
            self._builds_wanted.set()
        return desired

    async def _apply_forwarder(self, desired: Desired, touched: set[str] | None = None) -> list[str] | None:
        """Program the VIPs whose tables or backend states changed (looking only at
        ``touched``, the VIPs decided again, when given); returns their names (None: nothing
        was programmed)."""
        specs, changed, removed = self.specs.changes(desired, touched)
        if not changed and not removed:
            return None
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self.forwarder.sync, specs, changed)
        except Exception as exc:
            self.forwarder_error = f"programming the forwarder failed: {exc}"
            self.events.emit("forwarder_sync_failed", self.forwarder_error + "; every VIP is withdrawn until it succeeds", level="error")
            self.specs.forget()
            return None
        self.metrics.observe_sync(time.perf_counter() - started)
        self.specs.programmed(desired, changed, removed)
        if self.forwarder_error:
            self.events.emit("forwarder_sync_ok", "forwarder programmed again")
        self.forwarder_error = None
        self.decision_log.tables(desired, changed, self.metrics.sync_seconds)
        return changed

    async def _table_build_loop(self) -> None:
        """Builds the exact tables that stop-gaps stand in for, off the event loop, then
        reconciles them in. A failed build is reported and retried by the next decide."""
        while True:
            await self._builds_wanted.wait()
            self._builds_wanted.clear()
            todo = self.tables.take_pending()
            if not todo:
                continue
            try:
                built = await asyncio.to_thread(self.tables.build, todo)
            except Exception as exc:
                self.tables.abandon(todo)
                self.events.emit("table_build_failed", f"building {len(todo)} table(s) failed: {exc!r}; "
                                 "the stop-gap tables stay until the next change", level="error")
                continue
            self.tables.add(built)
            self._mark_vips(None)  # the VIPs on stop-gaps pick their exact tables up
            self.mark_dirty()

    def _apply_routes(self, desired: Desired) -> None:
        # What routes_for reads (not the config objects: a reload that changes a backend must
        # not make a thousand routes again, ~45 ms at 1000 VIPs).
        announced = tuple((n, d.vip.address, d.state, d.policy.attributes) for n, d in desired.vips.items())
        if announced == self._routes_from:
            return
        self._routes_from = announced
        routes = routes_for(desired)
        key = tuple(sorted((str(r.prefix), r.med, r.communities, r.prepend) for r in routes))
        if key != self._applied_routes:
            self.speaker.set_desired(routes)
            self._applied_routes = key

    # ------------------------------------------------------------------ periodic work

    async def _self_test_loop(self) -> None:
        while True:
            await self.run_self_test([])
            await asyncio.sleep(self.config.forwarder.self_test_interval)

    async def run_self_test(self, changed: list[str] | None = None, sample: bool = True) -> SelfTest:
        """One self-test at a time (node.self_test): ``changed`` plus a rotating sample, every
        VIP when None; a failure withdraws every VIP only when a fresh run confirms it."""
        return await self.self_tester.run(list(self.vips), changed, sample)

    async def _warmup_timer(self) -> None:
        remaining = self.config.warmup - (self.clock() - self.started_at)
        await asyncio.sleep(max(0.0, remaining))
        self.mark_dirty()

    async def _watch_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reload_wanted.wait(), WATCH_INTERVAL)
            except TimeoutError:
                pass
            if self._reload_wanted.is_set():
                self._reload_wanted.clear()
                await self.reload("SIGHUP")
                continue
            signature = self._dir_signature()
            if signature != self._watch_signature:
                self._watch_signature = signature
                await self.reload("VIP directory changed")

    def request_reload(self) -> None:
        """SIGHUP: a reload by the watcher (a signal handler cannot wait for one)."""
        self._reload_wanted.set()

    def _dir_signature(self) -> tuple:
        # An etcd node does not read its vip_dir: an edit there is no reason to reload.
        return vip_dir_signature(self.vip_dir) if self.vip_source is None else ()

    # ------------------------------------------------------------------ config

    async def reload(self, source: str = "SIGHUP") -> ReloadResult:
        """Read, validate and apply the whole VIP set, or keep the last good one (node.installer)."""
        async with self._reload_lock:
            return await installer.reload(self, source)

    def _install_vips(self, sources: dict[str, tuple[Path, VipConfig]], source: str) -> ReloadResult:
        return installer.install_vips(self, sources, source)

    def fixed_table_capacity(self) -> int | None:
        """The open forwarder's tables map size (fixed until a restart), which every reload and
        API candidate set must fit; None before the forwarder is open (the node file's then)."""
        if not self._forwarder_open:
            return None
        capacity = getattr(self.forwarder, "table_capacity", None)
        return capacity if isinstance(capacity, int) else None

    # ------------------------------------------------------------------ operator actions

    def set_backend_state(self, vip: str, backend: str, state: AdminState | None) -> None:
        """Override a backend's admin state (None: back to the config's state). Persisted, so a
        drained backend stays drained across a controller restart."""
        if vip not in self.vips:
            raise KeyError(f"no VIP named {vip!r}")
        if not any(b.key == backend for b in self.vips[vip].all_backends):
            keys = ", ".join(b.key for b in self.vips[vip].all_backends)
            raise KeyError(f"VIP {vip!r} has no backend {backend!r} (backends: {keys})")
        if state is None:
            self.overrides.pop((vip, backend), None)
        else:
            self.overrides[(vip, backend)] = state
        self._mark_vips([vip])
        if state in ("drain", "disabled"):
            self._lost([(vip, backend)])
        self.admin.save()
        self.events.emit(
            "backend_admin",
            f"backend {backend} of VIP {vip} set to {state or 'its configured state'} by operator",
            vip=vip,
            backend=backend,
        )
        self.mark_dirty()

    def set_node_drained(self, drained: bool) -> None:
        self.admin.node_drained = drained
        self.admin.save()
        self.events.emit(
            "node_drain" if drained else "node_undrain",
            "node drained by operator: every VIP withdrawn, existing flows keep forwarding"
            if drained
            else "node undrained by operator: VIPs announced again where healthy",
        )
        self.mark_dirty()

    # ------------------------------------------------------------------ views for the API

    def status(self) -> dict[str, Any]:
        return views.node_status(self)

    def vip_view(self, name: str, counters: dict[str, Any] | None = None) -> dict[str, Any]:
        return views.vip_view(self, name, counters)


# ---------------------------------------------------------------------- helpers


def _resolve(path: Path, base: Path | None) -> Path:
    return path if path.is_absolute() or base is None else base / path
