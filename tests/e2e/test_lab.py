"""End to end: the whole cluster in namespaces (real FRR router with ECMP, three `maglev node`s
with XDP forwarders and ExaBGP, five backends with GRE decap and DSR), driven from the client.

The tests run in file order; the last one takes the lab down and checks nothing is left."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from lab import plan as P
from lab import topology
from lab.lab import Lab, _alive
from lab.netns import list_namespaces
from lab.traffic import Load, burst, open_long_lived
from tests.e2e.conftest import (
    VIPS,
    await_until,
    backend_name,
    fully_converged,
    node_addresses,
    node_vips,
    serving_backends,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def table_shares(lab: Lab, vip: str) -> dict[str, float]:
    """Backend name -> its share of the VIP's Maglev table, as node 1 reports it."""
    view = node_vips(lab, 1)[vip]
    return {backend_name(lab, b["address"]): b["table_share"] for b in view["backends"]}


def vip_packets(view: dict) -> int:
    """Packets the node's forwarder counted for a VIP (summed over its per-CPU counters)."""
    counters = view.get("counters") or {}
    return int(counters.get("packets", 0))


# 1 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vip", ["web4", "web6"])
async def test_requests_all_succeed_and_follow_table_shares(ready: Lab, vip: str) -> None:
    result = await burst(VIPS[vip], 300, concurrency=16)
    assert result.failures == [], result.failures[:5]
    assert result.ok == 300
    shares = table_shares(ready, vip)
    for name, share in shares.items():
        seen = result.by_backend[name] / 300
        # 300 flows, p ~ 1/3: one standard deviation is ~0.027; 0.1 is a wide, safe margin.
        assert abs(seen - share) < 0.1, f"{name}: served {seen:.2f} of requests, table share {share:.2f}"
    assert set(result.by_backend) == set(shares)


# 2 ----------------------------------------------------------------------------------------------


async def test_router_has_one_nexthop_per_node_and_every_node_carries_traffic(ready: Lab) -> None:
    for vip, addr in VIPS.items():
        version = 6 if ":" in addr else 4
        assert ready.router_nexthops(addr) == node_addresses(ready, version), vip
    before = {h.index: {v: vip_packets(node_vips(ready, h.index)[v]) for v in VIPS} for h in ready.plan.node_hosts}
    for addr in VIPS.values():
        result = await burst(addr, 150)
        assert not result.failures, result.failures[:5]
    for h in ready.plan.node_hosts:
        after = node_vips(ready, h.index)
        for v in VIPS:
            assert vip_packets(after[v]) > before[h.index][v], f"{h.name} carried no {v} packets"


# 3 ----------------------------------------------------------------------------------------------


async def test_node_crash_keeps_long_lived_connections(ready: Lab) -> None:
    conns = await open_long_lived(list(VIPS.values()), 30, period=0.1, timeout=15)
    try:
        await asyncio.sleep(1.0)
        assert all(c.alive for c in conns)
        dead = {ready.plan.node(1).v4, ready.plan.node(1).v6}
        # The router runs BFD with every node: that is what drops a crashed node in ~0.3 s.
        await await_until(lambda: dead <= {p for p, st in ready.router().bfd_peers().items() if st == "up"}, 10,
                          "BFD up between the router and node-1")
        t0 = time.monotonic()
        await asyncio.to_thread(ready.kill_node, 1)
        for addr in VIPS.values():
            expected = node_addresses(ready, 6 if ":" in addr else 4) - dead
            await await_until(lambda: ready.router_nexthops(addr) == expected, 10,
                              f"the router to drop the dead node for {addr}", interval=0.02)
        print(f"\n[e2e] node-1 crashed -> router dropped it for both VIPs in {time.monotonic() - t0:.2f} s "
              f"(BFD {P.BFD_INTERVAL_MS} ms x {P.BFD_MULTIPLIER})")
        assert not dead & {p for p, st in ready.router().bfd_peers().items() if st == "up"}
        converged = {id(c): c.requests for c in conns}
        await asyncio.sleep(2.0)
        for c in conns:
            assert not c.errors, f"connection to {c.host} (backend {c.backend}) failed: {c.errors}"
            assert not c.switched, f"connection to {c.host} moved from {c.backend} to {c.switched}"
            assert c.requests > converged[id(c)] + 5, f"connection to {c.host} stalled after convergence"
        # The connections the router had sent through node-1 waited for BFD and a TCP
        # retransmit (a reply normally takes milliseconds): proof that the crash was real and
        # that those connections came back on other nodes.
        stalled = [c for c in conns if c.max_gap > 0.15]
        assert stalled, "no connection stalled: none went through the crashed node?"
        fresh = await burst(P.VIP_V4, 30)
        assert not fresh.failures, fresh.failures[:5]
    finally:
        for c in conns:
            await c.stop()
    ready.start_node(1)


