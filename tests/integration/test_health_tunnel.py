"""Tunnel health checks end to end: the real XDP forwarder, the real hc_tunnel.c on the node's
probe device, the real decap program on a backend, real servers on the VIP.

    node   eth0 10.97.0.2 / fd97::2  ── veth ──  backend eth0 10.97.0.3 / fd97::3
           XDP forwarder (VIPs -> the backend)          tc decap, VIPs on lo, servers on
           probe device mlbhc0 + hc_tunnel.c            the VIPs and on its own address

Every probe type that makes sense through the tunnel (tcp, http, https, udp, dns), IPv4 and
IPv6, is run by the real Prober inside the node's namespace (it is this file, run as a module:
``python -m tests.integration.test_health_tunnel node CONFIG``), marked for the backend by the
real HealthTunnel. With decap and the VIP the tunnel check passes; with the VIP gone from the
backend's lo, or its decap detached, it fails and says so, while a direct check of the same
backend still passes: exactly the blackhole a direct check cannot see.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import textwrap
from pathlib import Path

import pytest

from tests.integration.harness import decap_counters, maglev_backend, popen, teardown

VIP4, VIP6 = "198.51.100.20", "2001:db8:100::20"
NODE4, NODE6 = "10.97.0.2", "fd97::2"
BACKEND4, BACKEND6 = "10.97.0.3", "fd97::3"
HTTP, HTTPS, UDP, DNS = 8080, 8443, 7007, 53
FAMILIES = {4: (VIP4, BACKEND4), 6: (VIP6, BACKEND6)}

# The backend's servers: TCP ones on the wildcard (they answer from the address they were asked
# at), UDP ones bound to each address (a wildcard UDP reply takes the route's source, not the
# VIP, and the probe's connected socket would drop it). FREEBIND: bound before/after the VIP.
SERVER = textwrap.dedent(f"""
    import socket, ssl, struct, sys, threading
    CERT, KEY = sys.argv[1], sys.argv[2]
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(CERT, KEY)
    RESPONSE = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok"
    def http(c, wrap):
        try:
            if wrap:
                c = tls.wrap_socket(c, server_side=True)
            c.settimeout(5)
            data = b""
            while b"\\r\\n\\r\\n" not in data:
                d = c.recv(4096)
                if not d:
                    return
                data += d
            c.sendall(RESPONSE)
        except (OSError, ssl.SSLError):
            pass
        finally:
            c.close()
    def tcp_server(fam, port, wrap):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
        s.listen(64)
        while True:
            c, _ = s.accept()
            threading.Thread(target=http, args=(c, wrap), daemon=True).start()
    def dns_answer(q):
        qid, = struct.unpack_from("!H", q)
        end = q.index(b"\\0", 12) + 5
        qtype, = struct.unpack_from("!H", q, end - 4)
        rdata = socket.inet_aton("192.0.2.1") if qtype == 1 else socket.inet_pton(socket.AF_INET6, "2001:db8::1")
        answer = struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata
        return struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + q[12:end] + answer
    def udp_server(fam, addr, port, dns):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
        s.bind((addr, port))
        while True:
            q, peer = s.recvfrom(2048)
            s.sendto(dns_answer(q) if dns else b"pong:" + q, peer)
    threads = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        threads += [(tcp_server, (fam, {HTTP}, False)), (tcp_server, (fam, {HTTPS}, True))]
    for fam, addrs in ((socket.AF_INET, ({VIP4!r}, {BACKEND4!r})), (socket.AF_INET6, ({VIP6!r}, {BACKEND6!r}))):
        for a in addrs:
            threads += [(udp_server, (fam, a, {UDP}, False)), (udp_server, (fam, a, {DNS}, True))]
    for fn, args in threads:
        threading.Thread(target=fn, args=args, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

CHECKS = {
    "tcp": {"type": "tcp", "port": HTTP},
    "http": {"type": "http", "port": HTTP, "path": "/healthz"},
    "https": {"type": "https", "port": HTTPS, "path": "/healthz", "tls_verify": False},
    "udp": {"type": "udp", "port": UDP, "payload": "ping", "expect": "pong:ping"},
    "dns": {"type": "dns", "port": DNS, "query_name": "example.test"},
}


# ---------------------------------------------------------------------------------------------
# The node's process (runs inside the node namespace)
# ---------------------------------------------------------------------------------------------


def node_main(config_path: str) -> int:
    """Open the real Forwarder (XDP, the VIPs steered to the backend) and the real tunnel, then
    answer one JSON line per request: {"probe": [...]} -> verdicts, {"counters": 1} -> counters."""
    import asyncio
    from ipaddress import ip_address

    from pydantic import TypeAdapter

    from healthcheck import Target
    from healthcheck.probes import Prober
    from node.config import ForwarderConfig, HealthCheck
    from node.forwarder.hc_tunnel import HealthTunnel
    from node.forwarder.loader import BackendSpec, Forwarder, VipSpec
    from node.maglev import build_table

    cfg = json.loads(Path(config_path).read_text())
    fc = ForwarderConfig(interfaces=["eth0"], encap_source_v4=NODE4, encap_source_v6=NODE6,
                         bpffs=Path(cfg["bpffs"]), mtu=1500)
    fwd = Forwarder(fc)
    fwd.open()
    tunnel = HealthTunnel.from_config(fc)
    checks = TypeAdapter(HealthCheck)
    try:
        mode = fwd.attach()
        specs = []
        for name, (vip, backend) in (("t4", FAMILIES[4]), ("t6", FAMILIES[6])):
            table = build_table({backend: 1.0}, 251)
            specs.append(VipSpec(name, ip_address(vip), "tcp", "all",
                                 (BackendSpec(backend, ip_address(backend), "active"),),
                                 tuple(table.backends[i] for i in table.entries)))
        fwd.sync(specs)
        tunnel.set_targets([ip_address(BACKEND4), ip_address(BACKEND6)])
        tunnel.open()
        print(json.dumps({"mode": mode}), flush=True)

        async def probe(requests):
            async with Prober(tunnel=tunnel) as prober:
                out = []
                for r in requests:
                    check = checks.validate_python(r["check"])
                    target = Target(ip_address(r["backend"]), None, check,
                                    vip=ip_address(r["vip"]) if r.get("vip") else None)
                    result = await prober.probe(target)
                    out.append({"ok": result.ok, "reason": result.reason})
                return out

        for line in sys.stdin:
            request = json.loads(line)
            if "probe" in request:
                print(json.dumps(asyncio.run(probe(request["probe"]))), flush=True)
            elif "counters" in request:
                print(json.dumps({"tunnel": tunnel.counters(), "forwarder": fwd.counters()}), flush=True)
            else:
                break
    finally:
        tunnel.close()
        fwd.detach()
        fwd.remove_pins()
        fwd.close()
    return 0


# ---------------------------------------------------------------------------------------------
# The harness (root namespace)
# ---------------------------------------------------------------------------------------------


class Env:
    def __init__(self, prefix: str, tmp: Path):
        from lab.netns import Netns

        self.prefix, self.tmp = prefix, tmp
        self.node, self.backend = Netns(f"{prefix}-n"), Netns(f"{prefix}-b")
        self.procs: list[subprocess.Popen] = []
        self.node_proc: subprocess.Popen | None = None

    def build(self) -> None:
        from lab.netns import Netns, mount_bpffs, run

        self.node, self.backend = Netns.create(self.node.name), Netns.create(self.backend.name)
        for ns in (self.node, self.backend):
            ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
            ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        run(["ip", "link", "add", f"{self.prefix}n", "netns", self.node.name, "type", "veth",
             "peer", "name", "eth0", "netns", self.backend.name])
        self.node.ip("link", "set", f"{self.prefix}n", "name", "eth0")
        for ns, ip4, ip6 in ((self.node, NODE4, NODE6), (self.backend, BACKEND4, BACKEND6)):
            ns.add_address("eth0", f"{ip4}/24")
            ns.add_address("eth0", f"{ip6}/64")
            ns.link_up("eth0")
            ns.run("ethtool", "-K", "eth0", "tx", "off")
        mount_bpffs(self.tmp / "node-bpffs")
        mount_bpffs(self.tmp / "backend-bpffs")
        certdir = self.tmp / "tls"
        certdir.mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(certdir / "key.pem"), "-out", str(certdir / "cert.pem"),
                        "-days", "1", "-subj", "/CN=vip.test"], check=True, capture_output=True)
        self.setup_backend()
        server = self.popen(self.backend, [sys.executable, "-c", SERVER, str(certdir / "cert.pem"),
                                           str(certdir / "key.pem")])
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        cfg = self.tmp / "node.json"
        cfg.write_text(json.dumps({"bpffs": str(self.tmp / "node-bpffs")}))
        self.node_proc = self.popen(self.node, [sys.executable, "-m", "tests.integration.test_health_tunnel",
                                                "node", str(cfg)])
        line = self.node_proc.stdout.readline()
        assert line, f"the node did not start: {self.node_proc.stderr.read()[-3000:]}"
        self.mode = json.loads(line)["mode"]

    def backend_cli(self, *args: str) -> str:
        return maglev_backend(self.backend, self.tmp, *args)

    def setup_backend(self) -> None:
        self.backend_cli("setup", "--vip", VIP4, "--vip", VIP6)

    def popen(self, ns, argv: list[str]) -> subprocess.Popen:
        return popen(ns, argv, self.procs)

    def ask(self, request: dict):
        assert self.node_proc is not None
        self.node_proc.stdin.write(json.dumps(request) + "\n")
        self.node_proc.stdin.flush()
        line = self.node_proc.stdout.readline()
        assert line, f"the node process died: {self.node_proc.stderr.read()[-3000:]}"
        return json.loads(line)

    def probe(self, kind: str, family: int, via: str) -> dict:
        vip, backend = FAMILIES[family]
        check = dict(CHECKS[kind], via=via, timeout=1.0, interval=2.0)
        if kind == "dns" and family == 6:
            check["query_type"] = "AAAA"
        return self.ask({"probe": [{"check": check, "backend": backend,
                                    "vip": vip if via == "tunnel" else None}]})[0]

    def close(self) -> None:
        # a clean stop of the node's process removes the tunnel, detaches XDP and the pins
        teardown(self.prefix, self.tmp, self.backend, self.procs, self.node_proc, "{}", wait=10)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from lab.netns import unique_prefix

    e = Env(unique_prefix("t14"), tmp_path_factory.mktemp("tunnel"))
    try:
        e.build()
        yield e
    finally:
        e.close()


