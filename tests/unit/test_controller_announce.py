"""The announce policy's hooks in the controller (fake components): the disable file, the
fallback pool reaching the forwarder, a hold-down ending with no new input, and the node-level
validation of prepends."""

from __future__ import annotations

import asyncio

import yaml

from healthcheck import State
from node.config import check_vips_for_node, parse_node_object, parse_vip_object
from node.disable_switch import DisableSwitch
from tests.unit.test_controller import REPO, Env, vip

BACKENDS = ("10.0.1.1", "10.0.1.2", "10.0.1.3")


async def all_up(e: Env) -> None:
    await e.start()
    for a in BACKENDS:
        e.health.set(a, State.UP)


async def test_disable_file_de_prefers_every_vip_and_removing_it_restores_them(tmp_path):
    e = Env(tmp_path, [vip(), vip("api", "10.100.0.2")])
    await all_up(e)
    await e.c.reconcile()
    assert {r.prepend for r in e.speaker.desired} == {0}
    disable = e.c.run_dir / "disable"
    assert e.c.disable.path == disable
    disable.touch()
    assert e.c.disable.poll()
    d = await e.c.reconcile()
    assert {n: x.state for n, x in d.vips.items()} == {"web": "depreferred", "api": "depreferred"}
    assert all(r.prepend == 3 and r.med == 1000 for r in e.speaker.desired)
    assert len(e.speaker.desired) == 2  # still announced: de-preferred, not withdrawn
    assert e.c.status()["disable"]["active"]
    disable.unlink()
    assert e.c.disable.poll()
    d = await e.c.reconcile()
    assert {x.state for x in d.vips.values()} == {"announced"}
    assert {(r.med, r.prepend) for r in e.speaker.desired} == {(None, 0)}


async def test_disable_file_with_action_withdraw(tmp_path):
    e = Env(tmp_path, [vip()])
    e.c.disable = DisableSwitch(tmp_path / "maint", "withdraw")  # disable: {path: ..., action: withdraw}
    await all_up(e)
    (tmp_path / "maint").touch()
    e.c.disable.poll()
    d = await e.c.reconcile()
    assert d.vips["web"].state == "withdrawn" and str(tmp_path / "maint") in d.vips["web"].reason
    assert e.speaker.prefixes == []


def test_an_unexaminable_disable_path_counts_as_absent_and_says_why(tmp_path):
    (tmp_path / "file").write_text("")
    switch = DisableSwitch(tmp_path / "file" / "disable", "deprefer")  # a parent that is a file
    assert switch.poll()
    assert not switch.state.active and "treated as absent" in switch.state.error
    assert not switch.poll()  # no change, no new report


async def test_fallback_pool_is_what_the_forwarder_gets_while_the_primary_is_down(tmp_path):
    e = Env(tmp_path, [vip(backends=("10.0.1.1", "10.0.1.2"), fallback_backends=[{"address": "10.0.9.1"}])])
    await e.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.9.1"):
        e.health.set(a, State.UP)
    await e.c.reconcile()
    assert set(e.forwarder.last["web"]["table"]) == {"10.0.1.1", "10.0.1.2"}
    assert e.forwarder.last["web"]["states"]["10.0.9.1"] == "drain"
    for a in ("10.0.1.1", "10.0.1.2"):
        e.health.set(a, State.DOWN)
    d = await e.c.reconcile()
    assert set(e.forwarder.last["web"]["table"]) == {"10.0.9.1"}
    assert d.vips["web"].state == "depreferred" and e.speaker.desired[0].prepend == 3
    view = e.c.vip_view("web")
    assert view["fallback_in_use"] and [b["fallback"] for b in view["backends"]] == [False, False, True]


async def test_a_hold_down_that_ends_wakes_the_loop_with_no_new_input(tmp_path):
    e = Env(tmp_path, [vip(announce={"min_healthy": 2})])
    await all_up(e)
    for t in range(3):  # three losses of the healthy verdict within the window (threshold 3)
        e.now = float(2 * t)
        e.health.set("10.0.1.2", State.UP)
        e.health.set("10.0.1.3", State.UP)
        await e.c.reconcile()
        e.now = 2 * t + 1.0
        e.health.set("10.0.1.2", State.DOWN)
        e.health.set("10.0.1.3", State.DOWN)
        await e.c.reconcile()
    e.health.set("10.0.1.2", State.UP)
    e.now = 6.0
    d = await e.c.reconcile()
    assert d.vips["web"].state == "depreferred" and d.vips["web"].policy.code == "dampened"
    assert d.wakeups() == {"web": 5.0 + 5.0}  # the 3rd loss at t=5, flap_hold_down 5 s
    e.now = 10.5
    await asyncio.wait_for(e.c._wait_dirty(), 2)  # returns at once: the hold already ended
    d = await e.c.reconcile()
    assert d.vips["web"].state == "announced"


def test_prepends_set_for_an_ibgp_peer_are_refused_naming_the_field():
    node = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    node["bgp"]["peers"] = [{"address": "192.0.2.1", "peer_as": node["bgp"]["local_as"]}]
    cfg = parse_node_object(node, "node.yaml")
    explicit = parse_vip_object(vip(announce={"deprefer": {"prepend": 2}}), "vips.d/web.yaml")
    (problem,) = check_vips_for_node({"web": explicit}, cfg, "vips.d/web.yaml")
    assert problem.field == "announce.deprefer.prepend" and "iBGP" in problem.message
    default = parse_vip_object(vip(), "vips.d/web.yaml")  # the default 3 is just not sent
    assert check_vips_for_node({"web": default}, cfg, "vips.d/web.yaml") == []

