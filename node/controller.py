"""The node controller: one asyncio process that owns health checks, the forwarder and BGP.

It is a reconciler. Inputs (VIP config, backend health, forwarder self-test, operator actions,
warm-up) go through ``node.reconcile.decide`` into a desired state; effects are applied only
where the desired state changed since the last apply (forwarder maps when a table digest or a
backend state changed; BGP routes when the announced set changed). Any input change just marks
the state dirty; one loop does the work, so effects never interleave.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable

from node.config import (
    ConfigError,
    NodeConfig,
    VipConfig,
    tables_needed,
    vip_dir_warnings,
    vip_files,
)
from node.dirs import node_dirs
from node.events import EventLog
from node.handover import handover
from node.metrics import NodeMetrics
from node.ports import ForwarderPort, HealthPort, SpeakerPort
from node.programming import SelfTestSample, SpecCache
from node.maglev import StopGapTable
from node.reconcile import AdminState, Desired, Health, Inputs, TableCache, VipDecision, decide
from node.supervisor import Supervisor
from node.vip_reader import VipReader

log = logging.getLogger("maglev.controller")

RECONCILE_DEBOUNCE = 0.02
WATCH_INTERVAL = 1.0
SELF_TEST_SAMPLE = 32  # VIPs per periodic self-test round, besides those just programmed
TABLE_EVENTS_MAX = 20  # more tables rebuilt at once: one summary event instead of one each
INLINE_BUILDS = 8  # exact tables built within the reconcile; more: stop-gaps, built behind


@dataclass
class ReloadResult:
    ok: bool
    at: float
    source: str
    problems: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # skipped entries, unsafe file modes


@dataclass
class SelfTest:
    ok: bool
    reason: str
    at: float


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
    ) -> None:
        self.config = config
        self.clock = clock
        self.events = events or EventLog()
        self.health = health_factory(self._on_health_transition)
        self.speaker = speaker
        self.forwarder = forwarder
        self.spec_builder = spec_builder or forwarder_spec
        self.vip_dir = _resolve(config.vip_dir, base_dir)
        self.run_dir = _resolve(config.run_dir, base_dir)
        self.state_file = node_dirs(config, base_dir).state / "state.json"

        self.vips: dict[str, VipConfig] = {}
        self.vip_sources: dict[str, Path] = {}
        self.targets: dict[tuple[str, str], Any] = {}  # (vip, backend key) -> health Target
        self._static_pairs: set[tuple[str, str]] = set()
        self._owners: dict[Any, list[tuple[str, str]]] = {}
        self._dirty_vips: set[str] | None = None  # VIPs whose inputs changed; None: all
        self._decided_globals: tuple | None = None
        self._decided_verdict: dict = {}
        self.overrides: dict[tuple[str, str], AdminState] = {}
        self.node_drained = False
        self.self_test = SelfTest(False, "not run yet", 0.0)
        self.forwarder_error: str | None = None
        self.attach_mode: str | None = None
        self.started_at = clock()
        self.warmup_over = False
        self.last_reload: ReloadResult | None = None
        self.desired: Desired | None = None
        self.tables = TableCache(defer=True)
        self.metrics = NodeMetrics()
        self.specs = SpecCache(self.spec_builder)
        self.sample = SelfTestSample(SELF_TEST_SAMPLE)
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
        self._self_test_lock = asyncio.Lock()  # the periodic and the post-sync self-test
        self._applied_forwarder: tuple | None = None
        self._applied_routes: tuple | None = None
        self._routes_from: tuple | None = None  # (config, announce) per VIP of the last routes
        self._logged_vip: dict[str, tuple[bool, str]] = {}
        self._logged_tables: dict[str, str] = {}
        self._watch_signature: tuple | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load config (a broken VIP directory at start is fatal: there is no last good state
        to keep serving), open the forwarder, start health checks and BGP."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._load_state()
        sources = await self.reader.read(self.vip_dir, self.config)  # raises ConfigError
        self._install_vips(sources, "startup")
        self._watch_signature = self._dir_signature()
        size_tables = getattr(self.forwarder, "size_tables", None)
        if size_tables is not None:  # an unset table_capacity is sized from the VIPs
            size_tables(tables_needed(v.table_size for v in self.vips.values()))
        await asyncio.to_thread(self.forwarder.open)
        self._forwarder_open = True
        self.attach_mode = await asyncio.to_thread(self.forwarder.attach)
        self.events.emit(
            "forwarder_attached",
            f"XDP forwarder attached ({self.attach_mode}) on {', '.join(self.config.forwarder.interfaces)}",
            mode=self.attach_mode,
        )
        await self.health.start()
        await self.speaker.start()
        self.events.emit(
            "node_started",
            f"node {self.config.node_id} started with {len(self.vips)} VIP(s); "
            f"announcing after warm-up (up to {self.config.warmup:g} s)",
        )
        self.supervisor.spawn("reconcile", self._reconcile_loop)
        self.supervisor.spawn("self-test", self._self_test_loop)
        self.supervisor.spawn("vip-dir-watch", self._watch_loop)
        self.supervisor.spawn("warmup", self._warmup_timer, once=True)
        self.supervisor.spawn("table-builds", self._table_build_loop)
        self.mark_dirty()

    async def stop(self) -> None:
        """Graceful stop: withdraw everything, wait for routers to reconverge, stop ExaBGP, stop
        checks, then detach (or keep) the forwarder."""
        self._stopping.set()
        self.events.emit("node_stopping", "withdrawing every VIP, then stopping BGP")
        await self.supervisor.stop()
        self.reader.close()
        try:
            await self.speaker.stop(graceful=True)
        finally:
            await self.health.stop()
            if self.config.forwarder.on_stop == "detach":
                await asyncio.to_thread(self.forwarder.detach)
                self.events.emit("forwarder_detached", "XDP forwarder detached")
            else:
                self.events.emit("forwarder_kept", "XDP forwarder left attached (on_stop: keep)")
            await asyncio.to_thread(self.forwarder.close)
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
        new = _health_of(transition.new)
        for vip, key in owners:
            self.metrics.transitions[(vip, key, new.value)] = self.metrics.transitions.get((vip, key, new.value), 0) + 1
            self.events.emit(
                "backend_" + new.value,
                f"backend {key} of VIP {vip} is {new.value.upper()}: {transition.reason}"
                + (" (held down: flapping)" if getattr(transition, "dampened", False) else ""),
                level="warning" if new is Health.DOWN else "info",
                vip=vip,
                backend=key,
                reason=transition.reason,
            )
        self.mark_dirty()

    def _health_map(self) -> dict[tuple[str, str], Health]:
        view = self._health_view()
        return {pair: view[pair] for pair in view}

    def _health_view(self) -> "HealthView":
        # One verdict per distinct target (many VIPs share backends), looked up per (VIP,
        # backend) only for the VIPs being decided.
        verdict = {t: _health_of(st.state) for t, st in self.health.snapshot().items()}
        return HealthView(verdict, self.targets, self._static_pairs)

    def _mark_health_changes(self, view: "HealthView") -> None:
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
        return Inputs(
            vips=self.vips,
            health=self._health_view(),
            overrides=self.overrides,
            forwarder_ok=forwarder_ok,
            forwarder_reason=reason,
            warmup_over=self.warmup_over,
            node_drained=self.node_drained,
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
            await self._dirty.wait()
            await asyncio.sleep(RECONCILE_DEBOUNCE)  # coalesce bursts (a reload, many transitions)
            self._dirty.clear()
            try:
                await self.reconcile()
                self.reconciled.set()
            except Exception as exc:  # never let one bad apply kill the node; report and retry
                self.events.emit("reconcile_failed", f"reconcile failed: {exc!r}; retrying in 1 s", level="error")
                await asyncio.sleep(1)
                self.mark_dirty()

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
        flags = (inputs.forwarder_ok, reason, inputs.warmup_over, inputs.node_drained)
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
        self._log_decisions(desired, touched)
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
        self._log_tables(desired, changed)
        return changed

    def _log_tables(self, desired: Desired, names: list[str]) -> None:
        rebuilt = []
        for name in names:
            d = desired.vips[name]
            digest = d.table.digest() if d.table else ""
            if self._logged_tables.get(name) != digest:
                self._logged_tables[name] = digest
                rebuilt.append(name)
        for name in rebuilt if len(rebuilt) <= TABLE_EVENTS_MAX else ():
            d = desired.vips[name]
            stop_gap = bool(getattr(d.table, "gone", None))
            self.events.emit(
                "table_rebuilt",
                f"VIP {name}: table {self._logged_tables[name]} over {len(d.serving)} backend(s)"
                + (" (stop-gap while the exact table is built)" if stop_gap else ""),
                vip=name,
                digest=self._logged_tables[name],
                shares=",".join(f"{k}={v:.1%}" for k, v in _shares(d).items()) or "none",
            )
        if len(rebuilt) > TABLE_EVENTS_MAX:
            self.events.emit(
                "tables_rebuilt",
                f"{len(rebuilt)} VIPs got new tables in {self.metrics.sync_seconds * 1000:.0f} ms "
                f"(first: {', '.join(rebuilt[:5])}); `maglev vip NAME` shows one",
                count=len(rebuilt),
                sync_ms=round(self.metrics.sync_seconds * 1000, 1),
            )

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
        announced = tuple((d.vip, d.announce) for d in desired.vips.values())
        if announced == self._routes_from:
            return
        self._routes_from = announced
        routes = routes_for(desired)
        key = tuple(sorted((str(r.prefix), r.med, r.communities) for r in routes))
        if key != self._applied_routes:
            self.speaker.set_desired(routes)
            self._applied_routes = key

    def _log_decisions(self, desired: Desired, touched: set[str] | None = None) -> None:
        names = desired.vips if touched is None else [n for n in touched if n in desired.vips]
        for name in names:
            d = desired.vips[name]
            now = (d.announce, d.reason)
            before = self._logged_vip.get(name)
            if before is None or before[0] != now[0]:
                verb = "announced" if d.announce else "withdrawn"
                self.events.emit(
                    "vip_" + verb,
                    f"VIP {name} ({d.vip.prefix}) {verb}: {d.reason}",
                    level="info" if d.announce else "warning",
                    vip=name,
                )
            self._logged_vip[name] = now
        for name in self._logged_vip.keys() - desired.vips.keys():
            del self._logged_vip[name]
            self._logged_tables.pop(name, None)

    # ------------------------------------------------------------------ periodic work

    async def _self_test_loop(self) -> None:
        while True:
            await self.run_self_test([])
            await asyncio.sleep(self.config.forwarder.self_test_interval)

    async def run_self_test(self, changed: list[str] | None = None, sample: bool = True) -> SelfTest:
        """One self-test at a time; with ``changed`` (names just programmed): those, plus (with
        ``sample``) the next slice of a rotation over every VIP, so the cost does not grow with
        the VIP count and every VIP is still checked every few rounds. None: every VIP.
        A failure is acted on (every VIP withdrawn) only when a fresh run of the same VIPs
        fails too: a single glitch on every node at once must not take the fleet's VIPs down;
        it is reported and counted."""
        if changed is None:
            vips = None
        else:
            vips = self.sample.next(list(self.vips), changed) if sample else sorted(changed)
        async with self._self_test_lock:
            ok, reason = await self._self_test_once(vips)
            if not ok:
                first = reason
                ok, reason = await self._self_test_once(vips)
                if ok:
                    self.metrics.self_test_glitches += 1
                    self.events.emit(
                        "forwarder_self_test_glitch",
                        f"forwarder self-test failed once ({first}) and passed on a fresh run; not acted on",
                        level="warning",
                    )
            return self._record_self_test(ok, reason)

    async def _self_test_once(self, vips: list[str] | None) -> tuple[bool, str]:
        try:
            result = await asyncio.to_thread(self._forwarder_self_test, vips)
            return bool(result.ok), str(result.reason)
        except Exception as exc:
            return False, f"self-test raised {exc!r}"

    def _record_self_test(self, ok: bool, reason: str) -> SelfTest:
        previous = self.self_test
        self.self_test = SelfTest(ok, reason, time.time())
        self.metrics.self_tests[ok] = self.metrics.self_tests.get(ok, 0) + 1
        if ok != previous.ok or previous.at == 0.0:
            self.events.emit(
                "forwarder_self_test_" + ("passed" if ok else "failed"),
                f"forwarder self-test {'passed' if ok else 'failed'}: {reason}",
                level="info" if ok else "error",
            )
            self.mark_dirty()
        return self.self_test

    def _forwarder_self_test(self, vips: list[str] | None) -> Any:
        return self.forwarder.self_test() if vips is None else self.forwarder.self_test(vips)

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
        try:
            return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in vip_files(self.vip_dir))
        except OSError:
            return ()

    # ------------------------------------------------------------------ config

    async def reload(self, source: str = "SIGHUP") -> ReloadResult:
        """Read and validate the whole VIP directory in a worker thread, then apply it at once.
        This is the reload boundary: any error, expected (ConfigError) or not, is caught,
        logged with the file and the reason and reported in last_reload, and the node keeps
        serving the last good config."""
        async with self._reload_lock:
            try:
                sources = await self.reader.read(self.vip_dir, self.config, self.fixed_table_capacity())
                result = self._install_vips(sources, source)
            except ConfigError as exc:
                return self._reload_failed(source, [str(p) for p in exc.problems])
            except Exception as exc:
                log.exception("config reload (%s) of %s failed", source, self.vip_dir)
                return self._reload_failed(source, [f"{self.vip_dir}: reload failed unexpectedly: {exc!r}"])
            self.mark_dirty()
            return result

    def _dir_warnings(self) -> list[str]:
        """Logged on every load and kept in last_reload: a skipped entry or a file anyone may
        rewrite is not an error, but the operator must hear of it."""
        warnings = [str(w) for w in vip_dir_warnings(self.vip_dir)]
        for w in warnings:
            self.events.emit("config_warning", w, level="warning")
        return warnings

    def _reload_failed(self, source: str, problems: list[str]) -> ReloadResult:
        result = ReloadResult(False, time.time(), source, problems, warnings=self._dir_warnings())
        self.last_reload = result
        self.metrics.reloads[False] = self.metrics.reloads.get(False, 0) + 1
        self.events.emit(
            "config_rejected",
            f"config reload ({source}) rejected, still serving the last good config: " + "; ".join(problems),
            level="error",
        )
        return result

    def fixed_table_capacity(self) -> int | None:
        """The open forwarder's tables map size (fixed until a restart), which every reload and
        API candidate set must fit; None before the forwarder is open (the node file's then)."""
        if not self._forwarder_open:
            return None
        capacity = getattr(self.forwarder, "table_capacity", None)
        return capacity if isinstance(capacity, int) else None

    def _install_vips(self, sources: dict[str, tuple[Path, VipConfig]], source: str) -> ReloadResult:
        new = {name: vip for name, (_, vip) in sources.items()}
        old = self.vips
        result = ReloadResult(
            True,
            time.time(),
            source,
            added=sorted(set(new) - set(old)),
            removed=sorted(set(old) - set(new)),
            changed=sorted(n for n in set(new) & set(old) if new[n] != old[n]),
            warnings=self._dir_warnings(),
        )
        targets = health_targets(new)
        # Kept backends keep their verdict, whatever changed about their check (node.handover).
        inherit = handover(self.targets, self._health_map(), targets, self.health.snapshot())
        self.health.update(set(targets.values()), inherit)
        self.vips = new
        self.vip_sources = {name: path for name, (path, _) in sources.items()}
        self.targets = targets
        self._owners: dict[Any, list[tuple[str, str]]] = {}  # target -> (vip, backend key)
        for pair, target in self.targets.items():
            self._owners.setdefault(target, []).append(pair)
        self._mark_vips(result.added + result.changed)
        # Backends of VIPs without a health check: a static pool, always UP.
        self._static_pairs = {(v.name, b.key) for v in new.values() if v.health_check is None for b in v.backends}
        keys = {(v.name, b.key) for v in new.values() for b in v.backends}
        dropped = [k for k in self.overrides if k not in keys]
        for k in dropped:
            del self.overrides[k]
        if dropped:
            self._save_state()
        self.last_reload = result
        self.metrics.reloads[True] = self.metrics.reloads.get(True, 0) + 1
        self._watch_signature = self._dir_signature()
        self.events.emit(
            "config_applied",
            f"config applied ({source}): {len(new)} VIP(s); added {result.added or 'none'}, "
            f"removed {result.removed or 'none'}, changed {result.changed or 'none'}",
        )
        return result

    # ------------------------------------------------------------------ operator actions

    def set_backend_state(self, vip: str, backend: str, state: AdminState | None) -> None:
        """Override a backend's admin state (None: back to the config's state). Persisted, so a
        drained backend stays drained across a controller restart."""
        if vip not in self.vips:
            raise KeyError(f"no VIP named {vip!r}")
        if not any(b.key == backend for b in self.vips[vip].backends):
            keys = ", ".join(b.key for b in self.vips[vip].backends)
            raise KeyError(f"VIP {vip!r} has no backend {backend!r} (backends: {keys})")
        if state is None:
            self.overrides.pop((vip, backend), None)
        else:
            self.overrides[(vip, backend)] = state
        self._mark_vips([vip])
        self._save_state()
        self.events.emit(
            "backend_admin",
            f"backend {backend} of VIP {vip} set to {state or 'its configured state'} by operator",
            vip=vip,
            backend=backend,
        )
        self.mark_dirty()

    def set_node_drained(self, drained: bool) -> None:
        self.node_drained = drained
        self._save_state()
        self.events.emit(
            "node_drain" if drained else "node_undrain",
            "node drained by operator: every VIP withdrawn, existing flows keep forwarding"
            if drained
            else "node undrained by operator: VIPs announced again where healthy",
        )
        self.mark_dirty()

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.events.emit("state_unreadable", f"ignoring unreadable {self.state_file}: {exc}", level="warning")
            return
        self.node_drained = bool(data.get("node_drained", False))
        for vip, backends in data.get("overrides", {}).items():
            for key, state in backends.items():
                if state in ("active", "drain", "disabled"):
                    self.overrides[(vip, key)] = state

    def _save_state(self) -> None:
        overrides: dict[str, dict[str, str]] = {}
        for (vip, key), state in sorted(self.overrides.items()):
            overrides.setdefault(vip, {})[key] = state
        atomic_write(self.state_file, json.dumps({"node_drained": self.node_drained, "overrides": overrides}, indent=2))

    # ------------------------------------------------------------------ views for the API

    def status(self) -> dict[str, Any]:
        desired = self.desired
        vips = desired.vips if desired else {}
        return {
            "node_id": self.config.node_id,
            "uptime": round(self.clock() - self.started_at, 1),
            "warmup_over": self.warmup_over,
            "node_drained": self.node_drained,
            "forwarder": {
                "ok": self.self_test.ok and self.forwarder_error is None,
                "mode": self.attach_mode,
                "interfaces": self.config.forwarder.interfaces,
                "last_self_test": {"ok": self.self_test.ok, "reason": self.self_test.reason, "at": self.self_test.at},
                "error": self.forwarder_error,
            },
            "bgp": self.speaker.status(),
            "vips": {
                name: {"announced": d.announce, "reason": d.reason, "serving": len(d.serving),
                       "backends": len(d.backends), "digest": d.table.digest() if d.table else None}
                for name, d in vips.items()
            },
            "last_reload": self.last_reload.__dict__ if self.last_reload else None,
            "tasks": self.supervisor.status(),
            "recent_events": list(self.events.recent)[-20:],
        }

    def vip_view(self, name: str, counters: dict[str, Any] | None = None) -> dict[str, Any]:
        vip = self.vips[name]
        d = self.desired.vips.get(name) if self.desired else None
        snapshot = self.health.snapshot()
        shares = _shares(d) if d else {}
        total_weight = sum(b.weight for b in d.backends if b.serving) if d else 0
        vip_counters = (counters or {}).get("vips", {}).get(name, {})
        # Per (VIP, backend): a backend shared by several VIPs has figures of its own in each.
        backend_counters = (counters or {}).get("vip_backends", {}).get(name, {})
        backends = []
        for b in vip.backends:
            bd = next((x for x in d.backends if x.key == b.key), None) if d else None
            target = self.targets.get((name, b.key))
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
                "last_reason": getattr(last, "reason", None) if target is not None else "no health check (static)",
                "last_latency": getattr(last, "latency", None),
                "table_share": shares.get(b.key, 0.0),
                "expected_share": (b.weight / total_weight) if bd and bd.serving and total_weight else 0.0,
                "counters": backend_counters.get(b.key, {}),
            })
        return {
            "name": name,
            "address": str(vip.address),
            "protocol": vip.protocol,
            "port": vip.port,
            "table_size": vip.table_size,
            "source": str(self.vip_sources.get(name, "")),
            "announced": d.announce if d else False,
            "reason": d.reason if d else "not reconciled yet",
            "digest": d.table.digest() if d and d.table else None,
            "backends": backends,
            "counters": vip_counters,
            "config": vip.model_dump(mode="json"),
        }


