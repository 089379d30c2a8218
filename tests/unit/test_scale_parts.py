"""The pieces that make the control plane's cost follow the change (issue 12): the table
allocator, stop-gap tables and the two C writers (against their Python fallbacks), the spec
cache and the self-test rotation, and the VIP file cache."""

from __future__ import annotations

import random
from array import array

import pytest

from node import maglev
from node.forwarder import loader
from node.forwarder.tablespace import NoRoom, TableSpace
from node.maglev import StopGapTable, build_table
from node.programming import SelfTestSample


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_tablespace_reuses_exact_sizes_and_quarantines_released_regions():
    clock = Clock()
    space = TableSpace(100, clock=clock, sleep=clock.sleep)
    a = space.alloc(("a", 0), 40)
    b = space.alloc(("b", 0), 40)
    assert (a, b) == (0, 40)
    space.release(("a", 0))  # just flipped away from: quarantined
    c = space.alloc(("c", 0), 40)  # no room until the quarantine is over: waits, then reuses
    assert c == 0 and clock.now >= TableSpace.GRACE
    space.release(("b", 0), quarantine=False)
    assert space.alloc(("d", 0), 30) == 40  # first fit in the gap b left
    with pytest.raises(NoRoom, match="no room for a table of 50 entries"):
        space.alloc(("e", 0), 50)


def test_tablespace_never_hands_out_overlapping_regions():
    rng = random.Random(7)
    clock = Clock()
    space = TableSpace(1000, clock=clock, sleep=clock.sleep)
    for step in range(2000):
        owner = rng.randrange(20)
        if owner in space.used and rng.random() < 0.5:
            space.release(owner, quarantine=rng.random() < 0.5)
        else:
            try:
                space.alloc(owner, rng.choice([7, 13, 50, 101]))
            except NoRoom:
                pass
        clock.now += 0.0003
        regions = sorted(space.used.values())
        for (o1, n1), (o2, _) in zip(regions, regions[1:]):
            assert o1 + n1 <= o2, (step, regions)
        assert all(o + n <= 1000 for o, n in regions)


def _ids(entries, idmap):
    out = bytearray(len(entries) * 4)
    loader.write_ids(out, entries, idmap, None)
    a = array("I")
    a.frombytes(bytes(out))
    return a


@pytest.mark.parametrize("with_c", [True, False])
def test_stop_gap_rule_composes_and_matches_the_table(monkeypatch, with_c):
    if with_c and loader._ext is None:
        pytest.skip("C extension not built")
    if not with_c:
        monkeypatch.setattr(loader, "_ext", None)
    rng = random.Random(3)
    for _ in range(30):
        keys = [f"k{i}" for i in range(rng.randrange(2, 9))]
        exact = build_table({k: rng.choice([1, 2, 3]) for k in keys}, 251)
        first, second = set(rng.sample(keys, 1)), set()
        rest = [k for k in keys if k not in first]
        if len(rest) > 1:
            second = set(rng.sample(rest, rng.randrange(1, len(rest))))
        ids = {k: 100 + i for i, k in enumerate(exact.backends)}
        gap1 = StopGapTable.of(exact, first)
        live = _ids(exact.entries, array("I", [0 if k in first else ids[k] for k in exact.backends]))
        assert [exact.backends[i - 100] for i in live] == gap1.entry_keys()
        gap2 = StopGapTable.of(gap1, second)
        after = array("I", [0 if k in first | second else ids[k] for k in exact.backends])
        before = array("I", [0 if k in first else ids[k] for k in exact.backends])
        written = loader.patch_ids(live, exact.entries, before, after)
        assert [exact.backends[i - 100] for i in live] == gap2.entry_keys()
        moved = sum(a != b for a, b in zip(gap1.entry_keys(), gap2.entry_keys()))
        assert written == moved and moved >= sum(gap1.counts()[k] for k in second)
        assert set(gap2.counts()) == set(keys) - first - second
        assert sum(gap2.counts().values()) == 251


def test_stop_gap_digest_is_deterministic_and_differs_from_the_exact_table():
    exact = build_table({"a": 1, "b": 1, "c": 1}, 251)
    one = StopGapTable.of(exact, {"b"})
    two = StopGapTable.of(build_table({"a": 1, "b": 1, "c": 1}, 251), {"b"})
    assert one.digest() == two.digest() != exact.digest()
    assert StopGapTable.of(one, {"c"}).digest() == StopGapTable.of(exact, {"b", "c"}).digest()
    assert one.expected_shares() == {"a": 0.5, "c": 0.5}


def test_counts_in_c_match_python():
    t = build_table({f"k{i}": i + 1 for i in range(7)}, 65537)
    fast = t.counts()
    saved, maglev._ext = maglev._ext, None
    try:
        assert t.counts() == fast
    finally:
        maglev._ext = saved


def test_self_test_sample_rotates_over_every_vip():
    sample = SelfTestSample(3)
    names = [f"v{i}" for i in range(10)]
    seen = set()
    for _ in range(4):
        got = sample.next(names, ["v9"])
        assert "v9" in got and len(got) <= 4
        seen |= set(got)
    assert seen == set(names)
    assert SelfTestSample(20).next(names) == names


