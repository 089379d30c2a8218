"""The forwarder at fleet scale, with the real program and maps: the data path's limits (4096
VIPs, 65536 VIP-backend pairs) and the error past them, a sync that touches only the VIPs it
is told changed, stop-gap tables patched in place equal to a fresh write of the same
stop-gap, and a tables map sized from the VIPs that grows, keeping every table, at open."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from node.forwarder import maps
from node.forwarder.loader import BackendSpec, Forwarder, ForwarderError, VipSpec
from node.forwarder.testing import make_config, temp_bpffs, temp_forwarder
from node.maglev import StopGapTable, build_table

pytestmark = [pytest.mark.root, pytest.mark.integration]


def spec(i: int, nback: int, table=None, gone: frozenset[str] = frozenset(), down=()) -> VipSpec:
    keys = [f"b{j}" for j in range(nback)]
    backs = tuple(BackendSpec(k, ip_address(f"10.{50 + j // 250}.{j % 250}.{i % 250 + 1}"),
                              "down" if k in down else "active") for j, k in enumerate(keys))
    if table is None:
        table = build_table({k: 1 for k in keys if k not in down}, 7 if nback <= 7 else 251)
    return VipSpec(f"v{i:04d}", ip_address(f"10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}"), "tcp", 80,
                   backs, table_keys=table.backends, table_entries=table.entries,
                   table_gone=getattr(table, "gone", gone))


def test_limits_4096_vips_and_65536_pairs_then_a_clear_error() -> None:
    vips = [spec(i, 16) for i in range(maps.MAX_VIPS)]  # 4096 x 16 = 65536 pairs
    assert sum(len(v.backends) for v in vips) == 65536
    with temp_forwarder(table_capacity=1 << 21) as f:
        f.sync(vips)
        assert len(f.vip_ids) == 4096 and len(f.backend_ids) == 65536
        sample = [vips[0].name, vips[2047].name, vips[4095].name]
        result = f.self_test(sample)
        assert result.ok and len(result.checks) == 3, result.reason
        with pytest.raises(ForwarderError, match=r"4097 VIPs exceed the data path's limit of 4096 \(MAX_VIPS"):
            f.sync(vips + [spec(4096, 1)])
    with temp_forwarder(table_capacity=1 << 21) as f:
        more = vips[:-1] + [spec(4095, 17)]
        with pytest.raises(ForwarderError, match=r"65537 VIP backends exceed the data path's limit of 65536"):
            f.sync(more)


def test_sync_touches_only_the_vips_named_changed() -> None:
    with temp_forwarder() as f:
        vips = [spec(i, 3) for i in range(3)]
        f.sync(vips)
        before = {v.name: f.table_ids(f.vip_id(v.name)) for v in vips}
        # v0001 loses a backend; v0002's spec changes too but is not named: it is left alone
        changed = [vips[0], spec(1, 3, down={"b1"}), spec(2, 3, down={"b2"})]
        f.sync(changed, ["v0001"])
        assert f.table_ids(f.vip_id("v0000")) == before["v0000"]
        assert f.table_ids(f.vip_id("v0002")) == before["v0002"]
        b1 = f.backend_id("v0001", "b1")
        assert b1 not in f.table_ids(f.vip_id("v0001"))
        assert f.self_test().ok


def test_stop_gap_patched_in_place_equals_a_fresh_write() -> None:
    keys = [f"b{j}" for j in range(5)]
    exact = build_table({k: 1 for k in keys}, 251)
    gap1 = StopGapTable.of(exact, {"b1"})
    gap2 = StopGapTable.of(gap1, {"b3"})
    with temp_forwarder() as patched, temp_forwarder() as fresh:
        patched.sync([spec(0, 5, exact)])
        vid = patched.vip_id("v0000")

        def live_slot() -> tuple[int, int]:
            meta = patched._meta(vid)  # a view into the mmap: not kept past the call
            return meta.active, meta.slot[meta.active & 1].offset
        slot_before = live_slot()
        patched.sync([spec(0, 5, gap1, down={"b1"})])
        patched.sync([spec(0, 5, gap2, down={"b1", "b3"})])
        # patched in place: no flip, same region
        assert live_slot() == slot_before
        fresh.sync([spec(0, 5, gap2, down={"b1", "b3"})])
        to_keys = {f.backend_id("v0000", k): k for f in (patched,) for k in keys}
        got = [to_keys[i] for i in patched.table_ids(vid)]
        fresh_keys = {fresh.backend_id("v0000", k): k for k in keys}
        want = [fresh_keys[i] for i in fresh.table_ids(fresh.vip_id("v0000"))]
        assert got == want == gap2.entry_keys()
        assert {"b1", "b3"}.isdisjoint(got)
        assert patched.self_test().ok


def test_tables_map_sized_from_the_vips_grows_at_open_keeping_tables() -> None:
    with temp_bpffs() as root:
        cfg = make_config(root / "maglev")
        small = Forwarder(cfg, table_capacity=None)
        small.size_tables(10)
        small.open()
        try:
            assert small.table_capacity == 1 << 20  # the floor
            small.sync([spec(i, 3) for i in range(4)])
            tables = {n: small.table_ids(v) for n, v in small.vip_ids.items()}
            ids = dict(small.backend_ids)
        finally:
            small.close()
        big = Forwarder(cfg, table_capacity=None)
        big.size_tables(3 << 20)
        big.open()
        try:
            assert big.table_capacity >= 3 << 20
            assert {n: big.table_ids(v) for n, v in big.vip_ids.items()} == tables
            assert big.backend_ids == ids
            assert big.self_test().ok
        finally:
            big.close()
            big.remove_pins()
