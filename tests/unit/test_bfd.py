"""bgp.bfd without root: the config section, the bfdd config and command line it generates, the
parsing of bfdd's JSON, and where its state shows up (speaker status, metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bgp import BgpSpeaker
from bgp.bfd import (BFD_PROFILE, BfdDaemon, _die_with_parent_argv, bfd_peers, frr_daemon_argv,
                     parse_bfd_peers, render_bfd_config)
from node import metrics
from node.config import BgpConfig, ConfigError, parse_node_object

REPO = Path(__file__).resolve().parents[2]


def bgp(**over) -> BgpConfig:
    data = {
        "local_as": 65001, "router_id": "192.0.2.11", "local_address": "192.0.2.11",
        "local_address_v6": "2001:db8::11",
        "peers": [{"address": "192.0.2.1", "peer_as": 65000},
                  {"address": "2001:db8::1", "peer_as": 65000},
                  {"address": "198.51.100.1", "peer_as": 65000, "local_address": "198.51.100.11"}],
    }
    data.update(over)
    return BgpConfig.model_validate(data)


def node_problems(bfd: dict) -> list[str]:
    node = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    node["bgp"]["bfd"] = bfd
    with pytest.raises(ConfigError) as info:
        parse_node_object(node, "node.yaml")
    return [str(p) for p in info.value.problems]


def test_bfd_is_off_by_default_with_100ms_x3():
    cfg = bgp()
    assert (cfg.bfd.enabled, cfg.bfd.interval_ms, cfg.bfd.multiplier) == (False, 100, 3)
    node = parse_node_object(yaml.safe_load((REPO / "configs/node.yaml").read_text()), "node.yaml")
    assert node.bgp.bfd.enabled is False


def test_the_example_node_file_documents_every_bfd_key():
    text = (REPO / "configs/node.yaml").read_text()
    for key in ("bfd:", "enabled: false", "interval_ms: 100", "multiplier: 3"):
        assert f"#   {key}" in text or f"# {key}" in text, key
    # Uncommented, the block is a valid config.
    node = yaml.safe_load(text)
    node["bgp"]["bfd"] = {"enabled": True, "interval_ms": 100, "multiplier": 3}
    assert parse_node_object(node, "node.yaml").bgp.bfd.enabled


@pytest.mark.parametrize("bfd, field", [
    ({"interval_ms": 9}, "bgp.bfd.interval_ms"),
    ({"multiplier": 1}, "bgp.bfd.multiplier"),
    ({"enabled": "maybe"}, "bgp.bfd.enabled"),
    ({"enable": True}, "bgp.bfd.enable"),
])
def test_bad_bfd_settings_name_the_field(bfd, field):
    problems = node_problems(bfd)
    assert len(problems) == 1 and "node.yaml" in problems[0] and field in problems[0], problems


def test_one_single_hop_peer_per_bgp_peer_from_its_session_address():
    assert bfd_peers(bgp()) == [("192.0.2.1", "192.0.2.11"), ("2001:db8::1", "2001:db8::11"),
                                ("198.51.100.1", "198.51.100.11")]


def test_bfdd_config_has_the_profile_and_every_peer_with_the_timers():
    text = render_bfd_config(bfd_peers(bgp()), interval_ms=50, multiplier=4)
    lines = text.splitlines()
    assert lines[0] == "bfd" and lines[-1] == "exit"
    assert f" profile {BFD_PROFILE}" in lines
    assert " peer 2001:db8::1 local-address 2001:db8::11" in lines
    assert " peer 198.51.100.1 local-address 198.51.100.11" in lines
    assert lines.count("  receive-interval 50") == 4 and lines.count("  transmit-interval 50") == 4
    assert lines.count("  detect-multiplier 4") == 4
    assert "multihop" not in text  # single hop: TTL 255 is checked, as RFC 5881 wants


def test_bfdd_config_accepts_addresses_only():
    with pytest.raises(ValueError):
        render_bfd_config([("192.0.2.1\n peer 10.0.0.1", "192.0.2.11")])


def test_node_bfdd_runs_in_the_foreground_and_the_router_daemonizes(tmp_path):
    fg = frr_daemon_argv("bfdd", tmp_path, foreground=True)
    bg = frr_daemon_argv("bfdd", tmp_path)
    assert "-d" not in fg and "-d" in bg
    for argv in (fg, bg):
        assert argv[0].endswith("/bfdd")
        assert argv[argv.index("--bfdctl") + 1] == str(tmp_path / "bfdd.sock")
        assert argv[argv.index("--vty_socket") + 1] == str(tmp_path)
        assert argv[argv.index("-i") + 1] == str(tmp_path / "bfdd.pid")
    assert fg[fg.index("--log") + 1] == "stdout"


def test_bfdd_becomes_frr_before_it_asks_to_die_with_its_parent():
    """A change of user clears PR_SET_PDEATHSIG: setpriv changes it first, then sets the signal."""
    argv = _die_with_parent_argv()
    assert argv[0] == "setpriv" and argv[-1] == "--"
    assert "--reuid=frr" in argv and argv[argv.index("--pdeathsig") + 1] == "SIGKILL"


def test_parse_bfd_peers_keeps_state_and_skips_junk():
    data = [{"peer": "192.0.2.1", "local": "192.0.2.11", "status": "up", "diagnostic": "ok"},
            {"peer": "2001:db8::1", "status": "down", "diagnostic": "control detection time expired"},
            {"peer": "not-an-address"}, "junk"]
    assert parse_bfd_peers(data) == {
        "192.0.2.1": {"status": "up", "local": "192.0.2.11", "diagnostic": "ok"},
        "2001:db8::1": {"status": "down", "local": None, "diagnostic": "control detection time expired"},
    }
    assert parse_bfd_peers({"error": "x"}) == {}


def test_speaker_without_bfd_reports_it_disabled(tmp_path):
    sp = BgpSpeaker(bgp(), tmp_path / "bgp")
    assert sp.bfd is None and sp.status()["bfd"] == {"enabled": False}


def test_speaker_with_bfd_reports_every_peer_before_bfdd_answers(tmp_path):
    sp = BgpSpeaker(bgp(bfd={"enabled": True, "interval_ms": 200}), tmp_path / "bgp", bfd_dir=tmp_path / "bfd")
    assert isinstance(sp.bfd, BfdDaemon) and sp.bfd.dir == tmp_path / "bfd"
    st = sp.status()["bfd"]
    assert st["enabled"] and st["interval_ms"] == 200 and st["multiplier"] == 3 and st["bfdd_pid"] is None
    assert {p: i["status"] for p, i in st["peers"].items()} == {
        "192.0.2.1": "unknown", "2001:db8::1": "unknown", "198.51.100.1": "unknown"}


def test_bfd_state_changes_are_tracked_per_peer(tmp_path):
    d = BfdDaemon(bgp(bfd={"enabled": True}), tmp_path / "bfd")
    d._update({"192.0.2.1": {"status": "up", "diagnostic": "ok"}})
    peers = d.peers()
    assert peers["192.0.2.1"]["status"] == "up" and peers["2001:db8::1"]["status"] == "unknown"
    since = peers["192.0.2.1"]["since"]
    d._update({"192.0.2.1": {"status": "up", "diagnostic": "ok"}})
    assert d.peers()["192.0.2.1"]["since"] == since  # unchanged state, unchanged time
    d._update({})
    assert d.peers()["192.0.2.1"]["status"] == "unknown"  # bfdd forgot it: not up


async def test_metrics_show_each_bfd_peer_up_or_not(tmp_path):
    from tests.unit.test_controller import Env, vip

    env = Env(tmp_path, [vip()])
    await env.start()
    env.speaker.status = lambda: {"sessions": {}, "bfd": {"enabled": True, "peers": {
        "192.0.2.1": {"status": "up"}, "2001:db8::1": {"status": "down"}}}}
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(env.c, {}))}
    up = {s.labels["peer"]: s.value for s in families["maglev_bfd_peer_up"].samples}
    assert up == {"192.0.2.1": 1.0, "2001:db8::1": 0.0}
    env.speaker.status = lambda: {"sessions": {}, "bfd": {"enabled": False}}
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(env.c, {}))}
    assert families["maglev_bfd_peer_up"].samples == []


def test_maglev_status_shows_bfd_next_to_each_bgp_session(capsys):
    import argparse

    from node.commands.ops import cmd_status

    status = {"node_id": "lb-1", "uptime": 1.0, "warmup_over": True, "node_drained": False,
              "forwarder": {"ok": True, "mode": "native", "interfaces": ["eth0"], "error": None,
                            "last_self_test": {"reason": "ok"}},
              "bgp": {"sessions": {"192.0.2.1": {"state": "established"}, "2001:db8::1": {"state": "idle"}},
                      "bfd": {"enabled": True, "peers": {"192.0.2.1": {"status": "up"},
                                                         "2001:db8::1": {"status": "down"}}}},
              "vips": {}, "last_reload": None}

    class Client:
        def get(self, path):
            return status

    assert cmd_status(Client(), argparse.Namespace(json=False)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.split()[:3] == ["BGP", "PEER", "STATE"] and "BFD" in ln for ln in lines)
    assert any(ln.split()[:3] == ["192.0.2.1", "established", "up"] for ln in lines)
    assert any(ln.split()[:3] == ["2001:db8::1", "idle", "down"] for ln in lines)
    status["bgp"]["bfd"] = {"enabled": False}
    cmd_status(Client(), argparse.Namespace(json=False))
    assert "BFD" not in capsys.readouterr().out