def test_patch_ids_in_c_matches_python_on_every_path():
    """The sparse path (few gone backends, 1-byte entries) and the full pass (ids that change,
    many gone, wide entries) write the same entries as the Python fallback, and count them."""
    if loader._ext is None:
        pytest.skip("C extension not built")
    rng = random.Random(5)
    for nkeys, size in [(5, 251), (12, 1009), (20, 4099), (300, 4099)]:
        keys = [f"k{i}" for i in range(nkeys)]
        exact = build_table({k: rng.choice([1, 2]) for k in keys}, size)
        for _ in range(10):
            ids = array("I", [100 + i for i in range(nkeys)])
            before = array("I", [0 if rng.random() < 0.2 else x for x in ids])
            after = array("I", [0 if rng.random() < 0.3 else x for x in before])
            if rng.random() < 0.3:
                after[rng.randrange(nkeys)] = 7  # an id that changed: the full pass
            if not any(before) or not any(after):
                continue
            live = _ids(exact.entries, before)
            fast, slow = bytearray(bytes(live)), bytearray(bytes(live))
            n_fast = loader._ext.patch_ids(fast, exact.entries, before, after)
            saved, loader._ext = loader._ext, None
            try:
                n_slow = loader.patch_ids(slow, exact.entries, before, after)
            finally:
                loader._ext = saved
            assert (fast, n_fast) == (slow, n_slow), (nkeys, size)


def test_patch_tables_in_one_call_equals_patch_ids_per_table(tmp_path):
    """The batch the stop-gap lane uses (tables anywhere in an mmap'able map, several per
    mapping window and across windows) writes what patch_ids writes table by table; a bad
    job is refused, naming it, before anything is written."""
    if loader._ext is None or not hasattr(loader._ext, "patch_tables"):
        pytest.skip("C extension not built")
    import mmap
    import os

    rng = random.Random(7)
    size = 4099
    offsets = [0, 5000, 9104, 1 << 20, (1 << 20) + size, (3 << 20) // 4 * 3]  # entries
    total = (offsets[-1] + size) * 4
    tables, jobs = [], []
    for i, off in enumerate(offsets):
        nkeys = rng.choice([3, 10, 40, 300])
        t = build_table({f"k{j}": rng.choice([1, 2]) for j in range(nkeys)}, size)
        before = array("I", [50 + 10 * i + j for j in range(nkeys)])
        after = array("I", before)
        for j in rng.sample(range(nkeys), max(1, nkeys // 4)):
            after[j] = 0
        tables.append((t, before, after))
        jobs.append((off, t.entries, before, after))
    path = tmp_path / "tables"
    with open(path, "w+b") as fh:
        fh.truncate(total)
        with mmap.mmap(fh.fileno(), total) as mm:
            for off, (t, before, _) in zip(offsets, tables):
                mm[off * 4:(off + size) * 4] = bytes(_ids(t.entries, before))
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(ValueError, match="before or after marks every backend as gone"):
                loader._ext.patch_tables(fd, total, jobs + [(0, tables[0][0].entries, tables[0][1],
                                                            array("I", [0] * len(tables[0][1])))])
            with pytest.raises(TypeError, match="job 1 must be"):
                loader._ext.patch_tables(fd, total, [jobs[0], (1, 2)])
            with pytest.raises(ValueError, match="job 0: .* within the map"):
                loader._ext.patch_tables(fd, total, [(offsets[-1] + 1, *jobs[-1][1:])])
            with mmap.mmap(fh.fileno(), total) as mm:  # nothing written by the refused calls
                for off, (t, before, _) in zip(offsets, tables):
                    assert mm[off * 4:(off + size) * 4] == bytes(_ids(t.entries, before))
            written = loader._ext.patch_tables(fd, total, jobs)
        finally:
            os.close(fd)
        expected = 0
        with mmap.mmap(fh.fileno(), total) as mm:
            for off, (t, before, after) in zip(offsets, tables):
                one = bytearray(bytes(_ids(t.entries, before)))
                expected += loader._ext.patch_ids(one, t.entries, before, after)
                assert mm[off * 4:(off + size) * 4] == bytes(one) == bytes(_ids(t.entries, after))
        assert written == expected > 0


def test_deciding_again_keeps_the_decisions_of_backends_that_did_not_change():
    from node.config import parse_vip_object
    from node.reconcile import Health, Inputs, TableCache, decide

    vip = parse_vip_object({"name": "web", "address": "10.100.0.1", "port": 80,
                            "backends": [{"address": f"10.0.1.{i}"} for i in range(1, 5)]})
    health = {("web", b.key): Health.UP for b in vip.backends}
    tables = TableCache(defer=True)
    first = decide(Inputs(vips={"web": vip}, health=health), tables)
    health[("web", "10.0.1.2")] = Health.DOWN
    second = decide(Inputs(vips={"web": vip}, health=health), tables, first, {"web"})
    kept = [a is b for a, b in zip(first.vips["web"].backends, second.vips["web"].backends)]
    assert kept == [True, False, True, True]
    assert second.vips["web"].serving == ["10.0.1.1", "10.0.1.3", "10.0.1.4"]
    assert second.vips["web"].backends[1].data_state == "down"


def test_a_spec_built_again_keeps_the_backend_specs_of_unchanged_backends():
    from node.config import parse_vip_object
    from node.effects import forwarder_spec
    from node.programming import SpecCache
    from node.reconcile import Health, Inputs, TableCache, decide

    vip = parse_vip_object({"name": "web", "address": "10.100.0.1", "port": 80,
                            "backends": [{"address": f"10.0.1.{i}"} for i in range(1, 4)]})
    health = {("web", b.key): Health.UP for b in vip.backends}
    tables, specs = TableCache(defer=True), SpecCache(forwarder_spec)
    first = decide(Inputs(vips={"web": vip}, health=health), tables)
    (a,), changed, removed = specs.changes(first)
    specs.programmed(first, changed, removed)
    health[("web", "10.0.1.3")] = Health.DOWN
    second = decide(Inputs(vips={"web": vip}, health=health), tables, first, {"web"})
    (b,), changed, _ = specs.changes(second, {"web"})
    assert changed == ["web"]
    assert [x is y for x, y in zip(a.backends, b.backends)] == [True, True, False]
    assert b == forwarder_spec(second.vips["web"])  # the same spec as one made afresh
