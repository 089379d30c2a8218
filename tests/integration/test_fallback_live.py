"""The fallback pool serves real traffic through the real forwarder (issue 14).

`maglev node` as a whole (XDP forwarder, HTTP health checks, ExaBGP peering with FRR) and two
real backends behind it, each running `maglev backend setup` (decap, VIP on lo) and the lab's
backend server, which answers its own name on the VIP (DSR). The VIP's primary pool is one
backend, its fallback pool the other. Stop the primary's server: its health check fails, the
primary pool is below min_healthy, the node moves the VIP's table to the fallback pool and
de-prefers its route at the router; a new connection is answered by the fallback backend.
Start it again: back to the primary, plain route.

Topology (one bridge; every name carries a unique "p14" prefix, removed even on failure):

    client  10.98.0.1 ──┐
    node    10.98.0.2 ──┤   node: maglev node, AS 65001, XDP on eth0
    primary 10.98.0.3 ──┼── bridge
    fallbk  10.98.0.4 ──┤
    router  10.98.0.9 ──┘   FRR, AS 65000
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from lab.frr import FrrRouter, Neighbor, render_config
from lab.netns import Netns, cleanup_prefix, mount_bpffs, umount, unique_prefix, veth
from lab.nssocket import in_netns
from lab.topology import build_xdp_pass
from node.client import Client

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
VIP = "198.51.100.20"
HOSTS = {"c": "10.98.0.1", "n": "10.98.0.2", "p": "10.98.0.3", "f": "10.98.0.4", "r": "10.98.0.9"}
MACS = {k: f"02:98:00:00:00:0{i + 1}" for i, k in enumerate(HOSTS)}
NAMES = {"p": "primary-1", "f": "fallback-1"}
HEALTH_PORT = 8080
TOKEN = "fallback-test-token"
# GRE over IPv4 adds 24 bytes: the backends advertise an MSS that fits once encapsulated.
ADVMSS = 1500 - 20 - 20 - 24

GET = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], 80), timeout=5)
    c.sendall(b"GET / HTTP/1.1\\r\\nHost: vip\\r\\nConnection: close\\r\\n\\r\\n")
    data = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        data += d
    print(data.split(b"\\r\\n\\r\\n", 1)[1].decode().strip())
""")


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


