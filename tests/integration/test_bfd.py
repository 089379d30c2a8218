"""BFD on the node (bgp.bfd) against a real FRR router (bgpd + bfdd), in network namespaces.

    node1 (AS 65201, bgp.bfd enabled)  10.78.1.2 / fd78:1::2 --- router (AS 65000, FRR, static
    node2 (AS 65202, bgp.bfd disabled) 10.78.2.2 / fd78:2::2 ---  neighbors with `bfd profile`,
                                                                  100 ms x 3, timers 1 3)

Each node is a controller process *inside* its namespace (BgpSpeaker: ExaBGP, and bfdd when
enabled), as `maglev node` runs it, writing its status to a file. Freezing every process of a
node (SIGSTOP) is a hung machine: with BFD the router drops the node within a second; without,
only the 3 s hold timer does. Measured times are printed (-s to see them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bgp import exabgp
from lab.frr import FrrRouter, Neighbor, render_config
from lab.netns import Netns, cleanup_prefix, point_to_point, quiet_ipv6, unique_prefix
from node.config import BgpConfig
from tests.integration.bgp_harness import HOLD, ROUTER_AS, wait_for

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
BFD_NODE, PLAIN_NODE = 1, 2

CONTROLLER = r"""
import asyncio, ipaddress, json, os, sys
from pathlib import Path
from bgp import BgpSpeaker, Route
from node.config import BgpConfig

async def main():
    cfg = BgpConfig.model_validate(json.loads(sys.argv[1]))
    run = Path(sys.argv[2])
    sp = BgpSpeaker(cfg, run / "bgp", bfd_dir=run / "bfd")
    await sp.start()
    sp.set_desired([Route(ipaddress.ip_network(p)) for p in json.loads(sys.argv[3])])
    status = run / "status.json"
    while True:  # the status a `maglev status` would show, for the test to read
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(sp.status()))
        os.replace(tmp, status)
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


def v4(i: int) -> str:
    return f"10.78.{i}.2"


def v6(i: int) -> str:
    return f"fd78:{i}::2"


def vips(i: int) -> tuple[str, str]:
    return f"10.78.10{i}.1/32", f"fd78:10{i}::1/128"


def node_config(i: int, bfd: bool) -> BgpConfig:
    return BgpConfig.model_validate({
        "local_as": 65200 + i, "router_id": v4(i), "local_address": v4(i), "local_address_v6": v6(i),
        "hold_time": HOLD, "withdraw_delay": 0.2, "min_change_interval": 0, "flap_hold_down": 0,
        "peers": [{"address": f"10.78.{i}.1", "peer_as": ROUTER_AS},
                  {"address": f"fd78:{i}::1", "peer_as": ROUTER_AS}],
        **({"bfd": {"enabled": True, "interval_ms": 100, "multiplier": 3}} if bfd else {}),
    })


