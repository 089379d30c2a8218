"""Live data path: a real TCP connection to a VIP through the XDP forwarder, answered by DSR.

Topology (one L2 segment, a bridge in its own namespace; every name carries a unique prefix):

    client 10.99.0.1 / fd99::1 ──┐
    node   10.99.0.2 / fd99::2 ──┼── bridge (namespace "sw")
    backend 10.99.0.3 / fd99::3 ─┘

The client routes the VIPs via the node. The node runs the real Forwarder (XDP, native on its
veth) with one IPv4 and one IPv6 VIP whose only backend is the backend host; it wraps each
packet in GRE and bounces it out of the same interface (XDP_TX) to the backend's MAC. The
backend runs `maglev backend setup` (the tc-BPF decap program, VIPs on lo, DSR sysctls) and a
plain TCP echo server bound to the VIPs; it answers the client directly, from the VIP, so the
replies never enter the node. Each test moves 1 MB each way and verifies it byte for byte, then
checks the counters: the node forwarded exactly the packets the backend decapsulated, and the
node's interface received the request bytes only, not the 1 MB of replies.

The datapath field notes' pitfalls are handled here: an XDP_PASS program on the bridge port
facing the node (XDP_TX on a veth needs one on the peer), TX checksum offload off on the client
(native XDP drops CHECKSUM_PARTIAL metadata), a permanent neighbour entry for the backend on the
node (bpf_fib_lookup needs it) with forwarding on, an advertised MSS on the backend's route to
the client that leaves room for GRE, and a bpffs mounted from the root mount namespace.

Run as a module inside the node's namespace, this file is also the node's forwarder process
(`python -m tests.integration.test_forwarder_live node CONFIG`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.harness import decap_counters, maglev_backend, popen, teardown

VIP4, VIP6, PORT = "198.51.100.10", "2001:db8:100::10", 8080
CLIENT4, NODE4, BACKEND4 = "10.99.0.1", "10.99.0.2", "10.99.0.3"
CLIENT6, NODE6, BACKEND6 = "fd99::1", "fd99::2", "fd99::3"
MACS = {"c": "02:99:00:00:00:01", "n": "02:99:00:00:00:02", "b": "02:99:00:00:00:03"}
TRANSFER = 1 << 20
# GRE over IPv4 adds 24 bytes, over IPv6 44: the backend advertises an MSS that still fits a
# 1500-byte MTU once the node has encapsulated the client's segments.
ADVMSS4 = 1500 - 20 - 20 - 24
ADVMSS6 = 1500 - 40 - 20 - 44

ECHO_SERVER = textwrap.dedent(f"""
    import socket, sys, threading
    def echo(c):
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)
    def serve(s):
        while True:
            c, _ = s.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()
    socks = []
    for fam, addr in ((socket.AF_INET, {VIP4!r}), (socket.AF_INET6, {VIP6!r})):
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, {PORT}))
        s.listen(16)
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
""")

CLIENT = textwrap.dedent("""
    import hashlib, json, os, socket, sys, threading, time
    vip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = os.urandom(size)
    got = bytearray()
    t0 = time.monotonic()
    c = socket.create_connection((vip, port), timeout=20)
    def read():
        while True:
            d = c.recv(65536)
            if not d:
                return
            got.extend(d)
    r = threading.Thread(target=read)
    r.start()
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    r.join(30)
    c.close()
    print(json.dumps({"sent": len(data), "received": len(got), "same": bytes(got) == data,
                      "seconds": time.monotonic() - t0}))