class Lab:
    def __init__(self) -> None:
        self.prefix = unique_prefix("p14")
        self.dir = Path(tempfile.mkdtemp(prefix="p14f"))  # short: ExaBGP's socket path
        self.ns: dict[str, Netns] = {}
        self.servers: dict[str, subprocess.Popen] = {}
        self.node: subprocess.Popen | None = None
        self.router: FrrRouter | None = None
        self.mounts: list[Path] = []

    def build(self) -> None:
        sw = Netns.create(f"{self.prefix}-s")
        self.ns["s"] = sw
        sw.ip("link", "add", "br0", "type", "bridge")
        sw.ip("link", "set", "br0", "up")
        for key, addr in HOSTS.items():
            ns = self.ns[key] = Netns.create(f"{self.prefix}-{key}")
            port = f"{self.prefix}{key}"
            veth(ns, "eth0", sw, port)
            ns.ip("link", "set", "eth0", "address", MACS[key])
            ns.add_address("eth0", f"{addr}/24")
            sw.ip("link", "set", port, "master", "br0")
        # XDP_TX out of the node's veth is delivered only if its peer runs XDP.
        sw.ip("link", "set", "dev", f"{self.prefix}n", "xdpdrv", "obj", str(build_xdp_pass()), "sec", "xdp")
        c, n = self.ns["c"], self.ns["n"]
        c.run("ethtool", "-K", "eth0", "tx", "off")  # native XDP drops CHECKSUM_PARTIAL packets
        c.ip("route", "add", f"{VIP}/32", "via", HOSTS["n"])
        n.run("ethtool", "-K", "eth0", "tx", "off")
        n.sysctl("net.ipv4.ip_forward", 1)
        for key in ("p", "f"):  # bpf_fib_lookup needs the backends' neighbour entries
            n.ip("neigh", "replace", HOSTS[key], "lladdr", MACS[key], "dev", "eth0", "nud", "permanent")
            self.ns[key].ip("route", "add", f"{HOSTS['c']}/32", "dev", "eth0", "advmss", str(ADVMSS))
            self.backend_cli(key, "setup", "--vip", VIP)
            self.start_server(key)
        self.router = FrrRouter(self.ns["r"], render_config(asn=65000, router_id=HOSTS["r"],
                                                            neighbors=[Neighbor(HOSTS["n"], 65001)]))
        self.router.start()
        self.start_node()

    def mount(self, name: str) -> Path:
        path = mount_bpffs(self.dir / name)
        self.mounts.append(path)
        return path

    def backend_cli(self, key: str, *args: str) -> None:
        bpffs = self.dir / f"{key}-bpffs"
        if bpffs not in self.mounts:
            self.mount(f"{key}-bpffs")
        proc = self.ns[key].run(sys.executable, "-m", "node.cli", "backend", *args, "--interface", "eth0",
                                "--bpffs", str(bpffs), "--state-dir", str(self.dir / f"{key}-state"), check=False)
        assert proc.returncode == 0, f"maglev backend {args[0]} on {key} failed: {proc.stderr}{proc.stdout}"

    def start_server(self, key: str) -> None:
        self.servers[key] = subprocess.Popen(self.ns[key].exec_argv(
            [sys.executable, "-m", "lab.backend_server", "--name", NAMES[key], "--vip", VIP,
             "--health-port", str(HEALTH_PORT)]), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_server(self, key: str) -> None:
        proc = self.servers.pop(key)
        proc.kill()  # by PID
        proc.wait(5)

    def start_node(self) -> None:
        vip_dir = self.dir / "vips"
        vip_dir.mkdir()
        (vip_dir / "web.yaml").write_text(yaml.safe_dump({"vips": [{
            "name": "web", "address": VIP, "port": 80, "table_size": 251,
            "backends": [{"address": HOSTS["p"]}],
            "fallback_backends": [{"address": HOSTS["f"]}],
            "health_check": {"type": "http", "path": "/healthz", "port": HEALTH_PORT,
                             "interval": 0.3, "timeout": 0.2, "rise": 1, "fall": 1},
        }]}))
        (self.dir / "token").write_text(TOKEN + "\n")
        node_file = self.dir / "node.yaml"
        node_file.write_text(yaml.safe_dump({
            "node_id": "fallback-node", "vip_dir": str(vip_dir), "run_dir": str(self.dir / "run"), "warmup": 5,
            "bgp": {"local_as": 65001, "router_id": HOSTS["n"], "local_address": HOSTS["n"],
                    "withdraw_delay": 0.2, "min_change_interval": 0,
                    "peers": [{"address": HOSTS["r"], "peer_as": 65000}]},
            "forwarder": {"interfaces": ["eth0"], "xdp_mode": "native", "encap_source_v4": HOSTS["n"],
                          "bpffs": str(self.mount("node-bpffs")), "self_test_interval": 1, "conntrack_size": 4096},
            "api": {"token_file": str(self.dir / "token")},
        }))
        self.log = open(self.dir / "node.log", "a")
        self.node = subprocess.Popen(self.ns["n"].exec_argv(
            [sys.executable, "-m", "node.cli", "node", "--config", str(node_file)]),
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def vip_view(self) -> dict:
        with in_netns(self.ns["n"].name):
            return Client("http://127.0.0.1:9180", TOKEN).get("/api/v1/vips/web")

    def get(self) -> str:
        proc = self.ns["c"].run(sys.executable, "-c", GET, VIP, check=False, timeout=20)
        assert proc.returncode == 0, f"GET http://{VIP}/ failed: {proc.stderr.strip()[-1000:]}"
        return proc.stdout.strip()

    def as_path(self) -> str | None:
        paths = self.router.bgp_paths(f"{VIP}/32")
        return paths[0]["aspath"]["string"] if paths else None

    def log_text(self) -> str:
        self.log.flush()
        return (self.dir / "node.log").read_text()

    def teardown(self) -> None:
        if self.node is not None and self.node.poll() is None:
            self.node.send_signal(signal.SIGTERM)
            try:
                self.node.wait(15)
            except subprocess.TimeoutExpired:
                self.node.kill()
                self.node.wait(5)
        for key in ("p", "f"):
            if key in self.ns:
                self.ns[key].run(sys.executable, "-m", "node.cli", "backend", "teardown", "--interface", "eth0",
                                 "--bpffs", str(self.dir / f"{key}-bpffs"), "--state-dir",
                                 str(self.dir / f"{key}-state"), check=False)
        for proc in self.servers.values():
            proc.kill()
            proc.wait(5)
        if self.router is not None:
            self.router.stop()
        cleanup_prefix(self.prefix)
        for path in self.mounts:
            umount(path)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab():
    if shutil.which("vtysh") is None:
        pytest.fail("FRR (vtysh, /usr/lib/frr/bgpd) is not installed: apt-get install frr (see Makefile)")
    lab = Lab()
    try:
        lab.build()
        wait_for(lambda: lab.as_path() == "65001", 40, "the VIP announced to the router")
        yield lab
    except BaseException:
        if lab.node is not None:
            print(lab.log_text()[-6000:])
        raise
    finally:
        lab.teardown()


def test_fallback_pool_serves_through_the_forwarder_while_the_primary_is_down(lab):
    view = lab.vip_view()
    assert view["state"] == "announced" and not view["fallback_in_use"]
    assert lab.get() == NAMES["p"]

    lab.stop_server("p")
    wait_for(lambda: lab.vip_view()["fallback_in_use"], 15, "the node to switch to the fallback pool")
    view = lab.vip_view()
    assert view["state"] == "depreferred" and "serving from the fallback pool (1 backend(s))" in view["reason"]
    assert {b["key"]: (b["fallback"], b["serving"]) for b in view["backends"]} == {
        HOSTS["p"]: (False, False), HOSTS["f"]: (True, True)}
    # The forwarder's table now holds the fallback backend only: new connections reach it.
    for _ in range(3):
        assert lab.get() == NAMES["f"]
    wait_for(lambda: lab.as_path() == "65001 65001 65001 65001", 10, "the route de-preferred at the router")

    lab.start_server("p")
    wait_for(lambda: not lab.vip_view()["fallback_in_use"], 15, "the node back on the primary pool")
    assert lab.get() == NAMES["p"]
    wait_for(lambda: lab.as_path() == "65001", 10, "a plain route again")
    assert "VIP web (198.51.100.20/32) depreferred" in lab.log_text()
