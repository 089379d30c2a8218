"""The controller's rules with fake components: warm-up gate, min_healthy, forwarder failure,
drain semantics, reload keeping the last good config, digest-based no-op."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from healthcheck import State, TargetStatus
from node.config import parse_node_object
from node.controller import Controller
from node.events import EventLog
from node.maglev import StopGapTable, build_table
from node.self_test import CYCLE, SAMPLE, SAMPLE_MIN

REPO = Path(__file__).resolve().parents[2]


@dataclass
class FakeResult:
    ok: bool
    reason: str


class FakeHealth:
    def __init__(self, callback):
        self.callback = callback
        self.targets: set = set()
        self.states: dict = {}
        self.started = False

    async def start(self):
        self.started = True

    async def stop(self):
        self.started = False

    def update(self, targets, inherit=None):
        # Like the monitor: a new target starts from what it takes over, else UNKNOWN.
        for new, old in (inherit or {}).items():
            if new not in self.targets:
                self.states[new] = old if isinstance(old, State) else self.states.get(old, State.UNKNOWN)
        self.targets = set(targets)

    def snapshot(self):
        return {t: TargetStatus(self.states.get(t, State.UNKNOWN), 0.0, None, 0, None) for t in self.targets}

    def set(self, address: str, state: State):
        for t in self.targets:
            if str(t.address) == address:
                self.states[t] = state


class FakeSpeaker:
    def __init__(self):
        self.desired: list = []
        self.history: list[list[str]] = []
        self.stopped = None
        self.kept_routes = None
        self.ready = 0  # routes_ready() calls

    async def start(self):
        pass

    async def stop(self, graceful=True, keep_routes=False):
        self.stopped = graceful
        self.kept_routes = keep_routes
        if not keep_routes:
            self.desired = []

    def routes_ready(self):
        self.ready += 1

    def set_desired(self, routes):
        self.desired = list(routes)
        self.history.append(sorted(str(r.prefix) for r in self.desired))

    def announced(self):
        return {str(r.prefix) for r in self.desired}

    def status(self):
        return {"sessions": {}}

    healthy = True

    @property
    def prefixes(self):
        return sorted(str(r.prefix) for r in self.desired)


class FakeForwarder:
    def __init__(self):
        self.syncs: list = []
        self.changed: list = []
        self.tested: list = []
        self.result = FakeResult(True, "all VIPs forwarded")
        self.fail_sync = False
        self.attached = False

    def open(self):
        pass

    def attach(self):
        self.attached = True
        return "native"

    def sync(self, specs, changed=None):
        if self.fail_sync:
            raise OSError("map update failed")
        self.syncs.append(specs)
        self.changed.append(None if changed is None else sorted(changed))

    def self_test(self, vips=None):
        self.tested.append(None if vips is None else sorted(vips))
        return self.result

    def counters(self):
        return {}

    def detach(self):
        self.attached = False

    def close(self):
        pass

    @property
    def last(self) -> dict:
        return {s["name"]: s for s in self.syncs[-1]}


def spec(d):
    table = d.table.entry_keys() if d.table else []
    return {"name": d.vip.name, "states": {b.key: b.data_state for b in d.backends}, "table": table}


def vip(name="web", address="10.100.0.1", backends=("10.0.1.1", "10.0.1.2", "10.0.1.3"), check=True, **extra):
    data = {"name": name, "address": address, "port": 80, "table_size": 251,
            "backends": [{"address": a} for a in backends], **extra}
    if check:
        data["health_check"] = {"type": "tcp", "interval": 1, "timeout": 0.5}
    return data


class Env:
    def __init__(self, tmp_path: Path, vips: list[dict], warmup: float = 10.0):
        self.tmp = tmp_path
        self.vip_dir = tmp_path / "vips"
        self.vip_dir.mkdir()
        self.write("main.yaml", vips)
        node = yaml.safe_load((REPO / "configs/node.yaml").read_text())
        node["vip_dir"] = str(self.vip_dir)
        node["run_dir"] = str(tmp_path / "run")
        node["warmup"] = warmup
        node.pop("api")
        self.config = parse_node_object(node, "node.yaml")
        self.now = 0.0
        self.speaker = FakeSpeaker()
        self.forwarder = FakeForwarder()
        self.health: FakeHealth | None = None

        def health_factory(cb):
            self.health = FakeHealth(cb)
            return self.health

        self.events = EventLog()
        self.c = Controller(self.config, health_factory=health_factory, speaker=self.speaker,
                            forwarder=self.forwarder, events=self.events, clock=lambda: self.now,
                            spec_builder=spec)

    def write(self, name: str, vips: list[dict]) -> None:
        (self.vip_dir / name).write_text(yaml.safe_dump({"vips": vips}))

    async def start(self):
        # Only what reconcile needs; the background loops are exercised by integration tests.
        self.c.run_dir.mkdir(parents=True, exist_ok=True)
        from node.config import load_vip_sources

        self.c._install_vips(load_vip_sources(self.vip_dir), "startup")
        self.health.update(set(self.c.targets.values()))
        await self.c.run_self_test()

    def event_names(self):
        return [e["event"] for e in self.events.recent]


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path, [vip()])


async def test_warmup_gate_no_announce_no_table_on_unknown(env):
    await env.start()
    d = await env.c.reconcile()
    assert not d.vips["web"].announce and "warming up" in d.vips["web"].reason
    assert env.forwarder.syncs == []  # nothing programmed while health is unknown
    assert env.speaker.prefixes == []


async def test_announce_when_every_backend_known(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2"):
        env.health.set(a, State.UP)
    env.health.set("10.0.1.3", State.DOWN)
    d = await env.c.reconcile()
    assert d.vips["web"].announce
    assert env.speaker.prefixes == ["10.100.0.1/32"]
    assert env.forwarder.last["web"]["states"] == {"10.0.1.1": "active", "10.0.1.2": "active", "10.0.1.3": "down"}
    assert set(env.forwarder.last["web"]["table"]) == {"10.0.1.1", "10.0.1.2"}


async def test_warmup_time_passes_with_unknown_backends(env):
    await env.start()
    env.health.set("10.0.1.1", State.UP)
    await env.c.reconcile()
    assert not env.c.warmup_over
    env.now = 10.0
    d = await env.c.reconcile()
    assert env.c.warmup_over and d.vips["web"].announce
    assert set(env.forwarder.last["web"]["table"]) == {"10.0.1.1"}


async def test_min_healthy(tmp_path):
    e = Env(tmp_path, [vip(announce={"min_healthy": 2})])
    await e.start()
    e.health.set("10.0.1.1", State.UP)
    e.health.set("10.0.1.2", State.DOWN)
    e.health.set("10.0.1.3", State.DOWN)
    d = await e.c.reconcile()
    assert not d.vips["web"].announce
    assert d.vips["web"].reason == "1 serving backend(s), fewer than min_healthy 2"
    e.health.set("10.0.1.2", State.UP)
    assert (await e.c.reconcile()).vips["web"].announce
    assert e.speaker.prefixes == ["10.100.0.1/32"]


async def test_all_backends_down_withdraws_and_programs_empty_table(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.DOWN)
    d = await env.c.reconcile()
    assert not d.vips["web"].announce and env.speaker.prefixes == []
    assert env.forwarder.last["web"]["table"] == []


async def test_forwarder_self_test_failure_withdraws_all(tmp_path):
    e = Env(tmp_path, [vip(), vip("api", "10.100.0.2")])
    await e.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        e.health.set(a, State.UP)
    await e.c.reconcile()
    assert e.speaker.prefixes == ["10.100.0.1/32", "10.100.0.2/32"]
    e.forwarder.result = FakeResult(False, "VIP web: verdict XDP_PASS, expected XDP_TX")
    await e.c.run_self_test()
    d = await e.c.reconcile()
    assert e.speaker.prefixes == []
    assert d.vips["api"].reason == "forwarder unhealthy: VIP web: verdict XDP_PASS, expected XDP_TX"
    assert "forwarder_self_test_failed" in e.event_names()
    e.forwarder.result = FakeResult(True, "ok")
    await e.c.run_self_test()
    await e.c.reconcile()
    assert e.speaker.prefixes == ["10.100.0.1/32", "10.100.0.2/32"]


async def test_forwarder_sync_error_withdraws(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    env.forwarder.fail_sync = True
    d = await env.c.reconcile()
    assert not d.vips["web"].announce and "programming the forwarder failed" in d.vips["web"].reason
    env.forwarder.fail_sync = False
    env.c.mark_dirty()
    d = await env.c.reconcile()
    assert d.vips["web"].announce


async def test_drain_keeps_flows_takes_no_entries(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    env.c.set_backend_state("web", "10.0.1.2", "drain")
    await env.c.reconcile()
    last = env.forwarder.last["web"]
    assert last["states"]["10.0.1.2"] == "drain"
    assert "10.0.1.2" not in set(last["table"])
    env.c.set_backend_state("web", "10.0.1.3", "disabled")
    await env.c.reconcile()
    assert env.forwarder.last["web"]["states"]["10.0.1.3"] == "down"
    # Persisted across a restart of the controller.
    assert '"10.0.1.2": "drain"' in (env.c.run_dir / "state.json").read_text()


async def test_node_drain_withdraws_but_keeps_forwarding(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    syncs = len(env.forwarder.syncs)
    env.c.set_node_drained(True)
    d = await env.c.reconcile()
    assert env.speaker.prefixes == [] and d.vips["web"].reason == "node drained by operator"
    assert len(env.forwarder.syncs) == syncs  # tables untouched: existing and new flows still forwarded
    env.c.set_node_drained(False)
    await env.c.reconcile()
    assert env.speaker.prefixes == ["10.100.0.1/32"]


async def test_unchanged_inputs_are_a_no_op(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    syncs, routes = len(env.forwarder.syncs), len(env.speaker.history)
    for _ in range(3):
        await env.c.reconcile()
    assert len(env.forwarder.syncs) == syncs and len(env.speaker.history) == routes


async def test_reload_error_keeps_last_good(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    syncs = len(env.forwarder.syncs)
    env.write("broken.yaml", [vip("bad", "10.100.0.9", table_size=100)])
    result = await env.c.reload("test")
    assert not result.ok and "table_size 100 is not prime" in result.problems[0]
    assert "broken.yaml" in result.problems[0]
    await env.c.reconcile()
    assert sorted(env.c.vips) == ["web"] and env.speaker.prefixes == ["10.100.0.1/32"]
    assert len(env.forwarder.syncs) == syncs
    assert "config_rejected" in env.event_names()


async def test_reload_adds_vip_and_keeps_unchanged(env):
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    web_targets = {t for k, t in env.c.targets.items() if k[0] == "web"}
    env.write("more.yaml", [vip("api", "10.100.0.2", backends=("10.0.1.1", "10.0.1.9"))])
    result = await env.c.reload("test")
    assert result.ok and result.added == ["api"] and result.changed == []
    assert web_targets <= env.health.targets  # unchanged checks kept, so their state is kept
    env.health.set("10.0.1.9", State.UP)
    await env.c.reconcile()
    assert env.speaker.prefixes == ["10.100.0.1/32", "10.100.0.2/32"]
    assert set(env.forwarder.last["api"]["table"]) == {"10.0.1.1", "10.0.1.9"}


async def test_static_pool_without_health_check_is_up(tmp_path):
    e = Env(tmp_path, [vip(check=False)])
    await e.start()
    d = await e.c.reconcile()
    assert d.vips["web"].announce and len(d.vips["web"].serving) == 3


async def test_stop_withdraws_gracefully_and_detaches(env):
    await env.start()
    env.forwarder.attached = True
    await env.c.stop()
    assert env.speaker.stopped is True and not env.forwarder.attached


def stop_policy(e: "Env", on_stop: str, graceful_restart: bool) -> None:
    cfg = e.c.config
    gr = cfg.bgp.graceful_restart.model_copy(update={"enabled": graceful_restart})
    e.c.config = cfg.model_copy(update={
        "forwarder": cfg.forwarder.model_copy(update={"on_stop": on_stop}),
        "bgp": cfg.bgp.model_copy(update={"graceful_restart": gr})})


async def test_stop_with_on_stop_keep_and_graceful_restart_keeps_routes_and_forwarder(tmp_path):
    """A planned restart: routes kept (the router helps the restart), forwarder attached."""
    e = Env(tmp_path, [vip()])
    stop_policy(e, "keep", True)
    await e.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        e.health.set(a, State.UP)
    await e.c.reconcile()
    e.forwarder.attached = True
    await e.c.stop()
    assert e.speaker.kept_routes is True and e.speaker.prefixes == ["10.100.0.1/32"]
    assert e.forwarder.attached
    stopping = [ev for ev in e.events.recent if ev["event"] == "node_stopping"]
    assert stopping[0]["keep_routes"] is True and "graceful restart" in stopping[0]["msg"]


@pytest.mark.parametrize("on_stop,gr", [("keep", False), ("detach", True)])
async def test_stop_withdraws_unless_keep_and_graceful_restart(tmp_path, on_stop, gr):
    e = Env(tmp_path, [vip()])
    stop_policy(e, on_stop, gr)
    await e.start()
    await e.c.stop()
    assert e.speaker.stopped is True and e.speaker.kept_routes is False


async def test_routes_ready_only_once_warm_up_is_over(env):
    """End-of-RIB (graceful restart) may follow only the first decision after warm-up: before
    it a router helping a restart would drop the node's routes."""
    await env.start()
    env.health.set("10.0.1.1", State.UP)
    await env.c.reconcile()
    assert not env.c.warmup_over and env.speaker.ready == 0
    for a in ("10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    assert env.c.warmup_over and env.speaker.ready >= 1
    assert env.speaker.prefixes == ["10.100.0.1/32"]


async def test_reload_over_forwarder_capacity_is_rejected(tmp_path):
    e = Env(tmp_path, [vip()])
    fwd = e.c.config.forwarder.model_copy(update={"table_capacity": 4194304})
    e.c.config = e.c.config.model_copy(update={"forwarder": fwd})
    await e.start()
    # 6 x 655373 + 655373 to rebuild in > 4194304
    e.write("big.yaml", [vip(f"v{i}", f"10.100.1.{i}", table_size=655373) for i in range(6)])
    result = await e.c.reload("test")
    assert not result.ok
    assert "forwarder.table_capacity is 4194304: raise forwarder.table_capacity" in result.problems[0]
    assert sorted(e.c.vips) == ["web"]


async def test_reload_reports_directory_warnings(env):
    await env.start()
    (env.vip_dir / "stray.yaml").mkdir()
    result = await env.c.reload("test")
    assert result.ok and result.warnings == [f"{env.vip_dir / 'stray.yaml'}: is a directory, not a VIP file: skipped"]
    assert env.c.status()["last_reload"]["warnings"] == result.warnings
    assert [e for e in env.events.recent if e["event"] == "config_warning"][-1]["level"] == "warning"
    (env.vip_dir / "bad.yaml").write_text("vips: [{{{\n")
    result = await env.c.reload("test")
    assert not result.ok and any("stray.yaml" in w for w in result.warnings)


def many(n: int) -> list[dict]:
    """n VIPs that all share backend 10.0.1.1, each with its own second backend."""
    return [vip(f"v{i:02d}", f"10.100.0.{i + 1}", backends=("10.0.1.1", f"10.0.2.{i + 1}", f"10.0.3.{i + 1}"))
            for i in range(n)]


async def test_a_reconcile_programs_and_self_tests_only_what_changed(tmp_path):
    e = Env(tmp_path, many(40))
    await e.start()
    for t in e.health.targets:
        e.health.states[t] = State.UP
    e.now = 10.0
    await e.c.reconcile()
    assert e.forwarder.changed[-1] is None or len(e.forwarder.changed[-1]) == 40
    e.health.set("10.0.2.5", State.DOWN)  # only v04 has it
    await e.c.reconcile()
    assert e.forwarder.changed[-1] == ["v04"]
    assert e.forwarder.tested[-1] == ["v04"]  # what changed, before it is announced
    await e.c.run_self_test([])  # a periodic round: the next slice of the rotation
    assert len(e.forwarder.tested[-1]) == SAMPLE_MIN  # 40 VIPs x 5 s / 60 s: 4 a round
    assert set(e.forwarder.last["v04"]["table"]) == {"10.0.1.1", "10.0.3.5"}


@pytest.mark.parametrize("count, interval, per_round", [(100, 5.0, 9), (1000, 5.0, SAMPLE), (40, 1.0, SAMPLE_MIN)])
async def test_periodic_self_tests_cover_every_vip_within_the_cycle(tmp_path, count, interval, per_round):
    """The periodic rounds test a slice sized from the VIP count and self_test_interval: every
    VIP is tested within CYCLE seconds of rounds (within VIPs / SAMPLE rounds past SAMPLE x
    CYCLE / interval VIPs), and a round tests no more than that asks."""
    e = Env(tmp_path, [vip(f"v{i:04d}", f"10.{100 + i // 250}.0.{i % 250 + 1}", check=False)
                       for i in range(count)])
    fwd = e.c.config.forwarder.model_copy(update={"self_test_interval": interval})
    e.c.config = e.c.config.model_copy(update={"forwarder": fwd})
    await e.start()
    e.forwarder.tested.clear()
    if count * interval <= SAMPLE * CYCLE:
        rounds = math.floor(CYCLE / interval)  # the documented bound: CYCLE seconds of rounds
    else:
        rounds = math.ceil(count / SAMPLE)
    for _ in range(rounds):
        await e.c.run_self_test([])
    assert {len(t) for t in e.forwarder.tested} == {per_round}
    assert set().union(*e.forwarder.tested) == set(e.c.vips)


async def test_a_backend_shared_by_every_vip_leaves_through_stop_gaps_then_exact_tables(tmp_path):
    e = Env(tmp_path, many(40))
    await e.start()
    for t in e.health.targets:
        e.health.states[t] = State.UP
    e.now = 10.0
    await e.c.reconcile()
    exact_before = {n: d.table for n, d in e.c.desired.vips.items()}
    builds = e.c.tables.builds
    builder = asyncio.create_task(e.c._table_build_loop())
    try:
        e.health.set("10.0.1.1", State.DOWN)
        d = await e.c.reconcile()
        assert e.c.tables.builds == builds  # nothing built on the way to the kernel
        assert sorted(e.forwarder.changed[-1]) == sorted(d.vips)
        for name, dec in d.vips.items():
            assert isinstance(dec.table, StopGapTable) and dec.table.gone == {"10.0.1.1"}
            keys = e.forwarder.last[name]["table"]
            assert "10.0.1.1" not in keys
            # only the shared backend's entries moved
            old = exact_before[name].entry_keys()
            assert all(a == b for a, b in zip(old, keys) if a != "10.0.1.1")
        for _ in range(500):  # the exact tables are built off the loop, then marked dirty
            if e.c.tables.builds >= builds + 40 and e.c._dirty.is_set():
                break
            await asyncio.sleep(0.01)
        d = await e.c.reconcile()
        for name, dec in d.vips.items():
            assert not isinstance(dec.table, StopGapTable)
            assert dec.table.digest() == build_table(
                {f"10.0.2.{int(name[1:]) + 1}": 1.0, f"10.0.3.{int(name[1:]) + 1}": 1.0}, 251).digest()
            assert "10.0.1.1" not in e.forwarder.last[name]["table"]
        assert "tables_rebuilt" in e.event_names()  # 40 tables: one summary event, not 40
    finally:
        builder.cancel()