# ---------------------------------------------------------------------- helpers


class HealthView(Mapping):
    """(vip, backend key) -> Health, read through the targets: static pools are UP, a target
    without a verdict yet is UNKNOWN."""

    def __init__(self, verdict: dict, targets: dict, static: list) -> None:
        self.verdicts, self._targets, self._static = verdict, targets, static

    def __getitem__(self, pair: tuple[str, str]) -> Health:
        target = self._targets.get(pair)
        if target is None:
            if pair in self._static:
                return Health.UP
            raise KeyError(pair)
        return self.verdicts.get(target, Health.UNKNOWN)

    def __iter__(self):
        yield from self._targets
        yield from self._static

    def __len__(self) -> int:
        return len(self._targets) + len(self._static)


def _resolve(path: Path, base: Path | None) -> Path:
    return path if path.is_absolute() or base is None else base / path


def _health_of(state: Any) -> Health:
    name = getattr(state, "name", str(state)).upper()
    return {"UP": Health.UP, "DOWN": Health.DOWN}.get(name, Health.UNKNOWN)


def _shares(d: VipDecision) -> dict[str, float]:
    return d.table.shares() if d.table is not None and d.table.backends else {}


def health_targets(vips: dict[str, VipConfig]) -> dict[tuple[str, str], Any]:
    """(vip, backend key) -> health Target. Identical targets of several VIPs compare equal, so
    the monitor probes each once."""
    from healthcheck import Target

    out = {}
    for vip in vips.values():
        if vip.health_check is None:
            continue
        for b in vip.backends:
            out[(vip.name, b.key)] = Target(b.address, vip.backend_port(b), vip.health_check)
    return out


