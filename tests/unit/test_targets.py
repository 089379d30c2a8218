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
    first = health_targets({"web": web, "apis": api, "static": static})
    assert sorted(first) == [("apis", "10.0.1.1"), ("apis", "10.0.1.2"), ("web", "10.0.1.1"), ("web", "10.0.1.2")]
    api2 = vip("apis", last="10.0.1.3")
    second = health_targets({"web": web, "apis": api2}, {"web": web, "apis": api}, first)
    assert second[("web", "10.0.1.1")] is first[("web", "10.0.1.1")]
    assert second[("apis", "10.0.1.1")] is not first[("apis", "10.0.1.1")]
    assert second[("apis", "10.0.1.1")] == first[("apis", "10.0.1.1")]  # same probe: one target
    assert ("apis", "10.0.1.2") not in second and second[("apis", "10.0.1.3")].probe_port == 80
    # An equal but re-parsed VIP is not trusted by identity: its targets are made again, equal.
    assert health_targets({"web": vip("web")}, {"web": web}, first) == {k: v for k, v in first.items() if k[0] == "web"}