# 4 ----------------------------------------------------------------------------------------------


async def test_dead_backend_leaves_the_tables_and_others_are_unaffected(ready: Lab) -> None:
    victim = ready.plan.backend(2)
    check = ready.plan.vip_file()["vips"][0]["health_check"]
    conns = await open_long_lived(list(VIPS.values()), 24, period=0.1, timeout=10)
    try:
        await asyncio.to_thread(ready.kill_backend, 2)
        t0 = time.monotonic()

        def gone_everywhere() -> bool:
            for h in ready.plan.node_hosts:
                vips = node_vips(ready, h.index)
                if victim.v4 in serving_backends(vips["web4"]) or victim.v6 in serving_backends(vips["web6"]):
                    return False
            return True

        await await_until(gone_everywhere, 10, "backend-2 to leave every node's tables", interval=0.05)
        took = time.monotonic() - t0
        # interval x fall, plus one probe timeout and one interval for phase and polling.
        bound = check["interval"] * check["fall"] + check["timeout"] + check["interval"]
        assert took <= bound, f"backend-2 left the tables after {took:.2f} s (bound {bound:.2f} s)"
        await asyncio.sleep(1.0)
        for c in conns:
            if c.backend != victim.name:
                assert not c.errors, f"connection on {c.backend} broke: {c.errors}"
                assert not c.switched
        for addr in VIPS.values():
            result = await burst(addr, 60)
            assert not result.failures, result.failures[:5]
            assert victim.name not in result.by_backend
    finally:
        for c in conns:
            if c.alive:
                await c.stop()
    ready.start_backend(2)


# 5 ----------------------------------------------------------------------------------------------


async def test_graceful_stop_under_load_fails_no_request(ready: Lab) -> None:
    n = ready.plan.nodes
    load = Load(list(VIPS.values()), workers=3)
    load.start()
    try:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(ready.stop_node, n)
        await asyncio.sleep(2.0)
    finally:
        await load.stop()
    assert load.ok > 100
    assert load.failures == [], load.failures[:5]
    me = ready.plan.node(n)
    for addr in VIPS.values():
        assert not ready.router_nexthops(addr) & {me.v4, me.v6}
    ready.start_node(n)


# 6 ----------------------------------------------------------------------------------------------


async def test_new_vip_file_is_served_and_a_broken_one_is_rejected(ready: Lab) -> None:
    extra = {
        "vips": [{
            "name": "spare4",
            "address": P.SPARE_VIP_V4,
            "port": P.VIP_PORT,
            "table_size": 251,
            "backends": [{"address": b.v4} for b in ready.plan.backend_hosts],
            "health_check": ready.plan.vip_file()["vips"][0]["health_check"],
        }]
    }
    dirs = [ready.plan.node_dir(h.index) / "vips.d" for h in ready.plan.node_hosts]
    for h in ready.plan.backend_hosts:
        ready.setup_backend(h.index, extra_vips=[P.SPARE_VIP_V4])
    try:
        for d in dirs:
            (d / "spare.yaml").write_text(P.dump_yaml(extra))
        wait_until(lambda: ready.router_nexthops(P.SPARE_VIP_V4) == node_addresses(ready, 4), 30,
                   "the new VIP to be announced by every node")
        assert all(node_vips(ready, h.index)["spare4"]["announced"] for h in ready.plan.node_hosts)
        result = await burst(P.SPARE_VIP_V4, 60)
        assert not result.failures, result.failures[:5]

        for d in dirs:
            (d / "broken.yaml").write_text("vips:\n  - name: broken\n    address: 10.100.0.300\n    port: 80\n")

        def rejected_everywhere() -> bool:
            for h in ready.plan.node_hosts:
                last = (ready.node_status(h.index) or {}).get("last_reload") or {}
                if last.get("ok") is not False or "broken.yaml" not in str(last):
                    return False
            return True

        wait_until(rejected_everywhere, 15, "every node to reject broken.yaml")
        for h in ready.plan.node_hosts:
            vips = node_vips(ready, h.index)
            assert {"web4", "web6", "spare4"} <= set(vips) and "broken" not in vips
            assert all(vips[v]["announced"] for v in ("web4", "web6", "spare4"))
        for addr in (*VIPS.values(), P.SPARE_VIP_V4):
            result = await burst(addr, 30)
            assert not result.failures, result.failures[:5]
    finally:
        for d in dirs:
            for name in ("spare.yaml", "broken.yaml"):
                (d / name).unlink(missing_ok=True)
    wait_until(lambda: not ready.router_nexthops(P.SPARE_VIP_V4), 30, "the removed VIP to be withdrawn")
    for h in ready.plan.backend_hosts:
        ready.setup_backend(h.index)


