"""`maglev lab demo`: the paper's promises, shown end to end on a real router.

1. Up: router (FRR, ECMP), client, nodes, backends.
2. Traffic: steady new connections to both VIPs plus long-lived keep-alive connections, with a
   live table: requests per backend (from the replies the client got) and packets per node (the
   router's counters on each node's port) with the VIPs each node announces.
3. A node crash (links down + SIGKILL): the router drops it by BFD (~0.3 s); every
   long-lived connection keeps its backend through another node (Maglev: any node sends a flow
   to the same backend) and none is reset.
4. A backend failure: health checks take it out of every node's table within interval x fall;
   new requests reach only healthy backends.
5. A backend that loses the VIP on lo (host and health port fine): the tunnel health check
   (to the VIP through GRE) takes it out of web4's tables, where a direct check would not.
6. A graceful node stop under load: the node withdraws first, so no request fails.
6b. With --config-source etcd (lab/fleet_demo.py): the fleet view, a change through etcd while a
   node is cut off from etcd (it keeps serving, then catches up), an etcd member killed.
7. Summary, then down.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter

from lab import plan as P
from lab.lab import Lab, LabError
from lab.netns import Netns, run
from lab.traffic import Load, open_long_lived

LONG_LIVED = 24
# A reply that took longer than this waited for the router (replies normally take milliseconds;
# a request lost in the crashed node is retransmitted after TCP's 200 ms minimum RTO).
STALL = 0.15
VIPS = [P.VIP_V4, P.VIP_V6]


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def step(n: int, title: str) -> None:
    print(f"\n=== {n}. {title} " + "=" * max(0, 60 - len(title)), flush=True)


def router_port_packets(lab: Lab) -> dict[str, int]:
    """Packets the router sent to each node (tx on its bridge port): what each node received."""
    out = run(["ip", "-n", P.ROUTER_NS, "-s", "-j", "link", "show"], check=False).stdout
    stats = {}
    for link in json.loads(out or "[]"):
        name = link.get("ifname", "")
        if name.startswith("node-"):
            stats[name] = link.get("stats64", {}).get("tx", {}).get("packets", 0)
    return stats


def forwarded_packets(lab: Lab) -> dict[str, int]:
    """VIP packets each node's forwarder counted (its own per-CPU counters, via its API)."""
    out = {}
    for h in lab.plan.node_hosts:
        data = lab.node_api(h.index, "/api/v1/vips", timeout=0.5) if lab.pid(h.name) else None
        if data:
            out[h.name] = sum(int((v.get("counters") or {}).get("packets", 0)) for v in data["vips"])
    return out


def counter_delta(now: int | None, before: int | None) -> int | None:
    """Packets since the last reading of a node's forwarder counter. None when there is no
    reading now or none to compare with. A restarted node keeps its counters when its maps stay
    pinned (the delta runs on from the reading before the crash); when they were recreated the
    counter starts again from zero, so a smaller value is all new."""
    if now is None or before is None:
        return None
    return now - before if now >= before else now


class LiveTable:
    """Prints per-backend and per-node activity since the last print: requests each backend
    answered (seen by the client), packets the router sent each node ("in") and VIP packets
    the node's forwarder encapsulated ("fwd")."""

    def __init__(self, lab: Lab, load: Load):
        self.lab, self.load = lab, load
        self.last_backends: Counter = Counter()
        self.last_ports = router_port_packets(lab)
        self.last_fwd = forwarded_packets(lab)

    def show(self, label: str = "") -> None:
        now = Counter(self.load.by_backend)
        delta = now - self.last_backends
        self.last_backends = now
        ports = router_port_packets(self.lab)
        total = sum(delta.values()) or 1
        backends = "  ".join(
            f"{h.name}: {delta[h.name]:>4} ({100 * delta[h.name] / total:3.0f}%)" for h in self.lab.plan.backend_hosts
        )
        fwd = forwarded_packets(self.lab)
        nodes = []
        for h in self.lab.plan.node_hosts:
            pk = ports.get(h.router_port, 0) - self.last_ports.get(h.router_port, 0)
            alive = "up" if self.lab.pid(h.name) else "DOWN"
            fw = counter_delta(fwd.get(h.name), self.last_fwd.get(h.name))
            fw_s = f"{fw:>5}" if fw is not None else "    -"
            nodes.append(f"{h.name}[{alive}]: {pk:>5} in, {fw_s} fwd")
        # A node that did not answer this time (dead, restarting, slow) keeps its last reading:
        # its next delta is then measured from there, not from zero.
        self.last_ports, self.last_fwd = ports, {**self.last_fwd, **fwd}
        fails = len(self.load.failures)
        print(f"  {label:<10} backends  {backends}", flush=True)
        print(f"  {'':<10} nodes     {'  '.join(nodes)}   failed so far: {fails}", flush=True)