""")


# ---------------------------------------------------------------------------------------------
# The node's process (runs inside the node namespace)
# ---------------------------------------------------------------------------------------------


def node_main(config_path: str) -> int:
    """Open the Forwarder, attach, sync one VIP per family, answer 'counters' on stdin."""
    from ipaddress import ip_address

    from node.config import ForwarderConfig
    from node.forwarder.loader import BackendSpec, Forwarder, VipSpec
    from node.maglev import build_table

    cfg = json.loads(Path(config_path).read_text())
    fc = ForwarderConfig(interfaces=["eth0"], encap_source_v4=NODE4, encap_source_v6=NODE6,
                         bpffs=Path(cfg["bpffs"]), mtu=1500)
    fwd = Forwarder(fc)
    fwd.open()
    try:
        mode = fwd.attach()
        specs = []
        for name, vip, backend in (("web4", VIP4, BACKEND4), ("web6", VIP6, BACKEND6)):
            key = f"[{backend}]:{PORT}" if ":" in backend else f"{backend}:{PORT}"
            table = build_table({key: 1.0}, 251)
            specs.append(VipSpec(name, ip_address(vip), "tcp", PORT,
                                 (BackendSpec(key, ip_address(backend), "active"),),
                                 tuple(table.backends[i] for i in table.entries)))
        fwd.sync(specs)
        st = fwd.self_test()
        print(json.dumps({"mode": mode, "self_test_ok": st.ok, "self_test": st.reason}), flush=True)
        for line in sys.stdin:
            if line.strip() == "counters":
                print(json.dumps(fwd.counters()), flush=True)
            else:
                break
    finally:
        fwd.detach()
        fwd.remove_pins()
        fwd.close()
    return 0


# ---------------------------------------------------------------------------------------------
# The test harness (root namespace)
# ---------------------------------------------------------------------------------------------


class Lab:
    def __init__(self, prefix: str, tmp: Path):
        from lab.netns import Netns

        self.prefix, self.tmp = prefix, tmp
        self.ns = {k: Netns(f"{prefix}-{k}") for k in ("c", "n", "b", "s")}
        self.procs: list[subprocess.Popen] = []
        self.node: subprocess.Popen | None = None

    def build(self) -> None:
        from lab.netns import Netns, mount_bpffs, veth
        from lab.topology import build_xdp_pass

        for key in self.ns:
            self.ns[key] = Netns.create(self.ns[key].name)
        sw = self.ns["s"]
        sw.ip("link", "add", "br0", "type", "bridge")
        sw.ip("link", "set", "br0", "up")
        for key, ip4, ip6 in (("c", CLIENT4, CLIENT6), ("n", NODE4, NODE6), ("b", BACKEND4, BACKEND6)):
            ns, port = self.ns[key], f"{self.prefix}{key}"
            ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
            ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
            veth(ns, "eth0", sw, port)
            ns.ip("link", "set", "eth0", "address", MACS[key])
            ns.add_address("eth0", f"{ip4}/24")
            ns.add_address("eth0", f"{ip6}/64")
            sw.ip("link", "set", port, "master", "br0")
        # XDP_TX frames from the node's veth are only delivered if its peer runs XDP.
        xdp_pass = build_xdp_pass()
        sw.ip("link", "set", "dev", f"{self.prefix}n", "xdpdrv", "obj", str(xdp_pass), "sec", "xdp")

        client, node, backend = self.ns["c"], self.ns["n"], self.ns["b"]
        client.run("ethtool", "-K", "eth0", "tx", "off")
        client.ip("route", "add", f"{VIP4}/32", "via", NODE4)
        client.ip("-6", "route", "add", f"{VIP6}/128", "via", NODE6)
        node.run("ethtool", "-K", "eth0", "tx", "off")
        node.sysctl("net.ipv4.ip_forward", 1)
        node.sysctl("net.ipv6.conf.all.forwarding", 1)
        node.ip("neigh", "replace", BACKEND4, "lladdr", MACS["b"], "dev", "eth0", "nud", "permanent")
        node.ip("neigh", "replace", BACKEND6, "lladdr", MACS["b"], "dev", "eth0", "nud", "permanent")
        backend.ip("route", "add", f"{CLIENT4}/32", "dev", "eth0", "advmss", str(ADVMSS4))
        backend.ip("-6", "route", "add", f"{CLIENT6}/128", "dev", "eth0", "advmss", str(ADVMSS6))
        mount_bpffs(self.tmp / "node-bpffs")
        mount_bpffs(self.tmp / "backend-bpffs")
        wait_for_bridge(client, node, backend)

    def backend_cli(self, *args: str) -> str:
        return maglev_backend(self.ns["b"], self.tmp, *args)

    def start_backend(self) -> None:
        self.backend_cli("setup", "--vip", VIP4, "--vip", VIP6)
        server = self.popen("b", [sys.executable, "-c", ECHO_SERVER])
        assert server.stdout.readline().strip() == "ready", "the echo server did not start"

    def start_node(self) -> dict:
        cfg = self.tmp / "node.json"
        cfg.write_text(json.dumps({"bpffs": str(self.tmp / "node-bpffs")}))
        self.node = self.popen("n", [sys.executable, "-m", "tests.integration.test_forwarder_live",
                                     "node", str(cfg)])
        line = self.node.stdout.readline()
        if not line:
            raise AssertionError(f"the node's forwarder did not start: {self.node.stderr.read()}")
        return json.loads(line)

    def node_counters(self) -> dict:
        assert self.node is not None
        self.node.stdin.write("counters\n")
        self.node.stdin.flush()
        line = self.node.stdout.readline()
        if not line:
            raise AssertionError(f"the node's forwarder process died: {self.node.stderr.read()[-3000:]}")
        return json.loads(line)

    def decap_counters(self) -> dict[str, int]:
        return decap_counters(self.ns["b"], self.tmp)

    def link_stats(self, key: str) -> dict[str, int]:
        """rx_bytes/tx_bytes/rx_packets/tx_packets of the host's eth0."""
        out = self.ns[key].ip("-s", "-j", "link", "show", "dev", "eth0").stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{d}_{f}": stats[d][f] for d in ("rx", "tx") for f in ("bytes", "packets")}

    def popen(self, key: str, argv: list[str]) -> subprocess.Popen:
        return popen(self.ns[key], argv, self.procs)

    def transfer(self, vip: str) -> dict:
        proc = self.ns["c"].run(sys.executable, "-c", CLIENT, vip, str(PORT), str(TRANSFER),
                                check=False, timeout=60)
        assert proc.returncode == 0, f"client to {vip} failed: {proc.stderr.strip()[-2000:]}"
        return json.loads(proc.stdout)

    def close(self) -> None:
        teardown(self.prefix, self.tmp, self.ns["b"], self.procs, self.node, "quit", wait=5)


