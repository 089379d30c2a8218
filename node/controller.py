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
from typing import Any, Callable

from node.config import (
    ConfigError,
    NodeConfig,
    VipConfig,
    vip_dir_warnings,
    vip_files,
)
from node.events import EventLog
from node.handover import handover
from node.metrics import NodeMetrics
from node.ports import ForwarderPort, HealthPort, SpeakerPort
from node.reconcile import AdminState, Desired, Health, Inputs, TableCache, VipDecision, decide
from node.supervisor import Supervisor
from node.vip_reader import VipReader

log = logging.getLogger("maglev.controller")

RECONCILE_DEBOUNCE = 0.02
WATCH_INTERVAL = 1.0


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
        self.events = events or EventLog(config.log_format)
        self.health = health_factory(self._on_health_transition)
        self.speaker = speaker
        self.forwarder = forwarder
        self.spec_builder = spec_builder or forwarder_spec
        self.vip_dir = _resolve(config.vip_dir, base_dir)
        self.run_dir = _resolve(config.run_dir, base_dir)
        self.state_file = self.run_dir / "state.json"

        self.vips: dict[str, VipConfig] = {}
        self.vip_sources: dict[str, Path] = {}
        self.targets: dict[tuple[str, str], Any] = {}  # (vip, backend key) -> health Target
        self.overrides: dict[tuple[str, str], AdminState] = {}
        self.node_drained = False
        self.self_test = SelfTest(False, "not run yet", 0.0)
        self.forwarder_error: str | None = None
        self.attach_mode: str | None = None
        self.started_at = clock()
        self.warmup_over = False
        self.last_reload: ReloadResult | None = None
        self.desired: Desired | None = None
        self.tables = TableCache()
        self.metrics = NodeMetrics()

        self._dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self.supervisor = Supervisor(self.events)
        self.reader = VipReader()
        self._reload_lock = asyncio.Lock()  # one reload at a time, whoever asks
        self._reload_wanted = asyncio.Event()  # SIGHUP: the watcher reloads on its next turn
        self._self_test_lock = asyncio.Lock()  # the periodic and the post-sync self-test
        self._applied_forwarder: tuple | None = None
        self._applied_routes: tuple | None = None
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
        await asyncio.to_thread(self.forwarder.open)
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

    # ------------------------------------------------------------------ inputs

    def _on_health_transition(self, transition: Any) -> None:
        owners = [k for k, t in self.targets.items() if t == transition.target]
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
        snapshot = self.health.snapshot()
        out: dict[tuple[str, str], Health] = {}
        for vip in self.vips.values():
            for b in vip.backends:
                target = self.targets.get((vip.name, b.key))
                if target is None:  # no health check configured: a static pool
                    out[(vip.name, b.key)] = Health.UP
                    continue
                status = snapshot.get(target)
                out[(vip.name, b.key)] = _health_of(status.state) if status else Health.UNKNOWN
        return out

    def _inputs(self) -> Inputs:
        forwarder_ok = self.self_test.ok and self.forwarder_error is None
        reason = self.forwarder_error or self.self_test.reason
        return Inputs(
            vips=self.vips,
            health=self._health_map(),
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
            except Exception as exc:  # never let one bad apply kill the node; report and retry
                self.events.emit("reconcile_failed", f"reconcile failed: {exc!r}; retrying in 1 s", level="error")
                await asyncio.sleep(1)
                self.mark_dirty()

    async def reconcile(self) -> Desired:
        with self.metrics.reconcile_duration.time():
            return await self._reconcile()

    async def _reconcile(self) -> Desired:
        self._check_warmup(self._health_map())
        desired = decide(self._inputs(), self.tables)
        if self.warmup_over:
            if await self._apply_forwarder(desired):
                # New tables are announced only once a self-test has run over them.
                await self.run_self_test()
            # A failed sync or self-test flips forwarder health; decide again so BGP sees it.
            desired = decide(self._inputs(), self.tables)
        self._apply_routes(desired)
        self._log_decisions(desired)
        self.desired = desired
        return desired

    async def _apply_forwarder(self, desired: Desired) -> bool:
        """Program the forwarder if the desired tables or backend states changed; True if it
        was programmed."""
        key = tuple(
            (
                name,
                d.vip.identity,
                tuple((b.key, str(b.address), b.data_state) for b in d.backends),
                d.table.digest() if d.table else "",
            )
            for name, d in desired.vips.items()
        )
        if key == self._applied_forwarder:
            return False
        specs = [self.spec_builder(d) for d in desired.vips.values()]
        started = time.perf_counter()
        try:
            await asyncio.to_thread(self.forwarder.sync, specs)
        except Exception as exc:
            self.forwarder_error = f"programming the forwarder failed: {exc}"
            self.events.emit("forwarder_sync_failed", self.forwarder_error + "; every VIP is withdrawn until it succeeds", level="error")
            self._applied_forwarder = None
            return False
        self.metrics.observe_sync(time.perf_counter() - started)
        if self.forwarder_error:
            self.events.emit("forwarder_sync_ok", "forwarder programmed again")
        self.forwarder_error = None
        self._applied_forwarder = key
        for name, d in desired.vips.items():
            digest = d.table.digest() if d.table else ""
            if self._logged_tables.get(name) != digest:
                self._logged_tables[name] = digest
                shares = _shares(d)
                self.events.emit(
                    "table_rebuilt",
                    f"VIP {name}: table {digest} over {len(d.serving)} backend(s)",
                    vip=name,
                    digest=digest,
                    shares=",".join(f"{k}={v:.1%}" for k, v in shares.items()) or "none",
                )
        return True

    def _apply_routes(self, desired: Desired) -> None:
        routes = routes_for(desired)
        key = tuple(sorted((str(r.prefix), r.med, r.communities) for r in routes))
        if key != self._applied_routes:
            self.speaker.set_desired(routes)
            self._applied_routes = key

    def _log_decisions(self, desired: Desired) -> None:
        for name, d in desired.vips.items():
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
        for name in list(self._logged_vip):
            if name not in desired.vips:
                del self._logged_vip[name]
                self._logged_tables.pop(name, None)

    # ------------------------------------------------------------------ periodic work

    async def _self_test_loop(self) -> None:
        while True:
            await self.run_self_test()
            await asyncio.sleep(self.config.forwarder.self_test_interval)

    async def run_self_test(self) -> SelfTest:
        """One self-test at a time. A failure is acted on (every VIP withdrawn) only when a
        fresh run fails too: a single glitch on every node at once must not take the fleet's
        VIPs down; it is reported and counted."""
        async with self._self_test_lock:
            ok, reason = await self._self_test_once()
            if not ok:
                first = reason
                ok, reason = await self._self_test_once()
                if ok:
                    self.metrics.self_test_glitches += 1
                    self.events.emit(
                        "forwarder_self_test_glitch",
                        f"forwarder self-test failed once ({first}) and passed on a fresh run; not acted on",
                        level="warning",
                    )
            return self._record_self_test(ok, reason)

    async def _self_test_once(self) -> tuple[bool, str]:
        try:
            result = await asyncio.to_thread(self.forwarder.self_test)
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
                sources = await self.reader.read(self.vip_dir, self.config)
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

    table: list[str] = []
    if d.table is not None and d.table.backends:
        keys = d.table.backends
        table = [keys[i] for i in d.table.entries]
    return VipSpec(
        name=d.vip.name,
        address=d.vip.address,
        protocol=d.vip.protocol,
        port=d.vip.port,
        backends=tuple(BackendSpec(key=b.key, address=b.address, state=b.data_state) for b in d.backends),
        table=table,
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