async def watch(table: LiveTable, seconds: float, label: str, every: float = 1.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(every)
        table.show(label)


def nexthops(lab: Lab) -> str:
    parts = []
    for vip in VIPS:
        hops = sorted(lab.node_for_address(a) for a in lab.router_nexthops(vip))
        parts.append(f"{vip} -> {', '.join(hops) or 'none'}")
    return "; ".join(parts)


def backend_serving_anywhere(lab: Lab, addresses: set[str]) -> bool:
    """True while any node still gives the backend (by any of its addresses) table entries."""
    for h in lab.plan.node_hosts:
        data = lab.node_api(h.index, "/api/v1/vips") or {"vips": []}
        for v in data["vips"]:
            if any(b["address"] in addresses and b.get("serving") for b in v["backends"]):
                return True
    return False


async def wait_for(cond, timeout: float, interval: float = 0.2) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if await asyncio.to_thread(cond):
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - a failing probe just means "not yet"
            pass
        await asyncio.sleep(interval)
    return None


async def scenario(lab: Lab) -> dict:
    summary: dict = {}
    n = lab.plan.nodes
    step(2, "traffic: new connections to both VIPs + long-lived connections")
    say(f"router: {nexthops(lab)}")
    load = Load(VIPS, workers=2, timeout=8.0)  # a SYN to a crashed node is retried after 1 s and 3 s
    load.start()
    conns = await open_long_lived(VIPS, LONG_LIVED)
    say(f"{LONG_LIVED} long-lived keep-alive connections open, one request every 100 ms each")
    table = LiveTable(lab, load)
    await watch(table, 4, "steady")

    if n >= 2:
        step(3, "node crash: kill-node 1 (links down, SIGKILL) with long-lived connections open")
        await asyncio.to_thread(lab.kill_node, 1)
        # Polled fast: BFD converges in a few tenths of a second.
        t = await wait_for(lambda: all(len(lab.router_nexthops(v)) == n - 1 for v in VIPS), 15, interval=0.02)
        bfd = f"BFD {P.BFD_INTERVAL_MS} ms x {P.BFD_MULTIPLIER}"
        say(f"router dropped node-1 after {t:.2f} s ({bfd}; the hold timer alone takes 2-3 s): {nexthops(lab)}"
            if t is not None else "router did not drop node-1 within 15 s")
        await watch(table, 3, "crashed")
        alive = sum(1 for c in conns if c.alive)
        switched = sum(1 for c in conns if c.switched)
        resets = sum(1 for c in conns for e in c.errors if e.startswith("reset"))
        worst = max(c.max_gap for c in conns)
        stalled = sum(1 for c in conns if c.max_gap > STALL)
        say(f"long-lived connections: {alive}/{len(conns)} still working, {resets} reset, "
            f"{switched} answered by another backend; {stalled} went through node-1 and waited "
            f"up to {worst:.1f} s for the router, then carried on through another node")
        summary["node crash"] = (f"router converged in {t:.2f} s ({bfd}); " if t is not None else "") + (
            f"{alive}/{len(conns)} long-lived connections survived ({stalled} had used node-1), {resets} reset")
        say("restarting node-1")
        await asyncio.to_thread(lab.start_node, 1)
        t = await wait_for(lambda: all(len(lab.router_nexthops(v)) == n for v in VIPS), 30)
        say(f"node-1 back as a nexthop after {t:.1f} s" if t is not None else "node-1 did not come back in 30 s")

    if lab.plan.backends >= 2:
        step(4, "backend failure: kill-backend 2")
        before = len(load.failures)
        victim = lab.plan.backend(2)
        await asyncio.to_thread(lab.kill_backend, 2)
        t0 = time.monotonic()
        gone = await wait_for(lambda: not backend_serving_anywhere(lab, {victim.v4, victim.v6}), 15, interval=0.1)
        failed = len(load.failures) - before
        say(f"backend-2 left every node's table after {gone:.1f} s (health check: interval x fall); "
            f"{failed} new connections hashed to it were refused meanwhile" if gone is not None
            else "backend-2 was still in a table after 15 s")
        mark, before = Counter(load.by_backend), len(load.failures)
        await watch(table, 2, "b2 gone")
        after = Counter(load.by_backend) - mark
        say(f"since then: backend-2 served {after['backend-2']} requests, "
            f"{len(load.failures) - before} requests failed")
        summary["backend failure"] = (
            f"out of the tables in {gone:.1f} s; {failed} refused before, "
            f"{len(load.failures) - before} failed after" if gone is not None else "not removed")
        await asyncio.to_thread(lab.start_backend, 2)
        say(f"backend-2 restarted ({time.monotonic() - t0:.1f} s after the failure)")
        await watch(table, 2, "b2 back")

    if lab.plan.backends >= 2:
        await lost_vip(lab, summary)

    if n >= 2:
        step(6, f"graceful stop: stop-node {n} under load")
        before = len(load.failures)
        took = await asyncio.to_thread(lab.stop_node, n)
        say(f"node-{n} withdrew its VIPs and exited in {took:.1f} s; router: {nexthops(lab)}")
        await watch(table, 2, "stopped")
        failed = len(load.failures) - before
        say(f"failed requests during the graceful stop: {failed}")
        summary["graceful stop"] = f"{failed} failed requests"
        await asyncio.to_thread(lab.start_node, n)

    if lab.plan.config_source == "etcd":  # lab/fleet_demo.py
        from lab.fleet_demo import fleet_steps

        await wait_for(lambda: all(len(lab.router_nexthops(v)) == n for v in VIPS), 30)
        summary.update(await fleet_steps(lab, say, step, lambda s, label: watch(table, s, label), wait_for,
                                         lab.run_dir / "demo-web4.yaml"))

    await load.stop()
    for c in conns:
        if c.alive:
            await c.stop()
    summary["requests"] = f"{load.ok} answered, {len(load.failures)} failed, by backend {dict(sorted(load.by_backend.items()))}"
    return summary


async def lost_vip(lab: Lab, summary: dict) -> None:
    """The blackhole a direct check cannot see: the backend is up, only the VIP is gone."""
    victim = lab.plan.backend(lab.plan.backends)
    step(5, f"{victim.name} loses VIP {P.VIP_V4} on lo (host, decap and health port all fine)")
    Netns(victim.ns).ip("addr", "del", f"{P.VIP_V4}/32", "dev", "lo")
    try:
        gone = await wait_for(lambda: not backend_serving_anywhere(lab, {victim.v4}), 15, interval=0.1)
        view = {v["name"]: v for v in (lab.node_api(1, "/api/v1/vips") or {"vips": []})["vips"]}
        entry = next((b for b in view.get("web4", {}).get("backends", []) if b["address"] == victim.v4), {})
        say(f"{victim.name} left web4's table on every node after {gone:.1f} s; node-1's reason: "
            f"{entry.get('last_reason')}" if gone is not None else f"{victim.name} still serves web4 after 15 s")
        summary["lost VIP"] = (f"out of web4's tables in {gone:.1f} s by the tunnel check"
                               if gone is not None else "not removed")
    finally:
        Netns(victim.ns).ip("addr", "replace", f"{P.VIP_V4}/32", "dev", "lo")
    back = await wait_for(lambda: backend_serving_anywhere(lab, {victim.v4}), 15)
    say(f"VIP back on {victim.name}'s lo: serving web4 again after {back:.1f} s" if back is not None
        else f"{victim.name} did not come back within 15 s")


def run_demo(plan: P.LabPlan, keep: bool = False) -> int:
    lab = Lab(plan, lambda m: print(f"[lab] {m}", flush=True))
    step(1, f"lab up: {plan.nodes} nodes, {plan.backends} backends")
    try:
        lab.up()
    except LabError as exc:
        print(f"maglev lab demo: {exc}", file=sys.stderr)
        return 1
    rc = 0
    try:
        summary = asyncio.run(scenario(lab))
        step(7, "summary")
        for k, v in summary.items():
            print(f"  {k:<16} {v}")
    except (LabError, OSError) as exc:
        print(f"maglev lab demo: {exc}", file=sys.stderr)
        rc = 1
    finally:
        if keep:
            say("lab left up (--keep): `maglev lab status`, `maglev lab down` when done")
        else:
            step(8, "down")
            lab.down()
    return rc
