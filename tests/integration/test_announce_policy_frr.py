"""The announce policy (issue 14) as a real FRR 8.4 router sees it, through real ExaBGP 5.0.

Three nodes (AS 65101-65103) peer with one router (AS 65000: listen ranges, maximum-paths 8,
multipath-relax). Each node runs the node's own decision code (node.reconcile.decide, which
calls node.announce_policy) over the same VIP config, turns the decision into routes with
node.effects.routes_for and hands them to its BgpSpeaker: everything a maglev node does
between a health verdict and the router, minus the health checks themselves, whose verdicts
the test feeds in. The dampening clock is the test's own number, so hold-downs are exact.

Namespaces carry a unique "p14" prefix and are removed even when a test fails.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from bgp import BgpSpeaker
from lab.frr import FrrRouter, render_config
from lab.netns import Netns, quiet_ipv6, unique_prefix
from node.announce_policy import DampingParams
from node.config import VipConfig
from node.effects import routes_for
from node.reconcile import Desired, Health, Inputs, TableCache, decide
from tests.integration.bgp_harness import EXABGP, LoopThread, node_config, node_namespaces, teardown, wait_for

pytestmark = [pytest.mark.root, pytest.mark.integration]

NODES = (1, 2, 3)
VIP = "10.77.100.1"
PREFIX = f"{VIP}/32"
BACKENDS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def hops(nodes) -> set[str]:
    return {f"10.77.{i}.2" for i in nodes}


class PolicyNode:
    """One node's decision loop: health in, routes out to its speaker."""

    def __init__(self, i: int, speaker: BgpSpeaker, loop: LoopThread, damping: DampingParams):
        self.i, self.speaker, self.loop, self.damping = i, speaker, loop, damping
        self.tables = TableCache()
        self.desired: Desired | None = None

    def step(self, vip: VipConfig, down: set[str], now: float) -> str:
        health = {(vip.name, b.key): Health.DOWN if b.key in down else Health.UP for b in vip.backends}
        self.desired = decide(Inputs({vip.name: vip}, health, now=now, damping=self.damping),
                              self.tables, self.desired)
        self.loop.call(self.speaker.set_desired, routes_for(self.desired))
        return self.desired.vips[vip.name].state


class Lab:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.router: FrrRouter | None = None
        self.nodes: dict[int, Netns] = {}
        self.speakers: dict[int, BgpSpeaker] = {}
        self.loop: LoopThread | None = None

    def build(self) -> None:
        rns = Netns.create(f"{self.prefix}-r")
        for key in ("net.ipv4.ip_forward", "net.ipv4.fib_multipath_hash_policy"):
            rns.sysctl(key, 1)
        quiet_ipv6(rns)
        self.nodes = node_namespaces(self.prefix, rns, NODES)
        self.router = FrrRouter(rns, render_config(asn=65000, router_id="10.77.0.1",
                                                   listen_ranges=["10.77.0.0/16"], timers=(1, 3)))
        self.router.start()
        self.loop = LoopThread()
        for i in NODES:
            cfg = node_config(i, peers=[{"address": f"10.77.{i}.1", "peer_as": 65000}], min_change_interval=0.2)
            sp = BgpSpeaker(cfg, Path(f"/tmp/{self.prefix}-n{i}"), exabgp_argv=self.nodes[i].exec_argv(EXABGP))
            self.loop.run(sp.start())
            self.speakers[i] = sp

    def policy_nodes(self, damping: DampingParams = DampingParams(hold_down=0)) -> dict[int, PolicyNode]:
        return {i: PolicyNode(i, self.speakers[i], self.loop, damping) for i in NODES}

    def fib(self) -> set[str]:
        return self.router.kernel_nexthops(PREFIX)

    def paths(self) -> dict[str, dict]:
        """Router's BGP paths for the VIP, by the node address they came from."""
        return {p["nexthops"][0]["ip"]: p for p in self.router.bgp_paths(PREFIX)}

    def teardown(self) -> None:
        teardown(self.prefix, self.loop, self.speakers.values(), (self.router,),
                 [Path(f"/tmp/{self.prefix}-n{i}") for i in NODES])


@pytest.fixture(scope="module")
def lab():
    if shutil.which("vtysh") is None:
        pytest.fail("FRR (vtysh, /usr/lib/frr/bgpd) is not installed: apt-get install frr (see Makefile)")
    lab = Lab(unique_prefix("p14"))
    try:
        lab.build()
        wait_for(lambda: len(lab.router.established()) == len(NODES), 30, "every node's session established")
        yield lab
    finally:
        lab.teardown()


def vip(**announce) -> VipConfig:
    return VipConfig.model_validate({
        "name": "web", "address": VIP, "port": 80, "table_size": 251,
        "backends": [{"address": b} for b in BACKENDS], "announce": announce})


