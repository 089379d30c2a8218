"""The demo's fleet steps (`maglev lab demo --config-source etcd`), run under the demo's load:
the fleet view, a change rolled out through etcd, a node cut off from etcd that keeps serving
and catches up, and an etcd member killed with nothing changing."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable

from lab import etcd
from lab import plan as P
from lab.lab import Lab


def _source(lab: Lab, index: int) -> dict[str, Any]:
    return (lab.node_status(index) or {}).get("config_source") or {}


def _revisions(lab: Lab) -> dict[str, Any]:
    return {h.name: _source(lab, h.index).get("revision") for h in lab.plan.node_hosts}


async def fleet_steps(lab: Lab, say: Callable[[str], None], step: Callable[[Any, str], None],
                      watch: Callable[[float, str], Awaitable[None]],
                      wait_for: Callable[..., Awaitable[float | None]], tmp_file) -> dict[str, str]:
    summary: dict[str, str] = {}
    step("6b", "fleet: one config through etcd (3 members), and a view that proves the nodes agree")
    out = await asyncio.to_thread(etcd.fleet, lab.plan, "status")
    print(out.stdout.rstrip(), flush=True)

    web4 = dict(lab.plan.vip_file()["vips"][0])
    web4["backends"] = [{**b, "weight": 2.0 if i == 0 else 1.0} for i, b in enumerate(web4["backends"])]
    tmp_file.write_text(P.dump_yaml({"vips": [web4]}))
    say("cut-etcd 1: node-1's links to etcd down, its data path up")
    await asyncio.to_thread(lab.set_etcd_link, 1, False)
    t = await wait_for(lambda: _source(lab, 1).get("stale"), 10)
    say(f"node-1 reports itself stale after {t:.1f} s and keeps serving revision {_source(lab, 1).get('revision')}"
        if t is not None else "node-1 did not report stale within 10 s")
    say(f"maglev fleet apply (backend-1 weight 2) through node-2")
    t0 = time.monotonic()
    out = await asyncio.to_thread(etcd.fleet, lab.plan, "apply", str(tmp_file), node=2)
    say(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"apply failed: {out.stderr.strip()}")
    await wait_for(lambda: len({r for n, r in _revisions(lab).items() if n != "node-1"}) == 1, 5)
    say(f"revisions now: {_revisions(lab)} (node-1 behind, still serving)")
    await watch(2, "cut off")
    await asyncio.to_thread(lab.set_etcd_link, 1, True)
    t = await wait_for(lambda: len(set(_revisions(lab).values())) == 1 and not _source(lab, 1).get("stale"), 15)
    say(f"reconnect-etcd 1: node-1 caught up after {t:.1f} s: {_revisions(lab)}" if t is not None
        else "node-1 did not catch up within 15 s")
    summary["fleet change"] = f"applied by every live node; node-1 cut off kept serving, caught up in {t:.1f} s" \
        if t is not None else "node-1 did not catch up"

    say("kill-etcd 1 (one of 3 members)")
    before = _revisions(lab)
    await asyncio.to_thread(lab.kill_etcd, 1)
    await watch(3, "etcd-1 down")
    stale = [h.name for h in lab.plan.node_hosts if _source(lab, h.index).get("stale")]
    say(f"with etcd-1 dead: stale nodes {stale or 'none'}, revisions {_revisions(lab)}")
    summary["etcd member down"] = "nothing changed" if not stale and _revisions(lab) == before else \
        f"stale: {stale}"
    await asyncio.to_thread(lab.start_etcd, 1)
    out = await asyncio.to_thread(etcd.fleet, lab.plan, "status", "--json")
    view = json.loads(out.stdout or "{}")
    say(f"fleet status: {len(view.get('nodes', []))} live node(s), VIPs differing: {view.get('differing') or 'none'}")
    return summary
