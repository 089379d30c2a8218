"""End-of-RIB bookkeeping for graceful restart (bgp.graceful), and its config bounds."""

from __future__ import annotations

import pytest

from bgp.exabgp import render_config
from bgp.graceful import EndOfRib, EorCommand, eor_text, keeps_routes_on_stop
from node.config import BgpConfig, GR_RESTART_TIME_MAX


def config(**gr) -> BgpConfig:
    return BgpConfig.model_validate({
        "local_as": 65101, "router_id": "10.0.0.2", "local_address": "10.0.0.2", "local_address_v6": "fd00::2",
        "peers": [{"address": "10.0.0.1", "peer_as": 65000}, {"address": "fd00::1", "peer_as": 65000}],
        "graceful_restart": gr or {"enabled": True}})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_no_end_of_rib_before_the_controller_is_ready():
    eor = EndOfRib(config(), Clock())
    eor.session_up("10.0.0.1")
    assert eor.next_command() is None
    eor.routes_ready()
    assert eor.next_command() == EorCommand("10.0.0.1", "neighbor 10.0.0.1 announce eor ipv4 unicast")


def test_one_end_of_rib_per_session_start_and_none_after_it_went_down():
    eor = EndOfRib(config(), Clock())
    eor.routes_ready()
    eor.session_up("fd00::1")
    cmd = eor.next_command()
    assert cmd.text == "neighbor fd00::1 announce eor ipv6 unicast"
    eor.on_result(cmd, True)
    assert eor.next_command() is None and eor.sent_total == 1
    eor.session_up("fd00::1")  # the session flapped: the router waits for a new one
    eor.session_down("fd00::1")
    assert eor.next_command() is None and eor.status()["end_of_rib_owed"] == []


def test_a_refused_end_of_rib_is_retried_later():
    clock = Clock()
    eor = EndOfRib(config(), clock)
    eor.routes_ready()
    eor.session_up("10.0.0.1")
    eor.on_result(eor.next_command(), False)
    assert eor.next_command() is None and eor.next_wakeup() == pytest.approx(1.0)
    clock.now = 1.0
    assert eor.next_command() is not None


def test_without_graceful_restart_nothing_is_owed():
    eor = EndOfRib(config(enabled=False), Clock())
    eor.routes_ready()
    eor.session_up("10.0.0.1")
    assert eor.next_command() is None and eor.status()["enabled"] is False


def test_restart_time_is_bounded():
    with pytest.raises(ValueError, match="restart_time"):
        config(enabled=True, restart_time=GR_RESTART_TIME_MAX + 1)
    with pytest.raises(ValueError, match="restart_time"):
        config(enabled=True, restart_time=0)


def test_exabgp_gets_the_capability_and_manual_end_of_rib_only_when_enabled():
    on = render_config(config(enabled=True, restart_time=42), "/run/x/api.sock")
    assert on.count("graceful-restart 42;") == 2 and on.count("manual-eor true;") == 2
    assert on.count("open;") == 2  # the router's OPEN tells whether it offers restart too
    off = render_config(config(enabled=False), "/run/x/api.sock")
    assert "graceful-restart" not in off and "manual-eor" not in off and "open;" not in off


def test_negotiated_only_with_a_router_whose_open_offers_it():
    eor = EndOfRib(config(), Clock())
    assert eor.status()["negotiated_with"] == [] and eor.status()["not_negotiated_with"] == []
    eor.router_open("10.0.0.1", {"name": "graceful restart", "time": 120, "address-family-flags": {}})
    eor.router_open("fd00::1", None)
    st = eor.status()
    assert st["negotiated_with"] == ["10.0.0.1"] and st["not_negotiated_with"] == ["fd00::1"]
    eor.router_open("fd00::1", {"name": "graceful restart", "time": 0})  # the router changed its mind
    assert eor.status()["negotiated_with"] == ["10.0.0.1", "fd00::1"]
    off = EndOfRib(config(enabled=False), Clock())
    off.router_open("10.0.0.1", {"name": "graceful restart", "time": 120})
    assert off.status()["negotiated_with"] == []  # we do not offer it: nothing is negotiated


def test_only_keep_with_graceful_restart_keeps_routes():
    assert keeps_routes_on_stop("keep", config(enabled=True))
    assert not keeps_routes_on_stop("keep", config(enabled=False))
    assert not keeps_routes_on_stop("detach", config(enabled=True))


def test_eor_text_per_family():
    assert eor_text("10.0.0.1").endswith("ipv4 unicast") and eor_text("fd00::1").endswith("ipv6 unicast")


def test_maglev_status_says_when_a_router_may_hold_stale_routes(capsys):
    import argparse

    from node.commands.ops import cmd_status

    status = {"node_id": "lb-1", "uptime": 1.0, "warmup_over": False, "node_drained": False,
              "forwarder": {"ok": True, "mode": "native", "interfaces": ["eth0"], "error": None,
                            "last_self_test": {"reason": "ok"}},
              "bgp": {"sessions": {"192.0.2.1": {"state": "established"}},
                      "graceful_restart": {"enabled": True, "restart_time": 15, "end_of_rib_owed": ["192.0.2.1"]}},
              "vips": {}, "last_reload": None}

    class Client:
        def get(self, path):
            return status

    cmd_status(Client(), argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert "graceful restart: on (restart time 15 s); End-of-RIB owed to 192.0.2.1" in out
    assert "negotiated" not in out  # no router's OPEN seen yet: nothing is claimed
    status["bgp"]["graceful_restart"].update(end_of_rib_owed=[], negotiated_with=["192.0.2.1"],
                                             not_negotiated_with=["192.0.2.9"])
    cmd_status(Client(), argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert "End-of-RIB sent to every session that is up" in out
    assert "graceful restart: negotiated with 192.0.2.1\n" in out
    assert "graceful restart: NOT negotiated with 192.0.2.9 (the router's OPEN does not offer it" in out
    status["bgp"]["graceful_restart"] = {"enabled": False}
    cmd_status(Client(), argparse.Namespace(json=False))
    assert "graceful restart" not in capsys.readouterr().out
