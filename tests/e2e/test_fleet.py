"""End to end, the fleet: the lab with --config-source etcd (a real 3-member etcd cluster in its
own namespaces on a control network; every node reads its VIPs from it) driven with the real
`maglev fleet` command.

This module builds its own lab and takes it down at its end, before test_lab.py's (file order:
only one lab can run at a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from lab import etcd
from lab import plan as P
from lab.lab import Lab
from lab.traffic import burst
from tests.e2e.conftest import VIPS, node_addresses, node_vips, serving_backends, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.root]


@pytest.fixture(scope="module")
def fleet_lab():
    if P.RUN_DIR.exists():
        pytest.fail(f"a lab is already up ({P.RUN_DIR}): only one lab can run at a time")
    lab = Lab(P.LabPlan(nodes=3, backends=3, config_source="etcd"),
              progress=lambda m: print(f"[lab] {m}", flush=True))
    lab.up(timeout=90)
    try:
        yield lab
    finally:
        lab.down(quiet=True)


def source(lab: Lab, index: int) -> dict:
    return (lab.node_status(index) or {}).get("config_source") or {}


def revisions(lab: Lab) -> set:
    return {source(lab, h.index).get("revision") for h in lab.plan.node_hosts}


def fleet_status(lab: Lab, node: int = 1) -> tuple[int, dict]:
    out = etcd.fleet(lab.plan, "status", "--json", node=node)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}


def converged(lab: Lab) -> bool:
    backends = {4: {h.v4 for h in lab.plan.backend_hosts}, 6: {h.v6 for h in lab.plan.backend_hosts}}
    for h in lab.plan.node_hosts:
        st = source(lab, h.index)
        if st.get("stale") or not st.get("registered"):
            return False
        vips = node_vips(lab, h.index)
        for name, addr in VIPS.items():
            v = vips.get(name)
            if not v or not v["announced"] or serving_backends(v) != backends[6 if ":" in addr else 4]:
                return False
    if len(revisions(lab)) != 1:
        return False
    return all(lab.router_nexthops(a) == node_addresses(lab, 6 if ":" in a else 4) for a in VIPS.values())


@pytest.fixture
def fleet_ready(fleet_lab: Lab) -> Lab:
    for k in range(1, P.ETCD_MEMBERS + 1):
        fleet_lab.start_etcd(k)
    for h in fleet_lab.plan.node_hosts:
        fleet_lab.set_etcd_link(h.index, True)
    wait_until(lambda: converged(fleet_lab), 60, "every node fresh, at one revision, announcing both VIPs")
    return fleet_lab


def spare_file(lab: Lab, path, **extra) -> str:
    vip = {"name": "spare4", "address": P.SPARE_VIP_V4, "port": P.VIP_PORT, "table_size": 251,
           "backends": [{"address": b.v4} for b in lab.plan.backend_hosts],
           "health_check": lab.plan.vip_file()["vips"][0]["health_check"], **extra}
    path.write_text(P.dump_yaml({"vips": [vip]}))
    return str(path)


def digests(lab: Lab, vip: str) -> dict[str, str | None]:
    return {h.name: node_vips(lab, h.index).get(vip, {}).get("digest") for h in lab.plan.node_hosts}


# 1 ----------------------------------------------------------------------------------------------


async def test_fleet_apply_reaches_every_node_at_one_revision(fleet_ready: Lab, tmp_path) -> None:
    lab = fleet_ready
    for h in lab.plan.backend_hosts:
        lab.setup_backend(h.index, extra_vips=[P.SPARE_VIP_V4])
    try:
        out = etcd.fleet(lab.plan, "apply", spare_file(lab, tmp_path / "spare.yaml"))
        assert out.returncode == 0, out.stderr
        written = int(out.stdout.rsplit("revision", 1)[1])

        def applied_everywhere() -> bool:
            if revisions(lab) != {written}:
                return False
            d = digests(lab, "spare4")
            return None not in d.values() and len(set(d.values())) == 1 and all(
                node_vips(lab, h.index)["spare4"]["announced"] for h in lab.plan.node_hosts)

        took = wait_until(applied_everywhere, 2, "every node at the written revision, serving spare4 with one digest",
                          interval=0.05)
        # The README's figure comes from here (a bounded wait above; the measure is printed).
        print(f"[measure] fleet apply returned -> 3 nodes at revision {written}, spare4 announced "
              f"with one digest: {took:.2f} s", flush=True)
        wait_until(lambda: lab.router_nexthops(P.SPARE_VIP_V4) == node_addresses(lab, 4), 30,
                   "the router to use every node for spare4")
        result = await burst(P.SPARE_VIP_V4, 60)
        assert not result.failures, result.failures[:5]
        code, view = fleet_status(lab)
        assert code == 0 and view["differing"] == [] and view["revisions"] == [written]
        assert [n["node_id"] for n in view["nodes"]] == [h.name for h in lab.plan.node_hosts]
    finally:
        etcd.fleet(lab.plan, "delete", "spare4")
        wait_until(lambda: not lab.router_nexthops(P.SPARE_VIP_V4), 30, "spare4 withdrawn")
        for h in lab.plan.backend_hosts:
            lab.setup_backend(h.index)


# 2 ----------------------------------------------------------------------------------------------


async def test_bad_object_is_refused_and_changes_nothing(fleet_ready: Lab, tmp_path) -> None:
    lab = fleet_ready
    before = revisions(lab)
    before_digests = {v: digests(lab, v) for v in VIPS}
    bad = spare_file(lab, tmp_path / "bad.yaml", table_size=250)
    out = etcd.fleet(lab.plan, "apply", bad)
    assert out.returncode == 2 and "table_size 250 is not prime" in out.stderr, out.stdout + out.stderr
    clash = tmp_path / "clash.yaml"
    clash.write_text(P.dump_yaml({"vips": [{**lab.plan.vip_file()["vips"][0], "name": "copy"}]}))
    out = etcd.fleet(lab.plan, "apply", str(clash))
    assert out.returncode == 2 and "overlaps VIP 'web4'" in out.stderr
    time.sleep(1.0)  # give a (wrong) write every chance to show up
    assert revisions(lab) == before
    assert {v: digests(lab, v) for v in VIPS} == before_digests
    for h in lab.plan.node_hosts:
        assert set(node_vips(lab, h.index)) == set(VIPS)


# 3 ----------------------------------------------------------------------------------------------


async def test_one_etcd_member_killed_changes_nothing(fleet_ready: Lab, tmp_path) -> None:
    lab = fleet_ready
    before = {v: digests(lab, v) for v in VIPS}
    lab.kill_etcd(1)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # watch for any blip for a few seconds
            for h in lab.plan.node_hosts:
                vips = node_vips(lab, h.index)
                assert all(vips[v]["announced"] for v in VIPS), f"{h.name} withdrew a VIP"
                assert not source(lab, h.index).get("stale"), f"{h.name} went stale with 2 of 3 members up"
            time.sleep(0.25)
        assert {v: digests(lab, v) for v in VIPS} == before
        for addr in VIPS.values():
            result = await burst(addr, 30)
            assert not result.failures, result.failures[:5]
        # The surviving quorum still takes changes, and the nodes still follow.
        code, view = fleet_status(lab)
        assert code == 0 and len(view["nodes"]) == 3
    finally:
        lab.start_etcd(1)


# 4 ----------------------------------------------------------------------------------------------


async def test_node_cut_off_from_etcd_keeps_serving_reports_stale_then_catches_up(fleet_ready: Lab, tmp_path) -> None:
    lab = fleet_ready
    before = revisions(lab).pop()
    lab.set_etcd_link(1, False)
    try:
        took = wait_until(lambda: source(lab, 1).get("stale"), 10, "node-1 to report itself stale", interval=0.1)
        print(f"[measure] ctl0 down -> node-1 reports stale: {took:.2f} s", flush=True)
        out = subprocess.run(["ip", "netns", "exec", lab.plan.node(1).ns, sys.executable, "-m", "node.cli", "status",
                              "--config", str(lab.plan.node_dir(1) / "node.yaml")],
                             capture_output=True, text=True, timeout=30)
        assert f"revision {before}  STALE for" in out.stdout and "serving the last good config" in out.stdout, out.stdout
        # Its data path is untouched: still a nexthop, still serving, nothing withdrawn.
        assert lab.router_nexthops(P.VIP_V4) == node_addresses(lab, 4)
        assert all(node_vips(lab, 1)[v]["announced"] for v in VIPS)
        # A change made meanwhile reaches the others only.
        web4 = dict(lab.plan.vip_file()["vips"][0])
        web4["backends"] = [{**b, "weight": 2.0 if i == 0 else 1.0} for i, b in enumerate(web4["backends"])]
        changed = tmp_path / "web4.yaml"
        changed.write_text(P.dump_yaml({"vips": [web4]}))
        out = etcd.fleet(lab.plan, "apply", str(changed), node=2)
        assert out.returncode == 0, out.stderr
        wait_until(lambda: source(lab, 2).get("revision", 0) > before and source(lab, 3).get("revision", 0) > before,
                   5, "nodes 2 and 3 to apply the change")
        assert source(lab, 1)["revision"] == before and source(lab, 1)["stale"]
        for _ in range(3):
            result = await burst(P.VIP_V4, 30)
            assert not result.failures, result.failures[:5]
        # node-1 cannot renew its lease: it leaves the registry, and the fleet view says so.
        wait_until(lambda: [n["node_id"] for n in fleet_status(lab, node=2)[1]["nodes"]] == ["node-2", "node-3"],
                   10, "node-1's record to expire")

        # Restarted while etcd is still out of reach, node-1 serves its persisted last good config.
        lab.stop_node(1)
        lab.start_node(1)
        st = source(lab, 1)
        assert st["revision"] == before and st["served_from_cache"] and st["stale"], st
        wait_until(lambda: all(node_vips(lab, 1)[v]["announced"] for v in VIPS), 30,
                   "node-1 to announce both VIPs again from its cached config")
        wait_until(lambda: lab.router_nexthops(P.VIP_V4) == node_addresses(lab, 4), 30,
                   "the router to use node-1 again")
        for _ in range(3):
            result = await burst(P.VIP_V4, 30)
            assert not result.failures, result.failures[:5]

        # Meanwhile etcd compacts its history past everything node-1 saw.
        compacted = compact_etcd(lab)
        assert compacted > before
    finally:
        lab.set_etcd_link(1, True)
    took = wait_until(lambda: not source(lab, 1).get("stale") and len(revisions(lab)) == 1, 15,
                      "node-1 to catch up with the others (a full re-read: the history is compacted)", interval=0.1)
    print(f"[measure] ctl0 up -> node-1 fresh at the fleet's revision: {took:.2f} s", flush=True)
    assert source(lab, 1)["revision"] > before and not source(lab, 1)["served_from_cache"]
    wait_until(lambda: len(fleet_status(lab)[1]["nodes"]) == 3 and fleet_status(lab)[0] == 0, 10,
               "node-1 back in the registry with equal digests")
    # Put the lab's original web4 back for the next tests.
    original = tmp_path / "orig.yaml"
    original.write_text(P.dump_yaml({"vips": [lab.plan.vip_file()["vips"][0]]}))
    out = etcd.fleet(lab.plan, "apply", str(original))
    assert out.returncode == 0, out.stderr
    # ... and node-1 follows that change by its watch, from after the compacted history.
    restored = int(out.stdout.rsplit("revision", 1)[1])
    wait_until(lambda: revisions(lab) == {restored}, 5, "every node, node-1 included, at the restored revision")


def compact_etcd(lab: Lab) -> int:
    """Compact the cluster's history up to its current revision (etcdctl from node-2, which
    reaches the control network); returns that revision."""
    base = ["ip", "netns", "exec", lab.plan.node(2).ns, "etcdctl", "--endpoints", ",".join(P.etcd_endpoints())]
    out = subprocess.run([*base, "get", P.ETCD_PREFIX, "--prefix", "--keys-only", "-w", "json"],
                         capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
    assert out.returncode == 0, out.stderr
    revision = int(json.loads(out.stdout)["header"]["revision"])
    out = subprocess.run([*base, "compact", str(revision), "--physical"], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
    assert out.returncode == 0 and f"compacted revision {revision}" in out.stdout, out.stdout + out.stderr
    return revision


# 5 ----------------------------------------------------------------------------------------------


def test_differing_health_view_is_flagged_by_fleet_status(fleet_ready: Lab) -> None:
    """node-1 alone loses the health checks of backend-2. The lab's checks go through the
    tunnel (to the VIP, GRE to the backend, answered straight back), so the cut is made where
    only node-1's checks pass: backend-2 cannot send its health port's answers to node-1's
    address (a policy rule in backend-2's namespace). The data path (answers to the client)
    and the other nodes' checks are untouched."""
    lab = fleet_ready
    b2 = lab.plan.backend(2).v4
    # ipproto 6 (tcp): a minimal Debian has no /etc/protocols to resolve the name.
    rule = ["rule", "add", "from", f"{P.VIP_V4}/32", "to", f"{lab.plan.node(1).v4}/32", "ipproto", "6",
            "sport", str(P.HEALTH_PORT), "prohibit", "pref", "90"]
    from lab.netns import Netns

    cut = Netns(lab.plan.backend(2).ns)  # backend-2's answers to node-1
    cut.ip(*rule)
    try:
        def flagged() -> bool:
            code, view = fleet_status(lab, node=2)
            reasons = view.get("vips", {}).get("web4", {}).get("reasons", [])
            return code == 3 and any(f"different health view of backend {b2}: down on node-1; up on node-2, node-3" in r
                                     for r in reasons)

        took = wait_until(flagged, 5, "fleet status to flag web4 with node-1's view of backend-2", interval=0.1)
        print(f"[measure] backend-2's health answers to node-1 cut -> `fleet status` flags web4: {took:.2f} s", flush=True)
        out = etcd.fleet(lab.plan, "status", node=2)
        print(out.stdout)  # the README's example comes from here
        assert "VIP web4: DIGESTS DIFFER" in out.stdout and "VIP web6" not in out.stdout
    finally:
        cut.ip(*[("del" if a == "add" else a) for a in rule])
    wait_until(lambda: fleet_status(lab)[0] == 0, 15, "the fleet to agree again")