def wait_for_bridge(client, node, backend) -> None:
    """The bridge ports need a moment to forward (no STP, but the links come up async)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if client.run("ping", "-c1", "-W1", BACKEND4, check=False).returncode == 0:
            return
    raise AssertionError("the test bridge never forwarded between client and backend")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    from lab.netns import unique_prefix

    env = Lab(unique_prefix(), tmp_path_factory.mktemp("live"))
    try:
        env.build()
        env.start_backend()
        env.status = env.start_node()
        yield env
    finally:
        env.close()


pytestmark = [pytest.mark.root, pytest.mark.integration]


def test_forwarder_attached_and_self_test_passes(lab):
    assert lab.status["mode"] == "native"
    assert lab.status["self_test_ok"], lab.status["self_test"]


@pytest.mark.parametrize("name,vip", [("web4", VIP4), ("web6", VIP6)])
def test_one_megabyte_each_way_through_the_node_answered_by_dsr(lab, name, vip):
    node_before = lab.node_counters()["vips"][name]
    decap_before = lab.decap_counters()
    node_link_before, backend_link_before = lab.link_stats("n"), lab.link_stats("b")

    result = lab.transfer(vip)

    assert result["sent"] == TRANSFER and result["received"] == TRANSFER, result
    assert result["same"], "the echoed bytes differ from the ones sent"
    node_after = lab.node_counters()["vips"][name]
    decap_after = lab.decap_counters()
    forwarded = node_after["packets"] - node_before["packets"]
    decap_key = "decap_v4" if name == "web4" else "decap_v6"
    decapsulated = decap_after[decap_key] - decap_before[decap_key]
    # Every client->VIP packet went node -> backend, and nothing else was decapsulated.
    assert forwarded >= TRANSFER // 1500, f"the node forwarded only {forwarded} packets"
    assert decapsulated == forwarded
    assert node_after["bytes"] - node_before["bytes"] >= TRANSFER
    assert node_after["new_flows"] - node_before["new_flows"] == 1
    # DSR: the node's interface received the requests (~1 MB + headers) but not the 1 MB of
    # replies, which left the backend straight for the client.
    node_rx = lab.link_stats("n")["rx_bytes"] - node_link_before["rx_bytes"]
    backend_tx = lab.link_stats("b")["tx_bytes"] - backend_link_before["tx_bytes"]
    print(f"{name}: {result['seconds']:.3f} s, node forwarded {forwarded} packets, backend "
          f"decapsulated {decapsulated}, node rx {node_rx} B, backend tx {backend_tx} B")
    assert TRANSFER <= node_rx < 1.3 * TRANSFER, f"node received {node_rx} bytes"
    assert backend_tx >= TRANSFER, f"backend sent only {backend_tx} bytes"
    drops = {k: v for k, v in lab.node_counters()["drops"].items() if v}
    assert not drops, f"the node dropped packets: {drops}"


def test_without_decap_for_the_vip_the_backend_does_not_answer(lab):
    """The decap program, gated by its VIP map, is what makes the backend answer: serve only the
    IPv6 VIP and an IPv4 connection fails while its GRE packets are counted as not for a VIP."""
    lab.backend_cli("setup", "--vip", VIP6)
    try:
        before = lab.decap_counters()
        probe = "import socket,sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5)\nexcept OSError:\n sys.exit(3)"
        proc = lab.ns["c"].run(sys.executable, "-c", probe, VIP4, str(PORT), check=False)
        assert proc.returncode == 3, "the connection succeeded without decapsulation"
        after = lab.decap_counters()
        assert after["pass_not_vip"] > before["pass_not_vip"]
        assert after["decap_v4"] == before["decap_v4"]
    finally:
        lab.backend_cli("setup", "--vip", VIP4, "--vip", VIP6)
    assert lab.transfer(VIP4)["same"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "node":
    sys.exit(node_main(sys.argv[2]))
