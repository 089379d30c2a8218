"""A backend shared by every VIP going down, with the real forwarder's maps (program loaded,
nothing attached, no traffic): every affected live table gets the stop-gap at once, before any
reconcile (node.stop_gaps), equal on two nodes and to the pure model (maglev.StopGapTable);
the reconcile that follows finds the tables patched and takes the backend out of service; the
exact tables then replace the stop-gaps. A backend back up before the reconcile gets its
entries back. An operator drain takes the same path."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import yaml

from healthcheck import State
from healthcheck.types import Transition
from node.config import load_vip_sources, parse_node_object
from node.controller import Controller
from node.events import EventLog
from node.forwarder import maps
from node.forwarder.testing import temp_forwarder
from node.maglev import StopGapTable, build_table
from tests.unit.test_controller import FakeHealth, FakeSpeaker

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SHARED = "10.97.0.1"
NVIPS = 10  # more than the controller builds inline (INLINE_BUILDS): the stop-gaps stay a while


def own(i: int) -> list[str]:
    return [f"10.97.{1 + i}.{j}" for j in range(1, 4)]


def vip_obj(i: int) -> dict:
    return {"name": f"v{i:02d}", "address": f"10.96.0.{i + 1}", "port": 80, "table_size": 251,
            "backends": [{"address": a} for a in [SHARED, *own(i)]],
            "health_check": {"type": "tcp", "interval": 1, "timeout": 0.5}}


class Node:
    """A controller on a real forwarder's maps, with fake health checks and BGP."""

    def __init__(self, root: Path, forwarder) -> None:
        vip_dir = root / "vips"
        vip_dir.mkdir(parents=True)
        (vip_dir / "vips.yaml").write_text(yaml.safe_dump({"vips": [vip_obj(i) for i in range(NVIPS)]}))
        node = yaml.safe_load((REPO / "configs/node.yaml").read_text())
        node.update(vip_dir=str(vip_dir), run_dir=str(root / "run"), warmup=30)
        node.pop("api")
        self.forwarder = forwarder
        self.c = Controller(parse_node_object(node, "node.yaml"), health_factory=self._health,
                            speaker=FakeSpeaker(), forwarder=forwarder, events=EventLog())
        self.c.run_dir.mkdir(parents=True)
        self.c._install_vips(load_vip_sources(vip_dir), "startup")
        self.health.update(set(self.c.targets.values()))
        self.c._forwarder_open = True  # opened by the fixture (start() would also attach it)
        self.lane = None

    def _health(self, callback):
        self.health = FakeHealth(callback)
        return self.health

    async def up(self) -> None:
        for t in self.health.targets:
            self.health.states[t] = State.UP
        await self.c.reconcile()
        self.lane = asyncio.create_task(self.c.stop_gaps.run())

    def transition(self, address: str, new: State) -> None:
        target = next(t for t in self.health.targets if str(t.address) == address)
        old = self.health.states[target]
        self.health.states[target] = new
        self.c._on_health_transition(Transition(target, old, new, "test", (), False))

    async def patched(self, count: int) -> None:
        for _ in range(500):
            if self.c.stop_gaps.tables_patched >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.c.stop_gaps.tables_patched} of {count} tables patched")

    def keys(self, vip: str) -> list[str]:
        """The VIP's live table in the kernel, as backend keys."""
        f = self.forwarder
        by_id = {bid: key for (v, key), bid in f.backend_ids.items() if v == vip}
        return [by_id[i] for i in f.table_ids(f.vip_id(vip))]

    def live_slot(self, vip: str) -> tuple[int, int]:
        meta = self.forwarder._meta(self.forwarder.vip_id(vip))
        return meta.active, meta.slot[meta.active & 1].offset

    def state_of(self, vip: str, key: str) -> int:
        return self.forwarder._be_mirror[self.forwarder.backend_id(vip, key)][2]

    def stop(self) -> None:
        if self.lane is not None:
            self.lane.cancel()


