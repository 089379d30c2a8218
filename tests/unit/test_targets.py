"""Health targets per (VIP, backend): a VIP a reload did not touch keeps its Target objects."""

from node.config import parse_vip_object
from node.health_view import health_targets


def vip(name, last="10.0.1.2", check=True):
    data = {"name": name, "address": f"10.100.0.{len(name)}", "port": 80,
            "backends": [{"address": "10.0.1.1"}, {"address": last}]}
    if check:
        data["health_check"] = {"type": "tcp"}
    return parse_vip_object(data)


def test_unchanged_vips_keep_their_targets_and_changed_ones_get_fresh_ones():
    web, api, static = vip("web"), vip("apis"), vip("static", check=False)
    from node.health_view import owners_of, reindex

    before = {"web": web, "apis": api, "static": static}
    first = health_targets(before)
    assert sorted(first) == [("apis", "10.0.1.1"), ("apis", "10.0.1.2"), ("web", "10.0.1.1"), ("web", "10.0.1.2")]
    api2 = vip("apis", last="10.0.1.3")
    second, _, _ = reindex({"web": web, "apis": api2}, before, first, owners_of(first))
    assert second[("web", "10.0.1.1")] is first[("web", "10.0.1.1")]
    assert second[("apis", "10.0.1.1")] is not first[("apis", "10.0.1.1")]
    assert second[("apis", "10.0.1.1")] == first[("apis", "10.0.1.1")]  # same probe: one target
    assert ("apis", "10.0.1.2") not in second and second[("apis", "10.0.1.3")].probe_port == 80
    # An equal but re-parsed VIP is not trusted by identity: its targets are made again, equal.
    again, _, _ = reindex({"web": vip("web")}, before, first, owners_of(first))
    assert again == {k: v for k, v in first.items() if k[0] == "web"}


def test_reindex_after_reloads_equals_a_full_rebuild():
    """The incremental targets and owners of a reload (VIPs added, removed, changed, one
    moved to a check-less pool, backends shared by many VIPs) equal the full rebuild's, owners
    lists in the same order; the fresh targets are exactly those of the VIPs it touched."""
    import random

    from node.health_view import owners_of, reindex

    rng = random.Random(3)

    def make(name, n):
        data = {"name": name, "address": f"10.100.{n // 250}.{n % 250}", "port": 80,
                "backends": [{"address": f"10.0.1.{i}"} for i in sorted(rng.sample(range(1, 12), 4))]}
        if rng.random() < 0.85:
            data["health_check"] = {"type": "tcp", "interval": rng.choice([2, 3]), "timeout": 1}
        return parse_vip_object(data)

    vips = {f"v{i:03d}": make(f"v{i:03d}", i) for i in range(60)}
    targets = health_targets(vips)
    owners = owners_of(targets)
    for _ in range(25):
        new = dict(vips)
        for name in rng.sample(sorted(new), 5):
            del new[name]
        for name in rng.sample(sorted(vips), 5):
            new[name] = make(name, int(name[1:]))
        for i in range(rng.randrange(3)):
            new[f"w{i}{rng.randrange(99)}"] = make("w", 200 + i)
        new = {n: (v if v.name == n else make(n, 300 + len(n))) for n, v in new.items()}
        got_targets, got_owners, fresh = reindex(new, vips, targets, owners)
        want = health_targets(new)
        assert got_targets == want
        assert {t: list(p) for t, p in got_owners.items()} == owners_of(want)
        for t, pairs in owners_of(want).items():
            assert got_owners[t] == pairs  # the same order
        touched = {n for n, v in new.items() if vips.get(n) is not v}
        assert fresh == {p: t for p, t in want.items() if p[0] in touched}
        for pair, t in got_targets.items():
            if pair[0] not in touched:
                assert t is targets[pair]  # the same object: probed already
        vips, targets, owners = new, got_targets, got_owners