pytestmark = [pytest.mark.root, pytest.mark.integration]

KINDS = list(CHECKS)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_tunnel_check_passes_through_decap_and_the_vip(env, kind, family):
    before = env.ask({"counters": 1})["tunnel"]
    result = env.probe(kind, family, "tunnel")
    assert result["ok"], result
    assert result["reason"].endswith("through the tunnel"), result
    after = env.ask({"counters": 1})["tunnel"]
    # the probe really went through hc_tunnel.c (a SYN, or a datagram, at least)
    assert after[f"encap_v{family}"] > before[f"encap_v{family}"]
    assert after["drop_no_target"] == before["drop_no_target"]


@pytest.mark.parametrize("family", [4, 6])
def test_the_backend_answered_the_vip_not_its_own_address(env, family):
    """The decap counters of the backend move with tunnel probes: the VIP's answer came from a
    decapsulated packet, not from some route to the VIP."""
    def decapsulated() -> int:
        return decap_counters(env.backend, env.tmp)[f"decap_v{family}"]

    before = decapsulated()
    assert env.probe("tcp", family, "tunnel")["ok"]
    assert decapsulated() > before


@pytest.mark.parametrize("family", [4, 6])
def test_without_the_vip_on_lo_the_tunnel_check_fails_and_the_direct_one_passes(env, family):
    vip, _ = FAMILIES[family]
    prefix = f"{vip}/{32 if family == 4 else 128}"
    env.backend.ip("addr", "del", prefix, "dev", "lo")
    try:
        for kind in ("tcp", "udp"):
            tunnel = env.probe(kind, family, "tunnel")
            assert not tunnel["ok"], (kind, tunnel)
            assert tunnel["reason"].startswith("no answer through the tunnel"), tunnel
            assert "may lack VIP" in tunnel["reason"] and "decap" in tunnel["reason"], tunnel
            direct = env.probe(kind, family, "direct")
            assert direct["ok"], (kind, direct)
    finally:
        env.backend.ip("addr", "add", prefix, "dev", "lo")
    # The check passes again once the VIP is back: within a few probes, as a health check
    # would see it at its next interval (on a fresh host the first IPv6 probe right after the
    # address came back once failed).
    results = []
    for _ in range(10):
        results.append(env.probe("tcp", family, "tunnel"))
        if results[-1]["ok"]:
            break
        time.sleep(0.5)
    assert results[-1]["ok"], results