@contextlib.asynccontextmanager
async def one_node(tmp_path: Path):
    """A Node on a forwarder of its own, its backends up and its stop-gap lane running."""
    with temp_forwarder() as f:
        n = Node(tmp_path / "n", f)
        try:
            await n.up()
            yield n
        finally:
            n.stop()


def names() -> list[str]:
    return [f"v{i:02d}" for i in range(NVIPS)]


def exact(i: int, without: set[str] = frozenset()) -> object:
    return build_table({a: 1 for a in [SHARED, *own(i)] if a not in without}, 251)


async def test_shared_backend_down_every_table_gets_the_stop_gap_equal_on_two_nodes(tmp_path):
    shared = SHARED
    with temp_forwarder() as f1, temp_forwarder() as f2:
        nodes = [Node(tmp_path / "n1", f1), Node(tmp_path / "n2", f2)]
        try:
            for n in nodes:
                await n.up()
            for i, name in enumerate(names()):
                assert nodes[0].keys(name) == exact(i).entry_keys()
            slots = {name: nodes[0].live_slot(name) for name in names()}
            for n in nodes:
                n.transition(SHARED, State.DOWN)
            for n in nodes:
                await n.patched(NVIPS)
            # Before any reconcile: every table is the stop-gap of the one it had, patched in
            # place (no flip), the same on both nodes; the backend drains (the data path's
            # stop-gap, set first; its existing flows stay until the sync applies "down").
            for i, name in enumerate(names()):
                want = StopGapTable.of(exact(i), {shared}).entry_keys()
                assert nodes[0].keys(name) == nodes[1].keys(name) == want
                assert shared not in want
                assert nodes[0].live_slot(name) == slots[name]
                assert nodes[0].state_of(name, shared) == maps.BE_STATE_DRAIN
            # The reconcile decides the same stop-gap, finds it written, and takes the backend
            # out of service; the self-test before announcing passes.
            for n in nodes:
                desired = await n.c.reconcile()
                assert all(isinstance(d.table, StopGapTable) for d in desired.vips.values())
                assert n.c.self_test.ok, n.c.self_test.reason
            for i, name in enumerate(names()):
                assert nodes[0].keys(name) == StopGapTable.of(exact(i), {shared}).entry_keys()
                assert nodes[0].state_of(name, shared) == maps.BE_STATE_DOWN
            # The exact tables of the smaller pools follow from the builder.
            for n in nodes:
                n.c.tables.add(n.c.tables.build(n.c.tables.take_pending()))
                n.c._mark_vips(None)
                await n.c.reconcile()
            for i, name in enumerate(names()):
                assert nodes[0].keys(name) == nodes[1].keys(name) == exact(i, {SHARED}).entry_keys()
        finally:
            for n in nodes:
                n.stop()


async def test_a_backend_up_again_before_the_reconcile_gets_its_entries_back(tmp_path):
    async with one_node(tmp_path) as n:
        n.transition(SHARED, State.DOWN)
        await n.patched(NVIPS)
        assert SHARED not in n.keys("v00")
        assert n.state_of("v00", SHARED) == maps.BE_STATE_DRAIN
        n.transition(SHARED, State.UP)  # the decision is what was programmed last again
        await n.c.reconcile()
        for i, name in enumerate(names()):
            assert n.keys(name) == exact(i).entry_keys()
            assert n.state_of(name, SHARED) == maps.BE_STATE_ACTIVE
        assert n.c.self_test.ok, n.c.self_test.reason


async def test_an_operator_drain_leaves_the_live_table_at_once(tmp_path):
    async with one_node(tmp_path) as n:
        key = own(3)[0]
        n.c.set_backend_state("v03", key, "drain")
        await n.patched(1)
        assert n.keys("v03") == StopGapTable.of(exact(3), {key}).entry_keys()
        assert n.keys("v04") == exact(4).entry_keys()  # the other VIPs are left alone
        await n.c.reconcile()
        assert key not in n.keys("v03")
        assert n.state_of("v03", key) == maps.BE_STATE_DRAIN


