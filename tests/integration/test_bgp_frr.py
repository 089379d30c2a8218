"""BgpSpeaker (real ExaBGP 5.0.15) against a real FRR 8.4 router, in network namespaces.

Topology (one module-scoped lab, unique prefix, removed even on failure):

    node1 (AS 65101) 10.77.1.2 / fd77:1::2 --.
    node2 (AS 65102) 10.77.2.2 / fd77:2::2 ----  router (AS 65000, FRR, listen ranges,
    node3 (AS 65103) 10.77.3.2 / fd77:3::2 --'   maximum-paths 8, multipath-relax, timers 1 3)
    node4 (AS 65104) 10.77.4.2 / fd77:4::2 -- (subprocess controller, for the SIGKILL test)
    node5 (AS 65105) static neighbor with BFD (FRR's bfdd run by the test), IPv4 only
    node6 (AS 65106) static neighbor with BFD and graceful restart (the speaker runs bfdd)

Every node announces VIP4 and VIP6; the router must install one multipath route per VIP with a
nexthop per node, in its kernel FIB and in FRR's JSON. Measured times are printed (-s to see).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bgp import BgpSpeaker, Route
from lab.frr import FrrRouter, Neighbor, render_bfd_config, render_config
from lab.netns import Netns, quiet_ipv6, unique_prefix
from tests.integration.bgp_harness import (EXABGP, HOLD, ROUTER_AS, LoopThread, node_config,
                                           node_namespaces, teardown, wait_for)

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIP4 = "10.77.100.1/32"
VIP6 = "fd77:100::1/128"
VIP_BFD = "10.77.101.1/32"  # announced by node5 only (BFD test)
BFD_NODE = 5
GR_NODE = 6
VIP_GR = "10.77.106.1/32"  # announced by node6 only (graceful restart tests)
GR_RESTART = 6  # node6's bgp.graceful_restart.restart_time
REPO = Path(__file__).resolve().parents[2]


def routes() -> list[Route]:
    return [Route(ipaddress.ip_network(VIP4)), Route(ipaddress.ip_network(VIP6))]


class Lab:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.router: FrrRouter | None = None
        self.node_bfd: FrrRouter | None = None
        self.nodes: dict[int, Netns] = {}
        self.speakers: dict[int, BgpSpeaker] = {}
        self.loop: LoopThread | None = None

    def build(self, n_nodes: int) -> None:
        rns = Netns.create(f"{self.prefix}-r")
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding",
                    "net.ipv4.fib_multipath_hash_policy", "net.ipv6.fib_multipath_hash_policy"):
            rns.sysctl(key, 1)
        # FRR resets IPv6 sessions until the interface has its link-local address: skip DAD.
        quiet_ipv6(rns)
        self.nodes = node_namespaces(self.prefix, rns, range(1, n_nodes + 1))
        # node5 is a static neighbor with BFD (listen-range peers get BFD re-created per flap).
        cfg = render_config(asn=ROUTER_AS, router_id="10.77.0.1",
                            neighbors=[Neighbor(f"10.77.{BFD_NODE}.2", 65100 + BFD_NODE, bfd=True),
                                       Neighbor(f"10.77.{GR_NODE}.2", 65100 + GR_NODE, bfd=True)],
                            listen_ranges=["10.77.0.0/16", "fd77::/16"], timers=(1, HOLD), stalepath_time=30)
        self.router = FrrRouter(rns, cfg, bfd=True)
        self.router.start()
        self.node_bfd = FrrRouter(self.nodes[BFD_NODE], "", bfd=True, bgp=False, bfd_config=render_bfd_config(
            [(f"10.77.{BFD_NODE}.1", f"10.77.{BFD_NODE}.2")]))
        self.node_bfd.start()

    def run_dir(self, i: int) -> Path:
        return Path(f"/tmp/{self.prefix}-n{i}")

    def exabgp_argv(self, i: int) -> list[str]:
        return self.nodes[i].exec_argv(EXABGP)

    def start_speaker(self, i: int, **overrides) -> BgpSpeaker:
        cfg = node_config(i, **overrides)
        # With bgp.bfd the speaker runs bfdd itself, in the node's namespace.
        sp = BgpSpeaker(cfg, self.run_dir(i), exabgp_argv=self.exabgp_argv(i),
                        bfd_dir=self.run_dir(i) / "bfd", bfdd_wrapper=self.nodes[i].exec_argv([]))
        self.loop.run(sp.start())
        self.speakers[i] = sp
        return sp

    def teardown(self) -> None:
        teardown(self.prefix, self.loop, self.speakers.values(), (self.router, self.node_bfd),
                 [self.run_dir(i) for i in self.nodes])


def node_hop(i: int, version: int) -> str:
    return f"10.77.{i}.2" if version == 4 else f"fd77:{i}::2"


def hops(nodes, version: int) -> set[str]:
    return {node_hop(i, version) for i in nodes}


@pytest.fixture(scope="module")
def lab():
    if shutil.which("vtysh") is None:
        pytest.fail("FRR (vtysh, /usr/lib/frr/bgpd) is not installed: apt-get install frr (see Makefile)")
    lab = Lab(unique_prefix())
    try:
        lab.build(GR_NODE)
        lab.loop = LoopThread()
        t0 = time.monotonic()
        for i in (1, 2, 3):
            lab.start_speaker(i)
        for i in (1, 2, 3):
            lab.loop.call(lab.speakers[i].set_desired, routes())
        took = wait_for(lambda: lab.router.kernel_nexthops(VIP4) == hops((1, 2, 3), 4)
                        and lab.router.kernel_nexthops(VIP6) == hops((1, 2, 3), 6), 30,
                        "all three nodes as nexthops of both VIPs")
        print(f"\n[bgp] 3 speakers started and converged at the router in {time.monotonic() - t0:.2f} s "
              f"(routes in FIB {took:.2f} s after set_desired)")
        yield lab
    finally:
        lab.teardown()


def both_fibs(lab: Lab, nodes) -> bool:
    r = lab.router
    return r.kernel_nexthops(VIP4) == hops(nodes, 4) and r.kernel_nexthops(VIP6) == hops(nodes, 6)


def test_all_nodes_announce_one_multipath_route(lab: Lab):
    r = lab.router
    # Kernel FIB: one route per VIP, multipath, one nexthop per node.
    out4 = lab.router.ns.ip("-4", "route", "show", "exact", VIP4).stdout
    assert out4.count("nexthop via") == 3, out4
    out6 = lab.router.ns.ip("-6", "route", "show", "exact", VIP6).stdout
    assert out6.count("nexthop via") == 3, out6
    # FRR agrees: zebra's selected route has every node as an installed nexthop, bgpd has
    # three multipath paths.
    assert r.nexthops(VIP4) == hops((1, 2, 3), 4)
    assert r.nexthops(VIP6) == hops((1, 2, 3), 6)
    for vip in (VIP4, VIP6):
        paths = r.bgp_paths(vip)
        assert len(paths) == 3
        assert sum(1 for p in paths if p.get("multipath") or p.get("bestpath", {}).get("overall")) == 3
    # The speakers agree too.
    for i in (1, 2, 3):
        sp = lab.speakers[i]
        assert sp.announced() == {VIP4, VIP6}
        states = {k: v.state for k, v in sp.sessions().items()}
        assert states == {f"10.77.{i}.1": "established", f"fd77:{i}::1": "established"}
        st = sp.status()
        assert st["healthy"] and st["pending"] == {} and st["restarts"] == 0
        json.dumps(st)


def test_one_node_withdraws_only_its_nexthop_goes(lab: Lab):
    sp = lab.speakers[1]
    lab.loop.call(sp.set_desired, [])
    took = wait_for(lambda: both_fibs(lab, (2, 3)), 5, "node1's nexthops to go")
    print(f"\n[bgp] API withdraw -> router FIB without node1: {took:.3f} s")
    assert lab.router.nexthops(VIP4) == hops((2, 3), 4)
    assert lab.router.nexthops(VIP6) == hops((2, 3), 6)
    assert sp.announced() == set()
    # Sessions stay up: only the routes went.
    assert {v.state for v in sp.sessions().values()} == {"established"}
    lab.loop.call(sp.set_desired, routes())
    took = wait_for(lambda: both_fibs(lab, (1, 2, 3)), 5, "node1's nexthops to come back")
    print(f"[bgp] API announce -> router FIB with node1 again: {took:.3f} s")


def test_med_and_communities_reach_the_router(lab: Lab):
    """The attribute syntax we generate is accepted by ExaBGP and arrives at FRR."""
    sp = lab.speakers[2]
    extra4, extra6 = "10.77.102.1/32", "fd77:102::1/128"
    attrs = dict(med=50, communities=("65000:100", "65000:7"))
    lab.loop.call(sp.set_desired, routes() + [Route(ipaddress.ip_network(extra4), **attrs),
                                              Route(ipaddress.ip_network(extra6), **attrs)])
    try:
        wait_for(lambda: lab.router.kernel_nexthops(extra4) == {"10.77.2.2"}
                 and lab.router.kernel_nexthops(extra6) == {"fd77:2::2"}, 5, "the extra VIPs at the router")
        for vip in (extra4, extra6):
            (path,) = lab.router.bgp_paths(vip)
            assert path["metric"] == 50
            assert path["community"]["string"].split() == ["65000:7", "65000:100"]
    finally:
        lab.loop.call(sp.set_desired, routes())
    wait_for(lambda: not lab.router.kernel_nexthops(extra4) and not lab.router.kernel_nexthops(extra6), 5,
             "the extra VIPs withdrawn")


def _established_from(lab: Lab, i: int) -> bool:
    return f"10.77.{i}.2" in lab.router.established()


def test_exabgp_killed_path_dropped_then_restarted(lab: Lab):
    sp = lab.speakers[2]
    pid = sp.proc.pid
    os.kill(pid, signal.SIGKILL)
    took = wait_for(lambda: both_fibs(lab, (1, 3)), HOLD, "node2's path to be dropped within the hold time")
    print(f"\n[bgp] ExaBGP SIGKILLed -> router dropped node2's path in {took:.3f} s (hold time {HOLD} s)")
    # The supervisor restarts ExaBGP and re-announces everything.
    back = wait_for(lambda: both_fibs(lab, (1, 2, 3)), 15, "node2 back after the ExaBGP restart")
    print(f"[bgp] ExaBGP restarted by the supervisor -> node2's path back in {back:.3f} s")
    assert sp.proc.pid != pid and sp.restarts == 1 and sp.healthy
    assert sp.announced() == {VIP4, VIP6}


def test_exabgp_hung_path_dropped_by_hold_timer(lab: Lab):
    sp = lab.speakers[3]
    pid = sp.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        took = wait_for(lambda: both_fibs(lab, (1, 2)), HOLD + 1,
                        "node3's path to be dropped by the hold timer")
        print(f"\n[bgp] ExaBGP hung (SIGSTOP) -> router dropped node3's path in {took:.3f} s "
              f"(hold time {HOLD} s)")
    finally:
        os.kill(pid, signal.SIGCONT)
    back = wait_for(lambda: both_fibs(lab, (1, 2, 3)), 20, "node3 back after SIGCONT")
    print(f"[bgp] ExaBGP resumed -> node3's path back in {back:.3f} s")


CONTROLLER = r"""
import asyncio, ipaddress, json, sys
from pathlib import Path
from bgp import BgpSpeaker, Route
from node.config import BgpConfig