def forwarder_spec(d: VipDecision) -> Any:
    from node.forwarder.loader import BackendSpec, VipSpec

    # The table goes as the builder made it: backend keys and an array of indexes into them.
    keys = d.table.backends if d.table is not None else ()
    return VipSpec(
        name=d.vip.name,
        address=d.vip.address,
        protocol=d.vip.protocol,
        port=d.vip.port,
        backends=tuple(BackendSpec(key=b.key, address=b.address, state=b.data_state) for b in d.backends),
        table_keys=keys,
        table_entries=d.table.entries if keys else (),
        table_gone=getattr(d.table, "gone", frozenset()) if keys else frozenset(),
    )


def routes_for(desired: Desired) -> list[Any]:
    """One route per announced VIP address. Several VIPs on one address share the /32: it is
    announced when any of them is, with the attributes of the first (by name)."""
    from bgp.routes import Route

    by_prefix: dict[str, Any] = {}
    for name in sorted(desired.vips):
        d = desired.vips[name]
        if not d.announce or d.vip.prefix in by_prefix:
            continue
        by_prefix[d.vip.prefix] = Route(
            prefix=ipaddress.ip_network(d.vip.prefix),
            med=d.vip.announce.med,
            communities=tuple(d.vip.announce.communities),
        )
    return list(by_prefix.values())


def atomic_write(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