def test_without_decap_the_tunnel_check_fails_and_the_direct_one_passes(env):
    env.backend.run(sys.executable, "-c", "import socket; from node.forwarder import tc; "
                    "assert tc.detach(socket.if_nametoindex('eth0'))", check=True)
    try:
        for family in (4, 6):
            for kind in ("http", "dns"):
                tunnel = env.probe(kind, family, "tunnel")
                assert not tunnel["ok"], (kind, family, tunnel)
                assert tunnel["reason"].startswith("no answer through the tunnel"), tunnel
                assert env.probe(kind, family, "direct")["ok"], (kind, family)
    finally:
        env.setup_backend()
    assert env.probe("http", 4, "tunnel")["ok"]


def test_nothing_listening_on_the_vip_port_says_the_tunnel_works(env):
    check = {"type": "tcp", "port": 9, "via": "tunnel", "timeout": 1.0, "interval": 2.0}
    result = env.ask({"probe": [{"check": check, "backend": BACKEND4, "vip": VIP4}]})[0]
    assert not result["ok"]
    assert result["reason"].startswith("connection refused through the tunnel"), result
    assert f"nothing serves {VIP4}:9" in result["reason"]


def test_each_tunnel_probe_is_a_new_connection(env):
    """Three http probes: three SYNs through the tunnel (a kept-alive connection would not
    prove the backend still accepts new ones)."""
    def active_opens() -> int:
        head, values = [l.split() for l in env.node.run("cat", "/proc/net/snmp").stdout.splitlines()
                        if l.startswith("Tcp:")]
        return int(values[head.index("ActiveOpens")])

    before = active_opens()
    for _ in range(3):
        assert env.probe("http", 4, "tunnel")["ok"]
    assert active_opens() - before == 3


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "node":
        raise SystemExit(node_main(sys.argv[2]))
    raise SystemExit("usage: python -m tests.integration.test_health_tunnel node CONFIG")