def test_a_table_whose_last_backend_leaves_is_left_to_the_reconcile() -> None:
    """drop_from_tables never empties a table (the reconcile withdraws such a VIP), and
    ignores VIPs and backends it does not know."""
    from ipaddress import ip_address

    from node.forwarder.loader import BackendSpec, VipSpec

    table = build_table({"a": 1, "b": 1}, 251)
    spec = VipSpec("v", ip_address("10.96.1.1"), "tcp", 80,
                   (BackendSpec("a", ip_address("10.97.9.1"), "active"),
                    BackendSpec("b", ip_address("10.97.9.2"), "active")),
                   table_keys=table.backends, table_entries=table.entries)
    with temp_forwarder() as f:
        f.sync([spec])
        before = f.table_ids(f.vip_id("v"))
        assert f.drop_from_tables({"v": {"a", "b"}, "nope": {"a"}}) == []
        assert f.drop_from_tables({"v": {"zz"}}) == []
        assert f.table_ids(f.vip_id("v")) == before
        assert f.drop_from_tables({"v": {"a"}}) == ["v"]
        assert set(f.table_ids(f.vip_id("v"))) == {f.backend_id("v", "b")}


def test_a_draining_backend_is_out_of_every_table_before_any_table_is_rewritten() -> None:
    """stop_serving alone (the first step of node.stop_gaps): packets through the real program
    go where the stop-gap table sends them, while the table in the kernel still names the lost
    backend. A VIP that would lose more than half of its active backends is left alone (to the
    table patch), one that would lose its last one included."""
    from ipaddress import ip_address

    from node.forwarder import model as M
    from node.forwarder import packets
    from node.forwarder.loader import BackendSpec, VipSpec

    keys = ["a", "b", "c", "d"]
    addr = {k: f"10.97.9.{i + 1}" for i, k in enumerate(keys)}
    table = build_table({k: 1 for k in keys}, 251)

    def spec(name: str, vip: str, pool: list[str]) -> VipSpec:
        t = build_table({k: 1 for k in pool}, 251)
        return VipSpec(name, ip_address(vip), "tcp", 80,
                       tuple(BackendSpec(k, ip_address(addr[k]), "active") for k in pool),
                       table_keys=t.backends, table_entries=t.entries)

    with temp_forwarder() as f:
        f.sync([spec("v", "10.96.1.1", keys), spec("lone", "10.96.1.2", ["a"])])
        before = f.table_ids(f.vip_id("v"))
        assert f.stop_serving({"v": {"a"}, "lone": {"a"}}) == ["v"]
        assert f.table_ids(f.vip_id("v")) == before  # the table still names "a"
        want = StopGapTable.of(table, {"a"}).entry_keys()
        moved = 0
        for port in range(1000, 1600):
            verdict, out = f.test_run(packets.flow_packet("192.0.2.7", "10.96.1.1", port, 80))
            assert verdict == M.XDP_TX
            idx = M.table_index(M.flow_hash(M.Flow.of("192.0.2.7", "10.96.1.1", port, 80, "tcp")), 251)
            assert str(ip_address(out[30:34])) == addr[want[idx]], port  # outer IPv4 destination
            moved += table.entry_keys()[idx] == "a"
        assert moved > 50  # about a quarter of the flows hashed to "a"'s entries
        verdict, out = f.test_run(packets.flow_packet("192.0.2.7", "10.96.1.2", 1000, 80))
        assert verdict == M.XDP_TX and str(ip_address(out[30:34])) == addr["a"]  # left to the reconcile
        assert f._be_mirror[f.backend_id("v", "a")][2] == maps.BE_STATE_DRAIN
        assert f._be_mirror[f.backend_id("lone", "a")][2] == maps.BE_STATE_ACTIVE
        # at most half of the backends still serving go this way: b and c of b, c, d are more
        assert f.stop_serving({"v": {"b", "c"}}) == []
        assert f.stop_serving({"v": {"b"}}) == ["v"]
        assert [f._be_mirror[f.backend_id("v", k)][2] for k in keys] == [maps.BE_STATE_DRAIN] * 2 + [
            maps.BE_STATE_ACTIVE] * 2
