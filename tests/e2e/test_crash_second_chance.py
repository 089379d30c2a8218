"""End to end, issue 17: a backend joins a 4-backend VIP with second chance, then a node crashes
with 90 long-lived connections open. The flows the dead node carried meet a surviving node
that has no conntrack entry for them; those whose table entry moved to the new backend reach
it with their previous owner named in the GRE key, and its decap program hands them to the
backend that has their socket. None is reset; the new backend still takes its share of new
flows; both sides' counters show the path was taken.

Runs on the shared session lab, before tests/e2e/test_lab.py's last test takes it down (the
order is set in tests/e2e/conftest.py; always under `flock /tmp/mlb-lab.lock`)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from lab import plan as P
from lab.lab import Lab
from lab.nssocket import http_get
from lab.traffic import burst, open_long_lived
from tests.e2e.conftest import await_until, node_addresses, node_vips, serving_backends, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.root]

LONG_LIVED = 90
WINDOW = 300.0


def vip_file(lab: Lab, backends) -> dict:
    return {"vips": [{
        "name": "sc4",
        "address": P.SPARE_VIP_V4,
        "port": P.VIP_PORT,
        "table_size": 65537,
        "backends": [{"address": b.v4} for b in backends],
        "health_check": lab.plan.vip_file()["vips"][0]["health_check"],
        "second_chance": {"window": WINDOW},
    }]}


def hinted(lab: Lab, index: int) -> int:
    """second_chance_hinted from node I's /metrics (0 when the node does not answer)."""
    try:
        status, body = http_get(lab.plan.node(index).ns, "127.0.0.1", P.API_PORT, "/metrics")
    except OSError:
        return 0
    m = re.search(r'^maglev_forwarder_events_total\{event="second_chance_hinted"\} (\S+)$', body.decode(), re.M)
    return int(float(m.group(1))) if status == 200 and m else 0


async def test_backend_added_then_node_crash_resets_no_connection(ready: Lab) -> None:
    plan = ready.plan
    assert plan.backends >= 5, "the e2e lab needs 5 backends for this test (tests/e2e/conftest.py)"
    first, new = plan.backend_hosts[:4], plan.backend_hosts[4]
    dirs = [plan.node_dir(h.index) / "vips.d" for h in plan.node_hosts]
    for h in plan.backend_hosts:
        ready.setup_backend(h.index, extra_vips=[P.SPARE_VIP_V4])
    conns = []
    try:
        for d in dirs:
            (d / "sc.yaml").write_text(P.dump_yaml(vip_file(ready, first)))
        wait_until(lambda: ready.router_nexthops(P.SPARE_VIP_V4) == node_addresses(ready, 4), 30,
                   "sc4 to be announced by every node")
        wait_until(lambda: all(serving_backends(node_vips(ready, h.index)["sc4"]) == {b.v4 for b in first}
                               for h in plan.node_hosts), 30, "sc4 served by its 4 backends on every node")
        conns = await open_long_lived([P.SPARE_VIP_V4], LONG_LIVED, period=0.1, timeout=15)
        await asyncio.sleep(1.0)
        assert all(c.alive for c in conns)
        assert not {c.backend for c in conns} & {new.name}

        # 1. a fifth backend joins: a fifth of the entries move to it on every node
        for d in dirs:
            (d / "sc.yaml").write_text(P.dump_yaml(vip_file(ready, [*first, new])))
        await await_until(lambda: all(new.v4 in serving_backends(node_vips(ready, h.index)["sc4"])
                                      for h in plan.node_hosts), 30, "backend-5 in sc4's table on every node")
        before = {b.index: ready.backend_decap_counters(b.index) for b in plan.backend_hosts}

        # 2. a node crashes: its flows move to nodes that have no conntrack entry for them
        dead = {plan.node(1).v4}
        await asyncio.to_thread(ready.kill_node, 1)
        expected = node_addresses(ready, 4) - dead
        await await_until(lambda: ready.router_nexthops(P.SPARE_VIP_V4) == expected, 10,
                          "the router to drop node-1", interval=0.02)
        converged = {id(c): c.requests for c in conns}
        t_converged = time.monotonic()
        # Every connection goes on: 5 more requests each. One that went through node-1 had its
        # retransmission timer doubling while the router still sent to the dead node (200,
        # 400, 800 ms...), so its next try can come a few seconds after the router moved it;
        # one whose packets are lost for good never makes them.
        def going_on() -> bool:
            return all(c.errors or c.requests > converged[id(c)] + 5 for c in conns)
        took = await await_until(going_on, 20, "every long-lived connection to make 5 more requests")
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - t_converged)))
        resets = [c for c in conns if c.errors]
        print(f"\n[e2e] second chance: {len(resets)} of {len(conns)} long-lived connections reset "
              f"after a backend joined and node-1 crashed; all going on again {took:.1f} s after "
              "the router dropped node-1")
        assert not resets, [f"{c.backend}: {c.errors}" for c in resets[:5]]
        for c in conns:
            assert not c.switched, f"a connection on {c.backend} was answered by {c.switched}"
        stalled = [c for c in conns if c.max_gap > 0.15]
        assert stalled, "no connection stalled: none went through the crashed node?"

        # 3. the path was taken: nodes named previous owners, backend-5 handed flows back, and
        # the previous owners accepted them; nothing was dropped after its second chance
        after = {b.index: ready.backend_decap_counters(b.index) for b in plan.backend_hosts}
        moved = {b: {k: after[b][k] - before[b].get(k, 0) for k in after[b]} for b in after}
        assert moved[new.index]["sc_redirected"] > 0, moved[new.index]
        assert sum(moved[b.index]["sc_accepted"] for b in first) > 0, moved
        assert sum(m["sc_dropped"] for m in moved.values()) == 0, moved
        assert sum(hinted(ready, h.index) for h in plan.node_hosts[1:]) > 0

        # 4. the new backend takes its full share of new flows (no SYN is hinted or handed on)
        share = node_vips(ready, 2)["sc4"]
        new_share = next(b["table_share"] for b in share["backends"] if b["address"] == new.v4)
        result = await burst(P.SPARE_VIP_V4, 300, concurrency=16)
        assert result.failures == [], result.failures[:5]
        seen = result.by_backend[new.name] / 300
        # 300 flows, p ~ 0.2: one standard deviation is ~0.023; 0.08 is a wide, safe margin.
        assert abs(seen - new_share) < 0.08, f"backend-5 served {seen:.2f} of new flows, table share {new_share:.2f}"
    finally:
        for c in conns:
            if c.alive:
                await c.stop()
        for d in dirs:
            (d / "sc.yaml").unlink(missing_ok=True)
        if not ready.pid(plan.node(1).name):
            ready.start_node(1)
    wait_until(lambda: not ready.router_nexthops(P.SPARE_VIP_V4), 30, "sc4 to be withdrawn")
    for h in plan.backend_hosts:
        ready.setup_backend(h.index)