def test_a_de_preferred_node_leaves_the_ecmp_set_and_returns_when_every_node_is_de_preferred(lab):
    v = vip(min_healthy=3, on_unhealthy="deprefer", deprefer={"prepend": 2, "communities": ["65000:666"]})
    nodes = lab.policy_nodes()
    for n in nodes.values():
        assert n.step(v, set(), 0) == "announced"
    wait_for(lambda: lab.fib() == hops(NODES), 15, "every node in the router's ECMP set")

    # node1 loses a backend: it keeps its route, de-preferred, and the router stops using it.
    assert nodes[1].step(v, {"10.0.0.1"}, 1) == "depreferred"
    wait_for(lambda: lab.fib() == hops((2, 3)), 10, "node1 out of the ECMP set")
    paths = lab.paths()
    assert set(paths) == hops(NODES)  # still a path at the router: de-preferred, not withdrawn
    bad = paths["10.77.1.2"]
    assert bad["aspath"]["string"] == "65101 65101 65101"
    assert bad["metric"] == 1000
    assert "65000:666" in bad["community"]["string"].split()
    assert paths["10.77.2.2"]["aspath"]["string"] == "65102"

    # Every node degraded alike: all de-preferred, all equal again, all in the ECMP set.
    for i in (2, 3):
        assert nodes[i].step(v, {"10.0.0.1"}, 1) == "depreferred"
    wait_for(lambda: lab.fib() == hops(NODES), 10, "every de-preferred node back in the ECMP set")
    assert all(p["aspath"]["length"] == 3 for p in lab.paths().values())

    # Healthy again: plain routes everywhere.
    for n in nodes.values():
        assert n.step(v, set(), 2) == "announced"
    wait_for(lambda: all(p["aspath"]["length"] == 1 for p in lab.paths().values()) and lab.fib() == hops(NODES),
             10, "plain routes from every node")


class FibWatch:
    """Samples the router's FIB for the VIP on a thread, recording every sample where no node
    carried it: a fleet-wide withdrawal, however short, that a sampler happened to see."""

    def __init__(self, lab: Lab):
        self.lab, self.samples, self.empty = lab, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.lab.fib():
                self.empty += 1
            self.samples += 1
            time.sleep(0.01)

    def fresh_sample(self) -> None:
        """Wait until a sample begun after this call has been taken (2 more completed)."""
        start = self.samples
        wait_for(lambda: self.samples >= start + 2, 10, "the FIB watcher to sample again")

    def __enter__(self) -> "FibWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def test_every_node_seeing_the_same_flapping_pool_never_withdraws_the_vip_fleet_wide_once_dampened(lab):
    """The issue's simulation: a pool wobbling (3 <-> 1 serving of min_healthy 2, on_unhealthy
    withdraw) on every node at once. The first loss withdraws everywhere (the pool really is
    below its threshold and nothing says otherwise yet); from the second, dampening holds the
    VIP de-preferred on every node, so the router keeps it through the rest of the wobble, and
    after the pool settles it is there at once (held de-preferred), not withdrawn for the
    hold-down as before."""
    damping = DampingParams(hold_down=30, hold_down_max=120, threshold=2, window=60)
    v = vip(min_healthy=2)
    nodes = lab.policy_nodes(damping)
    wobble = {"10.0.0.1", "10.0.0.2"}

    def all_step(down: set[str], now: float) -> set[str]:
        return {n.step(v, down, now) for n in nodes.values()}

    assert all_step(set(), 0) == {"announced"}
    wait_for(lambda: lab.fib() == hops(NODES), 15, "every node announcing")
    assert all_step(wobble, 1) == {"withdrawn"}  # first loss: below min_healthy, not yet dampened
    wait_for(lambda: not lab.fib(), 10, "the first loss withdrawn everywhere")
    assert all_step(set(), 2) == {"announced"}
    wait_for(lambda: lab.fib() == hops(NODES), 10, "every node announcing again")

    with FibWatch(lab) as watch:
        # Second loss within the window: the hold-down starts, de-preferred (1 backend serves).
        assert all_step(wobble, 3) == {"depreferred"}
        wait_for(lambda: all(p["aspath"]["length"] == 4 for p in lab.paths().values()), 10,
                 "every node de-preferred")
        # The wobble goes on, then the pool settles: de-preferred throughout the hold-down.
        for t, down in ((4, set()), (5, wobble), (6, set()), (7, wobble), (8, set())):
            assert all_step(down, t) == {"depreferred"}, t
            # Each step reaches the router (the speakers converged) before the next.
            wait_for(lambda: all(not sp.reconciler.pending() for sp in lab.speakers.values()), 10,
                     f"the speakers converged at t={t}")
            assert lab.fib() == hops(NODES)
            watch.fresh_sample()  # the router's FIB is watched at every step, however loaded
        # Two more losses (t=5, 7) within the window started a second, doubled hold-down at
        # t=7, until 7 + 60: still de-preferred just before it ends, plain routes after.
        assert all_step(set(), 66.5) == {"depreferred"}
        assert nodes[1].desired.wakeups() == {"web": 67}
        assert all_step(set(), 67.5) == {"announced"}
        wait_for(lambda: all(p["aspath"]["length"] == 1 for p in lab.paths().values()), 10,
                 "plain routes after the hold-down")
    assert watch.samples >= 2 * 5
    assert watch.empty == 0, f"the router had no route for the VIP in {watch.empty} of {watch.samples} samples"
    assert lab.fib() == hops(NODES)
    reason = nodes[1].desired.vips["web"].reason
    assert "serving backend(s)" in reason
