"""Tunnel health checks without the kernel: the config rules, what a tunnel Target probes, the
marks' bookkeeping, the reasons, and the probers asking the tunnel for the mark (a fake tunnel;
the real one is proven in tests/integration/test_health_tunnel.py)."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
import yaml
from pydantic import TypeAdapter

from healthcheck import Target
from healthcheck.probes import Prober, tunnel_reason
from healthcheck.types import ProbeResult
from node.config import ConfigError, HealthCheck, check_vips_for_node, parse_node_object, parse_vip_object
from node.forwarder.hc_tunnel import HC_MAX_TARGETS, MarkTable, TunnelError, config_value, target_value
from node.health_path import health_target, path_of, tunnel_addresses

REPO = Path(__file__).resolve().parents[2]
ip = ipaddress.ip_address


def check(**data):
    return TypeAdapter(HealthCheck).validate_python(data)


def vip(**over):
    data = {"name": "web", "address": "10.100.0.1", "port": 80,
            "backends": [{"address": "10.1.0.21"}, {"address": "10.1.0.22", "port": 8080}],
            "health_check": {"type": "http", "via": "tunnel", "path": "/healthz"}}
    data.update(over)
    return parse_vip_object(data, "vips.d/web.yaml")


# ------------------------------------------------------------------ config


def test_direct_is_the_default_and_every_sent_probe_type_may_use_the_tunnel():
    assert check(type="tcp", port=80).via == "direct"
    for kind in ({"type": "tcp"}, {"type": "http"}, {"type": "https"}, {"type": "udp"},
                 {"type": "dns", "query_name": "example.test"}):
        assert check(**kind, via="tunnel").via == "tunnel"


def test_an_exec_check_cannot_use_the_tunnel_and_the_error_names_file_and_field():
    with pytest.raises(ConfigError) as err:
        vip(health_check={"type": "exec", "command": ["true"], "via": "tunnel"})
    msg = str(err.value)
    assert "vips.d/web.yaml" in msg and "health_check" in msg
    assert "exec check" in msg and "use via: direct" in msg


def test_an_unknown_path_is_refused():
    with pytest.raises(ConfigError) as err:
        vip(health_check={"type": "tcp", "via": "gre"})
    assert "health_check.via" in str(err.value)


def test_a_tunnel_check_of_an_all_ports_vip_needs_a_port():
    with pytest.raises(ConfigError) as err:
        vip(port="all", health_check={"type": "tcp", "via": "tunnel"})
    assert "set health_check.port" in str(err.value)
    assert vip(port="all", health_check={"type": "tcp", "via": "tunnel", "port": 80})
    assert vip(port="all", health_check={"type": "http", "via": "tunnel"})  # 80 by default


def test_a_tunnel_check_needs_the_encap_source_of_its_family():
    data = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    data["forwarder"].pop("encap_source_v6")
    node = parse_node_object(data, "node.yaml")
    v6 = vip(name="web6", address="fd00:100::1", backends=[{"address": "fd00:1::21"}])
    msgs = [str(p) for p in check_vips_for_node({"web6": v6}, node, "vips.d")]
    assert ("vips.d: vip 'web6': health_check.via: via: tunnel on an IPv6 VIP needs "
            "forwarder.encap_source_v6 in the node file (the GRE outer source, and the address "
            "the backend answers the probe at)") in msgs


# ------------------------------------------------------------------ targets


def test_a_tunnel_target_probes_the_vip_port_and_is_steered_to_its_backend():
    v = vip()
    plain, ported = (health_target(v, b) for b in v.backends)
    assert plain.tunnel and plain.probe_address == ip("10.100.0.1") and plain.address == ip("10.1.0.21")
    assert plain.probe_port == 80
    assert ported.probe_port == 80  # the VIP's port: GRE does not rewrite ports
    assert plain.describe() == "10.1.0.21 via tunnel to 10.100.0.1:80 (http /healthz)"
    assert tunnel_addresses([plain, ported]) == {ip("10.1.0.21"), ip("10.1.0.22")}
    assert path_of(v) == "tunnel"


def test_direct_targets_are_unchanged():
    v = vip(health_check={"type": "http", "path": "/healthz"})
    plain, ported = (health_target(v, b) for b in v.backends)
    assert not plain.tunnel and plain.probe_address == ip("10.1.0.21") and ported.probe_port == 8080
    assert tunnel_addresses([plain, ported]) == set()
    assert path_of(v) == "direct" and path_of(vip(health_check=None)) is None


def test_tunnel_targets_of_two_vips_are_two_probes_and_direct_ones_collapse():
    a = health_target(vip(), vip().backends[0])
    b = health_target(vip(name="other", address="10.100.0.2"), vip().backends[0])
    assert a != b  # each VIP must be on the backend's lo: probe each
    d1 = health_target(vip(health_check={"type": "tcp"}), vip().backends[0])
    d2 = health_target(vip(name="o", address="10.100.0.2", health_check={"type": "tcp"}), vip().backends[0])
    assert d1 == d2 and hash(d1) == hash(d2)
    with pytest.raises(ValueError):
        Target(ip("10.1.0.21"), 80, check(type="tcp", via="tunnel"))  # no VIP


# ------------------------------------------------------------------ marks


def test_marks_are_stable_and_reuse_the_lowest_free_id():
    t = MarkTable()
    a, b, c, d = (ip(f"10.1.0.{i}") for i in (1, 2, 3, 4))
    assert t.assign([b, a, c]) == ({a: 1, b: 2, c: 3}, [])
    assert t.assign([a, c, d]) == ({d: 2}, [2])  # b's id freed, then the lowest free goes to d
    assert t.ids == {a: 1, c: 3, d: 2}
    assert t.assign([a, c, d]) == ({}, [])
    with pytest.raises(TunnelError, match="HC_MAX_TARGETS"):
        MarkTable().assign(ipaddress.ip_network("10.0.0.0/8")[i] for i in range(HC_MAX_TARGETS))


def test_map_values_are_in_wire_order():
    t = target_value(ip("10.1.0.21"))
    assert bytes(t)[:4] == bytes([10, 1, 0, 21]) and t.family == 4
    c = config_value(ip("10.1.0.11"), None, 3)
    assert c.flags == 2 and bytes(c)[4:8] == bytes([10, 1, 0, 11]) and c.out_ifindex == 3


# ------------------------------------------------------------------ reasons


@pytest.mark.parametrize("reason,expected", [
    ("timeout after 1 s", "no answer through the tunnel (timeout after 1 s): backend 10.1.0.21 may "
                          "lack VIP 10.100.0.1 on lo or its GRE decap"),
    ("connection refused", "connection refused through the tunnel: backend 10.1.0.21 decapsulated "
                           "the probe but nothing serves 10.100.0.1:80"),
    ("HTTP 503", "HTTP 503 (through the tunnel)"),
])
def test_tunnel_reasons_say_what_failed(reason, expected):
    target = health_target(vip(), vip().backends[0])
    assert tunnel_reason(target, ProbeResult(False, reason, 0.1, 0.0)).reason == expected
    assert tunnel_reason(target, ProbeResult(True, "HTTP 200", 0.1, 0.0)).reason == "HTTP 200 through the tunnel"


# ------------------------------------------------------------------ probers


class FakeTunnel:
    def __init__(self, error: str | None = None):
        self.error, self.asked = error, []

    def mark_for(self, address):
        self.asked.append(address)
        if self.error:
            raise LookupError(self.error)
        return 0


async def _server(kind: str):
    accepted = []

    async def handle(reader, writer):
        accepted.append(1)
        if kind == "http":
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], accepted


@pytest.mark.parametrize("kind", ["tcp", "http"])
async def test_the_lean_path_connects_to_the_vip_with_the_backends_mark(kind):
    server, port, accepted = await _server(kind)
    v = vip(address="127.0.0.1", health_check={"type": kind, "via": "tunnel", "port": port})
    target = health_target(v, v.backends[0])
    tunnel = FakeTunnel()
    async with server, Prober(tunnel=tunnel) as prober:
        result = await prober.probe(target)
        # the monitor's path (start + callback) goes the same way
        done = asyncio.get_running_loop().create_future()
        prober.start(target, done.set_result)
        second = await done
    assert result.ok and result.reason.endswith("through the tunnel"), result
    assert second.ok and second.reason.endswith("through the tunnel"), second
    assert tunnel.asked == [ip("10.1.0.21")] * 2
    if kind == "http":  # answered by the server on the "VIP" (a tcp probe ends at the handshake)
        assert len(accepted) == 2


@pytest.mark.parametrize("kind", ["tcp", "http", "https", "udp"])
async def test_without_a_mark_the_probe_fails_with_the_tunnels_reason(kind):
    v = vip(address="127.0.0.1", health_check={"type": kind, "via": "tunnel", "port": 9})
    target = health_target(v, v.backends[0])
    async with Prober(tunnel=FakeTunnel("the node's tunnel for health checks is not set up: no veth")) as p:
        result = await p.probe(target)
    assert not result.ok
    assert "the node's tunnel for health checks is not set up: no veth" in result.reason
    async with Prober() as p:  # `maglev check` and tests: no tunnel at all
        result = await p.probe(target)
    assert not result.ok and "this checker has no tunnel" in result.reason


# ------------------------------------------------------------------ the controller's side


class RecordingTunnel:
    """What the controller sees of HealthTunnel: opened, set_targets, open, close."""

    def __init__(self, fail: str | None = None):
        self.opened, self.fail, self.calls = False, fail, []

    def set_targets(self, addresses):
        self.calls.append(("set_targets", sorted(map(str, addresses))))

    def open(self):
        self.opened = True
        self.calls.append(("open",))
        if self.fail:
            raise RuntimeError(self.fail)

    def close(self):
        self.calls.append(("close",))


async def test_the_controller_marks_backends_before_probing_and_opens_the_tunnel_on_first_use(tmp_path):
    from node.health_path import open_tunnel
    from tests.unit.test_controller import Env, vip as cvip

    tunnel_check = {"type": "tcp", "interval": 1, "timeout": 0.5, "via": "tunnel"}
    env = Env(tmp_path, [cvip()])  # direct checks only
    tunnel = env.c.tunnel = RecordingTunnel()
    await env.start()
    assert tunnel.calls == [("set_targets", [])]  # nothing to steer, nothing set up
    await open_tunnel(tunnel, env.events, env.c.targets.values())
    assert ("open",) not in tunnel.calls

    seen_by_health = []
    update = env.health.update
    env.health.update = lambda targets, inherit=None: (seen_by_health.append(list(tunnel.calls)),
                                                       update(targets, inherit))
    env.c._forwarder_open = True
    env.write("main.yaml", [cvip(health_check=tunnel_check, check=False)])
    from node.config import load_vip_sources

    env.c._install_vips(load_vip_sources(env.vip_dir), "reload")
    # the marks were written before the monitor got the new targets
    assert seen_by_health[-1][-1] == ("set_targets", ["10.0.1.1", "10.0.1.2", "10.0.1.3"])
    assert all(t.tunnel and str(t.probe_address) == "10.100.0.1" for t in env.c.targets.values())
    await asyncio.sleep(0.05)  # the supervised one-shot task opens the tunnel
    assert ("open",) in tunnel.calls
    assert "health_tunnel_ready" in env.event_names()
    await env.c.reconcile()
    assert env.c.status()["vips"]["web"]["health_path"] == "tunnel"
    assert env.c.vip_view("web")["health_path"] == "tunnel"
    await env.c.supervisor.stop()


async def test_a_tunnel_that_cannot_be_set_up_is_an_error_event_not_a_crash(tmp_path):
    from node.events import EventLog
    from node.health_path import close_tunnel, open_tunnel

    v = vip()
    targets = [health_target(v, b) for b in v.backends]
    events = EventLog()
    tunnel = RecordingTunnel(fail="cannot add mlbhc0: Operation not supported")
    await open_tunnel(tunnel, events, targets)
    (event,) = [e for e in events.recent if e["event"] == "health_tunnel_error"]
    assert "cannot add mlbhc0" in event["msg"] and event["level"] == "error"
    await close_tunnel(tunnel)
    assert tunnel.calls == [("open",), ("close",)]


def test_maglev_status_shows_the_tunnel_once_it_is_set_up(capsys):
    import argparse

    from node.commands.ops import cmd_status

    status = {"node_id": "lb-1", "uptime": 1.0, "warmup_over": True, "node_drained": False,
              "forwarder": {"ok": True, "mode": "native", "interfaces": ["eth0"], "error": None,
                            "last_self_test": {"reason": "ok"}},
              "bgp": {"sessions": {}}, "vips": {}, "last_reload": None, "health_tunnel": None}

    class Client:
        def get(self, path):
            return status

    cmd_status(Client(), argparse.Namespace(json=False))
    assert "health tunnel" not in capsys.readouterr().out
    status["health_tunnel"] = {"ok": True, "targets": 3, "device": "mlbhc0"}
    cmd_status(Client(), argparse.Namespace(json=False))
    assert "health tunnel: OK (3 backend(s) via mlbhc0)" in capsys.readouterr().out
    status["health_tunnel"] = {"ok": False, "error": "the node's tunnel for health checks is not set up: no veth"}
    cmd_status(Client(), argparse.Namespace(json=False))
    assert "health tunnel: FAILING: the node's tunnel for health checks is not set up: no veth" in capsys.readouterr().out