class Lab:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.router: FrrRouter | None = None
        self.nodes: dict[int, Netns] = {}
        self.controllers: dict[int, subprocess.Popen] = {}

    def build(self) -> None:
        rns = Netns.create(f"{self.prefix}-r")
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            rns.sysctl(key, 1)
        quiet_ipv6(rns)
        for i in (BFD_NODE, PLAIN_NODE):
            ns = Netns.create(f"{self.prefix}-n{i}")
            quiet_ipv6(ns, keep_addr_on_down=True)
            point_to_point(rns, f"{self.prefix}r{i}", ns, f"{self.prefix}n{i}", f"10.78.{i}", f"fd78:{i}")
            self.nodes[i] = ns
        # BFD on every neighbor, also the node without it: that must change nothing for it.
        neighbors = [Neighbor(a, 65200 + i, bfd=True) for i in self.nodes for a in (v4(i), v6(i))]
        self.router = FrrRouter(rns, render_config(asn=ROUTER_AS, router_id="10.78.0.1", neighbors=neighbors,
                                                   timers=(1, HOLD)), bfd=True)
        self.router.start()

    def run_dir(self, i: int) -> Path:
        return Path(f"/tmp/{self.prefix}-n{i}")

    def start_controller(self, i: int, bfd: bool) -> None:
        shutil.rmtree(self.run_dir(i), ignore_errors=True)
        self.run_dir(i).mkdir(mode=0o755)
        cfg = node_config(i, bfd).model_dump(mode="json")
        argv = [sys.executable, "-c", CONTROLLER, json.dumps(cfg), str(self.run_dir(i)), json.dumps(list(vips(i)))]
        self.controllers[i] = self.nodes[i].popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                                                  stderr=open(self.run_dir(i) / "controller.log", "w"))

    def status(self, i: int) -> dict:
        try:
            return json.loads((self.run_dir(i) / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def in_fib(self, i: int) -> bool:
        a, b = vips(i)
        return self.router.kernel_nexthops(a) == {v4(i)} and self.router.kernel_nexthops(b) == {v6(i)}

    def out_of_fib(self, i: int) -> bool:
        a, b = vips(i)
        return not self.router.kernel_nexthops(a) and not self.router.kernel_nexthops(b)

    def teardown(self) -> None:
        for proc in self.controllers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        for ns in self.nodes.values():  # anything left in a node (must be nothing), by PID
            for pid in ns.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.router is not None:
            self.router.stop()
        cleanup_prefix(self.prefix)
        for i in self.nodes:
            shutil.rmtree(self.run_dir(i), ignore_errors=True)


@pytest.fixture(scope="module")
def lab():
    if shutil.which("vtysh") is None or not Path("/usr/lib/frr/bfdd").exists():
        pytest.fail("FRR (vtysh, /usr/lib/frr/bgpd, bfdd) is not installed: apt-get install frr (see Makefile)")
    lab = Lab(unique_prefix())
    try:
        lab.build()
        lab.start_controller(BFD_NODE, bfd=True)
        lab.start_controller(PLAIN_NODE, bfd=False)
        for i in lab.nodes:
            wait_for(lambda: lab.in_fib(i), 30, f"node{i}'s VIPs at the router")
        wait_for(lambda: lab.router.bfd_peers().get(v4(BFD_NODE)) == "up"
                 and lab.router.bfd_peers().get(v6(BFD_NODE)) == "up", 10, "BFD up with node1")
        yield lab
    finally:
        lab.teardown()


def proc_names(ns: Netns) -> dict[int, str]:
    out = {}
    for pid in ns.pids():
        try:
            out[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            pass
    return out


def freeze(ns: Netns) -> list[int]:
    frozen = []
    for pid in ns.pids():
        try:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        except ProcessLookupError:
            pass
    return frozen


def thaw(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_node_reports_its_bfd_sessions(lab: Lab):
    i = BFD_NODE
    wait_for(lambda: {p: s["status"] for p, s in lab.status(i).get("bfd", {}).get("peers", {}).items()}
             == {f"10.78.{i}.1": "up", f"fd78:{i}::1": "up"}, 5, "node1's status to show both BFD sessions up")
    st = lab.status(i)["bfd"]
    assert st["enabled"] and st["healthy"] and st["restarts"] == 0
    assert (st["interval_ms"], st["multiplier"]) == (100, 3)
    # bfdd is the controller's own child (foreground, not daemonized), running as user frr.
    names = proc_names(lab.nodes[i])
    assert names.get(st["bfdd_pid"]) == "bfdd"
    ppid = int(Path(f"/proc/{st['bfdd_pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert ppid == lab.controllers[i].pid
    assert Path(f"/proc/{st['bfdd_pid']}").stat().st_uid == __import__("pwd").getpwnam("frr").pw_uid


def test_frozen_node_with_bfd_is_dropped_within_a_second(lab: Lab):
    i = BFD_NODE
    frozen = freeze(lab.nodes[i])
    try:
        took = wait_for(lambda: lab.out_of_fib(i), HOLD + 1, "the router to drop frozen node1")
        print(f"\n[bfd] node1 frozen (controller, ExaBGP, bfdd), BFD 100 ms x 3 -> router dropped "
              f"its IPv4 and IPv6 paths in {took:.3f} s (hold time {HOLD} s)")
        assert took < 1.0, f"node1 was dropped after {took:.2f} s: the hold timer, not BFD, did it"
    finally:
        thaw(frozen)
    back = wait_for(lambda: lab.in_fib(i), 20, "node1 back after SIGCONT")
    print(f"[bfd] node1 resumed -> its paths back in {back:.3f} s")


def test_bfdd_that_dies_is_restarted(lab: Lab):
    i = BFD_NODE
    wait_for(lambda: lab.router.bfd_peers().get(v4(i)) == "up", 10, "BFD up with node1")
    pid = lab.status(i)["bfd"]["bfdd_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (lab.status(i)["bfd"]["bfdd_pid"] or pid) != pid, 5, "a new bfdd")
    st = lab.status(i)["bfd"]
    assert st["restarts"] == 1 and "bfdd exited" in st["last_error"]
    took = wait_for(lambda: lab.router.bfd_peers().get(v4(i)) == "up" and lab.in_fib(i), 20,
                    "BFD and node1's paths back at the router")
    print(f"\n[bfd] bfdd SIGKILLed -> restarted, BFD and paths back at the router in {took:.3f} s")


def test_without_bfd_nothing_changes(lab: Lab):
    """node2 has bgp.bfd disabled (the router has `neighbor bfd` for it too): no bfdd, the same
    ExaBGP config as before BFD existed, and a frozen node2 is dropped by the hold timer only."""
    i = PLAIN_NODE
    assert "bfdd" not in proc_names(lab.nodes[i]).values()
    assert not (lab.run_dir(i) / "bfd").exists()
    assert lab.status(i)["bfd"] == {"enabled": False}
    cfg = node_config(i, bfd=False)
    text = (lab.run_dir(i) / "bgp" / "exabgp.conf").read_text()
    assert text == exabgp.render_config(cfg, lab.run_dir(i) / "bgp" / "api.sock")
    assert "bfd" not in text.lower()
    assert lab.router.bfd_peers().get(v4(i)) != "up"  # nobody answers the router's BFD
    frozen = freeze(lab.nodes[i])
    try:
        took = wait_for(lambda: lab.out_of_fib(i), HOLD + 1, "the router to drop frozen node2")
        print(f"\n[bfd] node2 frozen, no BFD -> router dropped its paths in {took:.3f} s (hold time {HOLD} s)")
        # The hold timer expires 2-3 s after the freeze (keepalives every second).
        assert took >= 1.5, f"node2 was dropped after {took:.2f} s, faster than any hold timer"
    finally:
        thaw(frozen)
    wait_for(lambda: lab.in_fib(i), 20, "node2 back after SIGCONT")


def test_bfdd_does_not_outlive_its_controller(lab: Lab):
    """Last: kills node1's controller. bfdd runs as user frr yet dies with it (setpriv's
    parent-death signal), and so does ExaBGP: nothing is left in the namespace."""
    i = BFD_NODE
    bfdd = lab.status(i)["bfd"]["bfdd_pid"]
    assert proc_names(lab.nodes[i]).get(bfdd) == "bfdd"
    lab.controllers[i].kill()
    lab.controllers[i].wait(5)
    wait_for(lambda: not lab.nodes[i].pids(), 3, "every process of node1 to die with its controller")
    took = wait_for(lambda: lab.out_of_fib(i), HOLD, "node1's paths to go")
    print(f"\n[bfd] controller SIGKILLed -> bfdd and ExaBGP gone, router dropped node1 within {took:.3f} s more")