async def main():
    cfg = BgpConfig.model_validate(json.loads(sys.argv[1]))
    sp = BgpSpeaker(cfg, Path(sys.argv[2]), exabgp_argv=json.loads(sys.argv[3]))
    await sp.start()
    sp.set_desired([Route(ipaddress.ip_network(p)) for p in json.loads(sys.argv[4])])
    while sp.announced() != set(json.loads(sys.argv[4])):
        await asyncio.sleep(0.02)
    print(json.dumps({"exabgp_pid": sp.proc.pid}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_controller_sigkill_withdraws_its_routes(lab: Lab):
    cfg = node_config(4).model_dump(mode="json")
    argv = [sys.executable, "-c", CONTROLLER, json.dumps(cfg), str(lab.run_dir(4)),
            json.dumps(lab.exabgp_argv(4)), json.dumps([VIP4, VIP6])]
    ctl = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO, text=True)
    try:
        line = ctl.stdout.readline()
        assert line, "the controller subprocess exited before announcing"
        exabgp_pid = json.loads(line)["exabgp_pid"]
        wait_for(lambda: both_fibs(lab, (1, 2, 3, 4)), 10, "node4's paths at the router")
        ctl.kill()
        ctl.wait(5)
        took = wait_for(lambda: both_fibs(lab, (1, 2, 3)), HOLD, "node4's paths to go after its controller died")
        print(f"\n[bgp] controller SIGKILLed -> router dropped node4's paths in {took:.3f} s")
        wait_for(lambda: not _alive(exabgp_pid), 2, "ExaBGP to die with its controller")
        assert lab.nodes[4].pids() == [], "a process of node4 outlived its controller"
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(5)


def is_gshut(path: dict) -> bool:
    """FRR shows 65535:0 by its well-known name ('gshut' / 'gracefulShutdown')."""
    c = path.get("community") or {}
    return bool({"graceful-shutdown", "gshut", "65535:0"} & set(c.get("string", "").split()))


def test_graceful_stop_withdraws_then_closes(lab: Lab):
    """Stops node1. GRACEFUL_SHUTDOWN first, then withdraw, then the session closes: the ORDER
    the router sees these in is the behaviour (how long withdraw_delay lasts is not asserted: a
    loaded machine stretches or squeezes any measured gap)."""
    # A fresh node1 speaker with a graceful-shutdown phase configured.
    lab.loop.run(lab.speakers[1].stop(graceful=False))
    wait_for(lambda: both_fibs(lab, (2, 3)), HOLD, "node1 gone after the hard stop")
    sp = lab.start_speaker(1, graceful_shutdown=0.6, withdraw_delay=0.6)
    lab.loop.call(sp.set_desired, routes())
    wait_for(lambda: both_fibs(lab, (1, 2, 3)), 10, "node1 back")

    fut = asyncio.run_coroutine_threadsafe(sp.stop(graceful=True), lab.loop.loop)
    t0 = time.monotonic()
    seen_gshut = drained = route_gone = session_closed = None
    while time.monotonic() - t0 < 10 and session_closed is None:
        now = time.monotonic() - t0
        paths = [p for p in lab.router.bgp_paths(VIP4) if p.get("peer", {}).get("peerId") == "10.77.1.2"]
        if seen_gshut is None and any(is_gshut(p) for p in paths):
            seen_gshut = now
        if drained is None and both_fibs(lab, (2, 3)):
            drained = now
        established = _established_from(lab, 1)
        if route_gone is None and not paths:
            route_gone = now
            assert established, "node1's session closed before its routes were withdrawn"
        if not established:
            session_closed = now
        time.sleep(0.02)
    fut.result(10)
    print(f"\n[bgp] graceful stop: GRACEFUL_SHUTDOWN at the router at {seen_gshut} s, node1 out of "
          f"the FIB at {drained} s, its paths withdrawn at {route_gone} s, session closed at "
          f"{session_closed} s")
    assert seen_gshut is not None, "the router never saw the GRACEFUL_SHUTDOWN community from node1"
    assert drained is not None and route_gone is not None and session_closed is not None
    # FRR gives GRACEFUL_SHUTDOWN paths local-pref 0: traffic drains before the withdraw, and
    # the withdraw reached the router while the session was still up (asserted in the loop).
    assert seen_gshut <= drained <= route_gone < session_closed
    # (How long the session stays up after the withdraw is bgp.withdraw_delay; its length is
    # printed above, not asserted: the router's view is sampled and lags under load.)
    assert lab.nodes[1].pids() == []
    del lab.speakers[1]


def test_hung_node_with_bfd_is_dropped_in_a_fraction_of_the_hold_time(lab: Lab):
    """node5 runs FRR's bfdd next to ExaBGP; the router peers with it statically with BFD
    100 ms x 3. Freezing the whole node (ExaBGP and bfdd) must drop its path in well under
    the 3 s hold time."""
    i = BFD_NODE
    sp = lab.start_speaker(i, peers=[{"address": f"10.77.{i}.1", "peer_as": ROUTER_AS}])
    lab.loop.call(sp.set_desired, [Route(ipaddress.ip_network(VIP_BFD))])
    wait_for(lambda: lab.router.kernel_nexthops(VIP_BFD) == {f"10.77.{i}.2"}, 10, "node5's VIP at the router")
    wait_for(lambda: lab.router.bfd_peers().get(f"10.77.{i}.2") == "up", 5, "BFD up with node5")
    frozen = [sp.proc.pid, *lab.node_bfd.pids().values()]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        took = wait_for(lambda: not lab.router.kernel_nexthops(VIP_BFD), HOLD,
                        "node5's path to be dropped by BFD")
        print(f"\n[bgp] node5 frozen (ExaBGP + bfdd), BFD 100 ms x 3 -> router dropped its path in {took:.3f} s")
        assert took < 1.5, f"BFD took {took:.2f} s: the hold timer, not BFD, dropped the path"
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    back = wait_for(lambda: lab.router.kernel_nexthops(VIP_BFD) == {f"10.77.{i}.2"}, 20, "node5 back")
    print(f"[bgp] node5 resumed -> its path back in {back:.3f} s")


# -- graceful restart (node6: static neighbor, BFD by the speaker's own bfdd) ------------------


def gr_config() -> dict:
    i = GR_NODE
    return dict(peers=[{"address": f"10.77.{i}.1", "peer_as": ROUTER_AS}],
                bfd={"enabled": True}, graceful_restart={"enabled": True, "restart_time": GR_RESTART})


def gr_peer() -> str:
    return f"10.77.{GR_NODE}.2"


def gr_hops(lab: Lab) -> set[str]:
    return lab.router.kernel_nexthops(VIP_GR)


def start_gr_speaker(lab: Lab, *, ready: bool = True) -> BgpSpeaker:
    sp = lab.start_speaker(GR_NODE, **gr_config())
    lab.loop.call(sp.set_desired, [Route(ipaddress.ip_network(VIP_GR))])
    if ready:
        lab.loop.call(sp.routes_ready)
    return sp


def eor_received(lab: Lab) -> bool:
    gr = lab.router.graceful_restart(gr_peer())
    return bool(gr.get("ipv4Unicast", {}).get("endOfRibStatus", {}).get("endOfRibRecv"))


def gr_stale(lab: Lab) -> bool:
    return any(p.get("stale") for p in lab.router.bgp_paths(VIP_GR))


class HopSampler:
    """The router's nexthops for one VIP, sampled in a thread until stopped."""

    def __init__(self, lab: Lab, vip: str) -> None:
        self.lab, self.vip = lab, vip
        self.samples: list[frozenset[str]] = []
        self.stale_seen = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(frozenset(self.lab.router.kernel_nexthops(self.vip)))
            self.stale_seen = self.stale_seen or gr_stale(self.lab)
            self._stop.wait(0.02)

    def __enter__(self) -> "HopSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def test_graceful_restart_is_negotiated_and_end_of_rib_waits_for_the_controller(lab: Lab):
    """node6 offers graceful restart with its restart time; FRR (helper) accepts it. Its
    End-of-RIB goes only once the controller said its first decision is in (routes_ready)."""
    sp = start_gr_speaker(lab, ready=False)
    wait_for(lambda: gr_hops(lab) == {gr_peer()}, 15, "node6's VIP at the router")
    wait_for(lambda: lab.router.bfd_peers().get(gr_peer()) == "up", 10, "BFD up with node6")
    # The speaker saw the router's OPEN offer it too: negotiated, as `maglev status` says.
    assert sp.status()["graceful_restart"]["negotiated_with"] == [f"10.77.{GR_NODE}.1"], sp.status()
    gr = lab.router.graceful_restart(gr_peer())
    assert gr["remoteGrMode"] == "Restart", gr
    assert gr["timers"]["receivedRestartTimer"] == GR_RESTART, gr
    assert gr["ipv4Unicast"]["fBit"] is True, gr  # forwarding state kept across a restart
    # Announced, but no End-of-RIB yet: a router helping a restart would keep stale routes.
    assert not eor_received(lab), gr
    assert sp.status()["graceful_restart"]["end_of_rib_owed"] == [f"10.77.{GR_NODE}.1"]
    lab.loop.call(sp.routes_ready)
    wait_for(lambda: eor_received(lab), 10, "node6's End-of-RIB at the router")
    st = sp.status()["graceful_restart"]
    assert st["end_of_rib_owed"] == [] and st["end_of_rib_sent_total"] == 1
    assert st["enabled"] and st["restart_time"] == GR_RESTART


def test_planned_restart_keeps_the_route_through_the_restart(lab: Lab):
    """stop(keep_routes=True) then a new speaker: the router keeps node6's route (stale) while
    ExaBGP and bfdd are gone, and the nexthop is there in every sample; the new session's
    End-of-RIB, sent after routes_ready, ends the stale state with the route announced again."""
    sp = lab.speakers.get(GR_NODE) or start_gr_speaker(lab)
    wait_for(lambda: gr_hops(lab) == {gr_peer()} and eor_received(lab), 15, "node6 announced with End-of-RIB")
    with HopSampler(lab, VIP_GR) as sampler:
        lab.loop.run(sp.stop(graceful=True, keep_routes=True))
        assert lab.nodes[GR_NODE].pids() == [], "ExaBGP or bfdd of node6 outlived its stop"
        wait_for(lambda: gr_stale(lab), 5, "the router to mark node6's route stale (graceful restart)")
        # The router's BFD session went down after the BGP session had closed: no flush.
        wait_for(lambda: lab.router.bfd_peers().get(gr_peer()) != "up", 5, "BFD down with node6")
        del lab.speakers[GR_NODE]
        sp = start_gr_speaker(lab, ready=False)  # warming up: announces, no End-of-RIB yet
        wait_for(lambda: f"10.77.{GR_NODE}.2" in lab.router.established(), 15, "node6's new session")
        assert gr_stale(lab) or not eor_received(lab)
        lab.loop.call(sp.routes_ready)
        wait_for(lambda: eor_received(lab) and not gr_stale(lab), 10, "End-of-RIB to end the stale state")
        wait_for(lambda: lab.router.bfd_peers().get(gr_peer()) == "up", 10, "BFD up again with node6")
    print(f"\n[bgp] node6 restarted (keep_routes): {len(sampler.samples)} nexthop samples, "
          f"{len(set(sampler.samples))} distinct")
    assert sampler.stale_seen, "the router never marked the route stale: graceful restart did not happen"
    assert len(sampler.samples) > 10
    assert set(sampler.samples) == {frozenset({gr_peer()})}, "node6's nexthop changed during its restart"


def test_frozen_node_with_graceful_restart_is_still_dropped_by_bfd(lab: Lab):
    """A node whose host froze (ExaBGP and bfdd stopped, nothing closes the TCP session) is
    dropped by BFD with no graceful-restart wait: long before the restart time, and before the
    hold time too."""
    sp = lab.speakers.get(GR_NODE) or start_gr_speaker(lab)
    wait_for(lambda: gr_hops(lab) == {gr_peer()} and lab.router.bfd_peers().get(gr_peer()) == "up", 15,
             "node6 announced with BFD up")
    frozen = [sp.proc.pid, sp.bfd.pid]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        took = wait_for(lambda: not gr_hops(lab), HOLD, "BFD to drop the frozen node6 (not the restart time)")
        print(f"\n[bgp] frozen node6 with graceful restart ({GR_RESTART} s) and BFD: dropped in {took:.3f} s")
        assert not gr_stale(lab)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: gr_hops(lab) == {gr_peer()}, 20, "node6 back after SIGCONT")


