"""Routes, ExaBGP command lines and the generated ExaBGP config."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from bgp import exabgp
from bgp.routes import Route, RouteError, announce_command, withdraw_command
from node.config import BgpConfig


def test_route_must_be_a_host_prefix():
    with pytest.raises(RouteError, match="single address"):
        Route(ipaddress.ip_network("10.0.0.0/24"))
    with pytest.raises(RouteError, match="ipaddress network"):
        Route("10.0.0.1/32")  # type: ignore[arg-type]


@pytest.mark.parametrize("med", [-1, 2**32, True, "5", 1.5])
def test_route_med_validated(med):
    with pytest.raises(RouteError, match="med"):
        Route(ipaddress.ip_network("10.0.0.1/32"), med=med)


@pytest.mark.parametrize("community", ["65536:1", "1:65536", "a:b", "1:2 3:4", "1:2]", "1:2; x"])
def test_route_community_validated(community):
    with pytest.raises(RouteError, match="community"):
        Route(ipaddress.ip_network("10.0.0.1/32"), communities=(community,))


def test_communities_are_canonical():
    a = Route(ipaddress.ip_network("10.0.0.1/32"), communities=("65000:2", "65000:1", "65000:2"))
    b = Route(ipaddress.ip_network("10.0.0.1/32"), communities=("65000:1", "65000:2"))
    assert a == b and a.communities == ("65000:1", "65000:2")


def test_commands():
    r = Route.for_address("2001:db8::1", med=10, communities=["65000:100"])
    assert announce_command(r) == "announce route 2001:db8::1/128 next-hop self med 10 community [65000:100]"
    assert announce_command(r, ipaddress.ip_address("2001:db8::9")).endswith("next-hop 2001:db8::9 med 10 community [65000:100]")
    assert announce_command(r, ipaddress.ip_address("192.0.2.9")).startswith("announce route 2001:db8::1/128 next-hop self")
    assert withdraw_command(r.prefix) == "withdraw route 2001:db8::1/128"
    with pytest.raises(RouteError):
        withdraw_command("10.0.0.1/32; shutdown")  # type: ignore[arg-type]


def cfg(**kw) -> BgpConfig:
    data = {
        "local_as": 65101, "router_id": "10.77.1.2", "local_address": "10.77.1.2",
        "local_address_v6": "fd77:1::2", "hold_time": 3,
        "peers": [{"address": "10.77.1.1", "peer_as": 65000},
                  {"address": "fd77:1::1", "peer_as": 65000, "hold_time": 9, "passive": True}],
    }
    data.update(kw)
    return BgpConfig.model_validate(data)


def test_exabgp_config_has_one_neighbor_per_peer_with_its_family():
    text = exabgp.render_config(cfg(), Path("/run/maglev/bgp/api.sock"), python="/usr/bin/python3")
    assert f"run /usr/bin/python3 {exabgp.HELPER_PATH} /run/maglev/bgp/api.sock;" in text
    assert "encoder json;" in text and "respawn false;" in text
    v4 = text[text.index("neighbor 10.77.1.1 {"):text.index("neighbor fd77:1::1 {")]
    v6 = text[text.index("neighbor fd77:1::1 {"):]
    for block, local, fam, hold in ((v4, "10.77.1.2", "ipv4 unicast", 3), (v6, "fd77:1::2", "ipv6 unicast", 9)):
        assert f"local-address {local};" in block
        assert "router-id 10.77.1.2;" in block and "local-as 65101;" in block and "peer-as 65000;" in block
        assert f"hold-time {hold};" in block and f"{fam};" in block
        assert "neighbor-changes;" in block and "processes [ maglev ];" in block
    assert "passive true;" in v6 and "passive" not in v4


def test_exabgp_config_refuses_unsafe_paths():
    with pytest.raises(exabgp.ExabgpConfigError, match="API socket"):
        exabgp.render_config(cfg(), Path("/tmp/a b/api.sock"))


def test_exabgp_environment_keeps_root_and_no_cli():
    env = exabgp.environment(Path("/tmp/x"), base={})
    assert env["exabgp_daemon_user"] == "root" and env["exabgp_api_cli"] == "false"
    assert env["exabgp_api_ack"] == "true"