# 6b ---------------------------------------------------------------------------------------------


class NexthopWatch:
    """Polls the router's FIB for every VIP in a thread and records every moment a node was
    missing from a VIP's nexthops."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.expected = {addr: node_addresses(lab, 6 if ":" in addr else 4) for addr in VIPS.values()}
        self.drops: list[tuple[float, str, set[str]]] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for addr, want in self.expected.items():
                got = self.lab.router_nexthops(addr)
                if got != want:
                    self.drops.append((time.monotonic(), addr, want - got))
            self.polls += 1
            self._stop.wait(0.05)

    def __enter__(self) -> "NexthopWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def test_changing_a_check_on_every_node_under_load_breaks_nothing(ready: Lab) -> None:
    """Issue 11: editing a VIP's health check (here interval, timeout and rise of both VIPs) on
    every node at once keeps every verdict and table entry: no failed request, no broken
    connection, no nexthop ever missing at the router; the new checks then confirm the verdicts."""
    files = [ready.plan.node_dir(h.index) / "vips.d" / "lab.yaml" for h in ready.plan.node_hosts]
    original = [f.read_text() for f in files]
    edited = ready.plan.vip_file()
    for v in edited["vips"]:
        v["health_check"].update(interval=0.6, timeout=0.45, rise=3)

    def applied_everywhere(interval: float) -> bool:
        for h in ready.plan.node_hosts:
            last = (ready.node_status(h.index) or {}).get("last_reload") or {}
            vips = node_vips(ready, h.index)
            if last.get("ok") is not True or not all(
                    vips[v]["config"]["health_check"]["interval"] == interval for v in VIPS):
                return False
        return True

    conns = await open_long_lived(list(VIPS.values()), 24, period=0.1, timeout=10)
    load = Load(list(VIPS.values()), workers=3)
    load.start()
    started = time.time()  # node events carry wall-clock stamps; earlier tests left theirs
    try:
        with NexthopWatch(ready) as watch:
            await asyncio.sleep(1.0)
            for f in files:
                f.write_text(P.dump_yaml(edited))
            await await_until(lambda: applied_everywhere(0.6), 15, "every node to apply the edited check")
            # Longer than the new check's rise x interval (1.8 s): its own probes have run.
            await asyncio.sleep(3.0)
            for f, text in zip(files, original):
                f.write_text(text)
            await await_until(lambda: applied_everywhere(0.5), 15, "every node to apply the original check")
            await asyncio.sleep(2.0)
        await load.stop()
        assert load.ok > 100 and watch.polls > 20
        assert load.failures == [], load.failures[:5]
        assert watch.drops == [], watch.drops[:5]
        for c in conns:
            assert not c.errors, f"connection to {c.host} (backend {c.backend}) failed: {c.errors}"
            assert not c.switched, f"connection to {c.host} moved from {c.backend} to {c.switched}"
        for h in ready.plan.node_hosts:
            events = [e["event"] for e in (ready.node_status(h.index) or {}).get("recent_events", [])
                      if e["ts"] >= started]
            assert "vip_withdrawn" not in events and "backend_down" not in events, (h.name, events)
    finally:
        await load.stop()
        for c in conns:
            if c.alive:
                await c.stop()
        for f, text in zip(files, original):
            f.write_text(text)


# 6c ---------------------------------------------------------------------------------------------


def set_on_stop(lab: Lab, index: int, on_stop: str) -> None:
    """Rewrite node I's node file with forwarder.on_stop (read at its next start)."""
    import yaml

    path = lab.plan.node_dir(index) / "node.yaml"
    data = yaml.safe_load(path.read_text())
    data["forwarder"]["on_stop"] = on_stop
    path.write_text(P.dump_yaml(data, "# written by maglev lab up; on_stop set by the e2e tests"))