def test_stale_route_of_a_node_that_does_not_come_back_goes_after_the_restart_time(lab: Lab):
    """The restart time bounds graceful restart: a node that stopped keeping its routes and
    never came back (or whose controller crashed with its host alive: the kernel closes the TCP
    session, the router keeps the routes) is dropped when it runs out."""
    sp = lab.speakers.get(GR_NODE) or start_gr_speaker(lab)
    wait_for(lambda: gr_hops(lab) == {gr_peer()} and eor_received(lab), 15, "node6 announced with End-of-RIB")
    lab.loop.run(sp.stop(graceful=True, keep_routes=True))
    del lab.speakers[GR_NODE]
    wait_for(lambda: gr_stale(lab), 5, "node6's route kept as stale")
    assert gr_hops(lab) == {gr_peer()}
    # Bound: the restart time, plus polling and a loaded machine's slack.
    took = wait_for(lambda: not gr_hops(lab), GR_RESTART + 5, "the stale route to go after the restart time")
    print(f"\n[bgp] node6 stopped keeping its routes and did not come back: stale route gone "
          f"{took:.2f} s after it was seen stale (restart time {GR_RESTART} s)")
    assert not lab.router.bgp_paths(VIP_GR)


def test_a_router_that_does_not_offer_graceful_restart_is_shown_as_not_negotiated(lab: Lab):
    """Per neighbor `graceful-restart-disable` on the router: its OPEN lacks the capability, so
    the speaker says restart is NOT negotiated there (a restart of this node would withdraw),
    and says negotiated again once the router offers it."""
    peer = f"10.77.{GR_NODE}.1"

    def set_router_gr(offer: bool) -> None:
        lab.router.vtysh("configure terminal", f"router bgp {ROUTER_AS}",
                         f"{'no ' if offer else ''}neighbor {gr_peer()} graceful-restart-disable")
        lab.router.vtysh(f"clear bgp {gr_peer()}")

    sp = lab.speakers.get(GR_NODE) or start_gr_speaker(lab)
    try:
        set_router_gr(False)
        wait_for(lambda: sp.status()["graceful_restart"]["not_negotiated_with"] == [peer]
                 and sp.status()["sessions"][peer]["state"] == "established", 20,
                 "the speaker to see the router's OPEN without graceful restart")
        assert sp.status()["graceful_restart"]["negotiated_with"] == []
        assert lab.router.graceful_restart(gr_peer()).get("localGrMode") == "Disable"
    finally:
        set_router_gr(True)
    wait_for(lambda: sp.status()["graceful_restart"]["negotiated_with"] == [peer], 20,
             "negotiated again once the router offers it")