def graceful_restart_status(lab: Lab, index: int) -> dict:
    return ((lab.node_status(index) or {}).get("bgp") or {}).get("graceful_restart") or {}


def router_stale(lab: Lab, addresses: set[str]) -> bool:
    """The router holds a path of one of these node addresses as stale (graceful restart)."""
    for addr in VIPS.values():
        for path in lab.router().bgp_paths(P.vip_network(addr)):
            if path.get("stale") and (path.get("peer") or {}).get("peerId") in addresses:
                return True
    return False


async def test_restart_with_on_stop_keep_is_hitless_and_a_crash_still_withdraws(ready: Lab) -> None:
    """Issue 14: a node restarted with forwarder.on_stop: keep (graceful restart) under load
    fails no request, breaks no connection, and the router's nexthop set for every VIP never
    changes (the router holds the node's routes as stale, its pinned XDP forwarder keeps
    forwarding, the same tables come back with the same digests). Then its controller is
    SIGKILLed with the host alive: the router keeps the routes no longer than the restart time."""
    n = 2
    me = ready.plan.node(n)
    set_on_stop(ready, n, "keep")
    try:
        # The running node was started with on_stop: detach; restart it to read `keep`.
        await asyncio.to_thread(ready.stop_node, n)
        await asyncio.to_thread(ready.start_node, n)
        await await_until(lambda: fully_converged(ready), 60, "node-2 back with on_stop: keep")
        digests = {v: node_vips(ready, n)[v]["digest"] for v in VIPS}
        conns = await open_long_lived(list(VIPS.values()), 24, period=0.1, timeout=10)
        load = Load(list(VIPS.values()), workers=3)
        load.start()
        stale = []
        try:
            with NexthopWatch(ready) as watch:
                await asyncio.sleep(1.0)
                t0 = time.monotonic()
                await asyncio.to_thread(ready.stop_node, n)
                # The node is gone: the router holds its routes as stale (not a quick re-announce).
                await await_until(lambda: router_stale(ready, {me.v4, me.v6}), 5, "node-2's routes held as stale")
                stale.append(True)
                await asyncio.to_thread(ready.start_node, n)
                await await_until(lambda: not graceful_restart_status(ready, n).get("end_of_rib_owed", ["?"])
                                  and graceful_restart_status(ready, n).get("end_of_rib_sent_total", 0) >= 2,
                                  30, "node-2's End-of-RIB on both sessions")
                await await_until(lambda: not router_stale(ready, {me.v4, me.v6}), 10, "no stale route left")
                print(f"\n[e2e] node-2 restarted with on_stop: keep: stale at the router until its End-of-RIB "
                      f"{time.monotonic() - t0:.2f} s after the stop began; {load.ok} requests, "
                      f"{len(load.failures)} failed; {watch.polls} nexthop polls, {len(watch.drops)} changes")
                await asyncio.sleep(1.0)
            await load.stop()
            assert stale and load.ok > 100 and watch.polls > 20
            assert load.failures == [], load.failures[:5]
            assert watch.drops == [], watch.drops[:5]
            for c in conns:
                assert not c.errors, f"connection to {c.host} (backend {c.backend}) failed: {c.errors}"
                assert not c.switched, f"connection to {c.host} moved from {c.backend} to {c.switched}"
            assert {v: node_vips(ready, n)[v]["digest"] for v in VIPS} == digests
        finally:
            await load.stop()
            for c in conns:
                if c.alive:
                    await c.stop()

        # A crash with the host alive: the kernel closes the sessions, the router keeps the
        # routes (the forwarder, still attached, forwards) for the restart time at the most.
        t0 = time.monotonic()
        await asyncio.to_thread(ready.kill_node, n, host_alive=True)
        for addr in VIPS.values():
            expected = node_addresses(ready, 6 if ":" in addr else 4) - {me.v4, me.v6}
            await await_until(lambda: ready.router_nexthops(addr) == expected, P.GR_RESTART_TIME + 5,
                              f"the router to drop the crashed node-2 for {addr} within the restart time")
        print(f"[e2e] node-2's controller SIGKILLed (host alive): router dropped it after "
              f"{time.monotonic() - t0:.2f} s (restart time {P.GR_RESTART_TIME} s)")
    finally:
        set_on_stop(ready, n, "detach")
        if not ready.pid(me.name):
            await asyncio.to_thread(ready.start_node, n)

# 6b ---------------------------------------------------------------------------------------------


def test_a_backend_that_lost_the_vip_leaves_the_tables_by_its_tunnel_check(ready: Lab) -> None:
    """The lab's checks go through the tunnel: a backend without web4's VIP on lo (its host,
    its health port and its decap all fine, so a direct check passes) leaves web4's table on
    every node with a reason naming the tunnel, keeps serving web6, and comes back with the VIP."""
    from lab.lab import maglev_argv
    from lab.netns import Netns

    victim = ready.plan.backend(3)
    for h in ready.plan.node_hosts:
        assert node_vips(ready, h.index)["web4"]["health_path"] == "tunnel"
    Netns(victim.ns).ip("addr", "del", f"{P.VIP_V4}/32", "dev", "lo")
    try:
        def gone_everywhere() -> bool:
            return all(victim.v4 not in serving_backends(node_vips(ready, h.index)["web4"])
                       for h in ready.plan.node_hosts)

        wait_until(gone_everywhere, 15, "backend-3 to leave web4's table on every node")
        for h in ready.plan.node_hosts:
            vips = node_vips(ready, h.index)
            entry = next(b for b in vips["web4"]["backends"] if b["address"] == victim.v4)
            assert entry["last_reason"].startswith("no answer through the tunnel"), entry
            assert victim.v6 in serving_backends(vips["web6"]), f"{h.name} dropped backend-3 from web6"
        # the blackhole a direct check cannot see: from node-1, the same backend looks healthy
        direct = Netns(ready.plan.node(1).ns).run(
            *maglev_argv("check", "--type", "http", "--address", victim.v4, "--port", str(P.HEALTH_PORT),
                         "--path", "/healthz"), check=False)
        assert direct.returncode == 0, direct.stdout + direct.stderr
    finally:
        Netns(victim.ns).ip("addr", "replace", f"{P.VIP_V4}/32", "dev", "lo")
    wait_until(lambda: all(victim.v4 in serving_backends(node_vips(ready, h.index)["web4"])
                           for h in ready.plan.node_hosts), 15, "backend-3 to serve web4 again")


# 7 ----------------------------------------------------------------------------------------------


def test_every_node_reports_the_same_table_digest(ready: Lab) -> None:
    digests: dict[str, set[str]] = {v: set() for v in VIPS}
    for h in ready.plan.node_hosts:
        vips = node_vips(ready, h.index)
        for v in VIPS:
            assert vips[v]["digest"], f"{h.name} has no table for {v}"
            digests[v].add(vips[v]["digest"])
    for v, seen in digests.items():
        assert len(seen) == 1, f"nodes disagree on {v}'s table: {seen}"


def test_cli_status_and_exec(ready: Lab) -> None:
    """The operator's view: `maglev lab status --json` and `maglev lab exec`."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "node.cli", "lab", "status", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    st = json.loads(out)
    for addr in VIPS.values():
        assert {h["node"] for h in st["router"]["nexthops"][addr]} == {h.name for h in ready.plan.node_hosts}
    assert all(n["announced"] == ["web4", "web6"] for n in st["nodes"])
    assert all(b["healthy"] for b in st["backends"])
    proc = subprocess.run([sys.executable, "-m", "node.cli", "lab", "exec", "client", "--", "ip", "-4", "route"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and f"default via {P.ROUTER_CLIENT_V4}" in proc.stdout


# 8 ----------------------------------------------------------------------------------------------


def test_lab_down_leaves_nothing_behind(lab: Lab) -> None:
    pids = [p for p in lab._state().get("pids", {}).values() if p]
    frr_pids = list(lab.router().pids().values())
    mounts = topology.lab_mounts(lab.run_dir)
    assert mounts, "expected the lab's bpffs mounts before down"
    lab.down(quiet=True)
    assert not [n for n in list_namespaces() if n.startswith(P.NS_PREFIX)]
    assert not [p for p in pids + frr_pids if _alive(p)], "processes survived lab down"
    assert not topology.lab_mounts(lab.run_dir), "bpffs mounts survived lab down"
    assert not Path(lab.run_dir).exists()
    assert lab.down(quiet=True) == [], "a second down must find nothing"
