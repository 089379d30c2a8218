"""The announce policy (node.announce_policy) and how node.reconcile uses it: pure functions,
so every rule is tested with plain values and a clock that is just a number."""

from __future__ import annotations

import pytest

from node.announce_policy import (
    AnnounceDecision,
    DampingParams,
    NodeState,
    PoolCounts,
    decide_announce,
)
from node.config import AnnouncePolicy, ConfigError, VipConfig, parse_vip_object
from node.reconcile import Health, Inputs, TableCache, decide

NODE = NodeState()


def policy(**kw) -> AnnouncePolicy:
    return AnnouncePolicy.model_validate(kw)


def run(pol: AnnouncePolicy, counts: list[int], node: NodeState = NODE, *, start: float = 0.0, step: float = 1.0,
        damping: DampingParams = DampingParams(hold_down=0), previous: AnnounceDecision | None = None,
        ) -> list[AnnounceDecision]:
    """Feed a series of primary serving counts, one per ``step`` seconds."""
    out = []
    for i, n in enumerate(counts):
        previous = decide_announce(pol, PoolCounts(n), node, previous, start + i * step, damping)
        out.append(previous)
    return out


def states(decisions: list[AnnounceDecision]) -> list[str]:
    return [d.state for d in decisions]


# -- defaults: today's behaviour --------------------------------------------------------------


def test_default_policy_announces_at_min_healthy_and_withdraws_below():
    pol = policy(min_healthy=2, med=50, communities=["65000:1"])
    got = run(pol, [2, 1, 2, 0])
    assert states(got) == ["announced", "withdrawn", "announced", "withdrawn"]
    assert got[0].attributes.med == 50 and got[0].attributes.communities == ("65000:1",)
    assert got[0].attributes.prepend == 0
    assert got[1].attributes is None
    assert "1 serving backend(s), fewer than min_healthy 2" in got[1].reason
    assert got[1].code == "below_min_healthy" and got[3].code == "no_backend"


# -- hysteresis -------------------------------------------------------------------------------


def test_hysteresis_withdraws_below_min_healthy_and_announces_again_only_at_the_higher_count():
    pol = policy(min_healthy=2, min_healthy_to_announce=4)
    got = run(pol, [3, 2, 1, 2, 3, 4, 3, 2, 1])
    assert states(got) == ["announced", "announced", "withdrawn", "withdrawn", "withdrawn",
                           "announced", "announced", "announced", "withdrawn"]
    assert "fewer than min_healthy_to_announce 4" in got[4].reason


def test_a_node_without_history_starts_from_min_healthy():
    pol = policy(min_healthy=2, min_healthy_to_announce=4)
    assert states(run(pol, [2])) == ["announced"]
    assert states(run(pol, [1])) == ["withdrawn"]


# -- deprefer ---------------------------------------------------------------------------------


def test_deprefer_keeps_the_route_with_a_worse_med_prepends_and_a_community():
    pol = policy(min_healthy=2, on_unhealthy="deprefer", med=10, communities=["65000:1"],
                 deprefer={"prepend": 2, "communities": ["65000:666"]})
    ok, bad = run(pol, [2, 1])
    assert ok.state == "announced" and bad.state == "depreferred"
    assert bad.attributes.med == 1010  # the VIP's med + 1000 by default
    assert bad.attributes.prepend == 2
    assert bad.attributes.communities == ("65000:1", "65000:666")
    assert "on_unhealthy: deprefer" in bad.reason


def test_deprefer_with_nothing_serving_is_withdrawn():
    """A route to an empty table would blackhole its share of the traffic."""
    (d,) = run(policy(on_unhealthy="deprefer"), [0])
    assert d.state == "withdrawn" and d.code == "no_backend"
    assert "whatever on_unhealthy says" in d.reason


# -- dampening --------------------------------------------------------------------------------

DAMP = DampingParams(hold_down=5, hold_down_max=20, threshold=3, window=60)


def flaps(pol, times: int, start: float, previous=None) -> list[AnnounceDecision]:
    """``times`` losses of the healthy verdict, one a second (up at t, down at t+0.5)."""
    out = []
    for i in range(times):
        for t, n in ((start + i, 2), (start + i + 0.5, 0)):
            previous = decide_announce(pol, PoolCounts(n), NODE, previous, t, DAMP)
            out.append(previous)
    return out


def test_a_flapping_vip_is_held_de_preferred_never_withdrawn_while_something_serves():
    pol = policy(min_healthy=2)  # on_unhealthy: withdraw
    got = flaps(pol, 3, 0.0)
    third_loss = got[-1]
    assert third_loss.state == "withdrawn"  # nothing serves at that moment: withdrawn
    assert third_loss.damping.held_until == pytest.approx(2.5 + 5)
    # The pool comes back at once and wobbles: de-preferred throughout the hold, whatever the
    # count (1 backend still serves), never withdrawn.
    d = third_loss
    for t, n in ((3.0, 2), (3.5, 1), (4.0, 2), (6.0, 1), (7.0, 2)):
        d = decide_announce(pol, PoolCounts(n), NODE, d, t, DAMP)
        assert d.state == "depreferred", (t, n, d.reason)
        assert d.code == "dampened" and "held down by dampening" in d.reason
        assert d.wakeup == pytest.approx(7.5)
        assert d.attributes.med == 1000 and d.attributes.prepend == 3
    # The hold ends: announced normally again.
    d = decide_announce(pol, PoolCounts(2), NODE, d, 7.5, DAMP)
    assert d.state == "announced" and d.wakeup is None


def test_hold_down_doubles_up_to_the_maximum_and_is_forgiven_after_a_quiet_period():
    pol = policy(min_healthy=2)
    d = flaps(pol, 3, 0.0)[-1]
    assert d.damping.held_until - 2.5 == pytest.approx(5)
    d = flaps(pol, 3, 10.0, d)[-1]
    assert d.damping.held_until - 12.5 == pytest.approx(10)
    d = flaps(pol, 3, 30.0, d)[-1]
    assert d.damping.held_until - 32.5 == pytest.approx(20)
    d = flaps(pol, 3, 60.0, d)[-1]
    assert d.damping.held_until - 62.5 == pytest.approx(20)  # capped
    d = flaps(pol, 3, 200.0, d)[-1]  # quiet for more than hold_down_max: forgiven
    assert d.damping.held_until - 202.5 == pytest.approx(5)


def test_losses_outside_the_window_do_not_count():
    pol = policy(min_healthy=2)
    params = DampingParams(hold_down=5, hold_down_max=20, threshold=3, window=10)
    d = None
    for t in (0, 8, 16, 24):  # one loss every 8 s: never 3 within 10 s
        d = decide_announce(pol, PoolCounts(2), NODE, d, t, params)
        d = decide_announce(pol, PoolCounts(1), NODE, d, t + 1, params)
    assert d.damping.held_until < 0


def test_backends_held_by_their_checks_dampening_de_prefer_instead_of_withdrawing():
    pol = policy(min_healthy=3)
    d = decide_announce(pol, PoolCounts(primary=1, held=2), NODE, None, 0.0, DAMP)
    assert d.state == "depreferred" and d.code == "backends_dampened"
    assert "2 backend(s) are held down" in d.reason
    d = decide_announce(pol, PoolCounts(primary=1, held=1), NODE, None, 0.0, DAMP)
    assert d.state == "withdrawn"  # not enough even counting the held ones


# -- the node's own state ---------------------------------------------------------------------


def test_disable_file_de_prefers_every_healthy_vip_or_withdraws_it():
    pol = policy(min_healthy=2)
    deprefer = NodeState(disabled="deprefer", disable_path="/run/maglev/disable")
    (d,) = run(pol, [3], deprefer)
    assert d.state == "depreferred" and d.code == "disabled"
    assert "/run/maglev/disable" in d.reason and d.attributes.prepend == 3
    (d,) = run(pol, [1], deprefer)  # disabled never makes an unhealthy VIP come back
    assert d.state == "withdrawn"
    (d,) = run(pol, [3], NodeState(disabled="withdraw"))
    assert d.state == "withdrawn" and d.code == "disabled"


def test_forwarder_failure_drain_and_warmup_withdraw():
    pol = policy()
    assert run(pol, [3], NodeState(forwarder_ok=False, forwarder_reason="x"))[0].code == "forwarder"
    assert run(pol, [3], NodeState(drained=True))[0].code == "drained"
    d = run(pol, [3], NodeState(warmup_over=False))[0]
    assert d.state == "withdrawn" and d.code == "warmup" and d.pool_ok is None


# -- the fallback pool, through node.reconcile ------------------------------------------------


def vip(**kw) -> VipConfig:
    data = {"name": "web", "address": "10.77.100.1", "port": 80, "table_size": 251,
            "backends": [{"address": f"10.0.0.{i}"} for i in (1, 2, 3)],
            "fallback_backends": [{"address": "10.0.9.1"}, {"address": "10.0.9.2"}],
            "announce": {"min_healthy": 2, "min_healthy_to_announce": 3}}
    data.update(kw)
    return VipConfig.model_validate(data)


def health(v: VipConfig, down: set[str]) -> dict:
    return {(v.name, b.key): Health.DOWN if b.key in down else Health.UP for b in v.all_backends}


def test_fallback_pool_serves_only_while_the_primary_is_below_its_threshold():
    v = vip()
    tables = TableCache()
    d = decide(Inputs({"web": v}, health(v, set())), tables).vips["web"]
    assert d.state == "announced" and not d.policy.use_fallback
    assert set(d.table.backends) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert {b.key: b.data_state for b in d.backends if b.fallback} == {"10.0.9.1": "drain", "10.0.9.2": "drain"}

    prev = decide(Inputs({"web": v}, health(v, {"10.0.0.1", "10.0.0.2"})), tables)
    d = prev.vips["web"]
    assert d.policy.use_fallback and d.state == "depreferred" and d.policy.code == "fallback"
    assert set(d.table.backends) == {"10.0.9.1", "10.0.9.2"}
    assert {b.key: b.data_state for b in d.backends if not b.fallback}["10.0.0.3"] == "drain"
    assert "fallback pool (2 backend(s))" in d.reason

    # Hysteresis: 2 of 3 back is not enough to leave the fallback (min_healthy_to_announce 3).
    prev = decide(Inputs({"web": v}, health(v, {"10.0.0.1"})), tables, prev)
    assert prev.vips["web"].policy.use_fallback
    prev = decide(Inputs({"web": v}, health(v, set())), tables, prev)
    d = prev.vips["web"]
    assert not d.policy.use_fallback and d.state == "announced"
    assert set(d.table.backends) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def test_fallback_table_is_the_same_on_every_node():
    v = vip()
    down = {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    a = decide(Inputs({"web": v}, health(v, down)), TableCache()).vips["web"]
    b = decide(Inputs({"web": vip()}, health(v, down)), TableCache()).vips["web"]
    assert a.policy.use_fallback and a.table.digest() == b.table.digest()


def test_a_dead_fallback_pool_leaves_the_primary_table_and_the_policy_decides():
    v = vip()
    d = decide(Inputs({"web": v}, health(v, {"10.0.0.1", "10.0.0.2", "10.0.9.1", "10.0.9.2"})),
               TableCache()).vips["web"]
    assert not d.policy.use_fallback and d.state == "withdrawn"
    assert set(d.table.backends) == {"10.0.0.3"}


def test_a_hold_down_end_is_announced_as_a_wakeup_of_the_desired_state():
    v = vip(fallback_backends=[], announce={"min_healthy": 2})
    params = DampingParams(hold_down=5, hold_down_max=20, threshold=2, window=60)
    prev = None
    for t, down in ((0, set()), (1, {"10.0.0.1", "10.0.0.2"}), (2, set()), (3, {"10.0.0.1", "10.0.0.2"})):
        prev = decide(Inputs({"web": v}, health(v, down), now=t, damping=params), TableCache(), prev)
    prev = decide(Inputs({"web": v}, health(v, set()), now=3.5, damping=params), TableCache(), prev)
    assert prev.vips["web"].state == "depreferred"
    assert prev.wakeups() == {"web": pytest.approx(8.0)}


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("announce, field, words", [
    ({"min_healthy": 3, "min_healthy_to_announce": 2}, "announce", "must be at least min_healthy"),
    ({"on_unhealthy": "drop"}, "announce.on_unhealthy", "withdraw"),
    ({"med": 500, "deprefer": {"med": 100}}, "announce", "must be above med"),
    ({"deprefer": {"prepend": 99}}, "announce.deprefer.prepend", "16"),
    ({"deprefer": {"communities": ["65000:x"]}}, "announce.deprefer.communities", "ASN:VALUE"),
    ({"deprefer": {"metric": 5}}, "announce.deprefer.metric", "unknown key"),
])
def test_bad_announce_policy_is_refused_naming_file_vip_and_field(announce, field, words):
    data = {"name": "web", "address": "10.77.100.1", "port": 80, "announce": announce}
    with pytest.raises(ConfigError) as err:
        parse_vip_object(data, "vips.d/web.yaml")
    (problem,) = err.value.problems
    assert problem.file == "vips.d/web.yaml" and problem.vip == "web"
    assert problem.field == field and words in problem.message


def test_a_fallback_backend_that_is_also_primary_is_refused():
    data = {"name": "web", "address": "10.77.100.1", "port": 80, "backends": [{"address": "10.0.0.1"}],
            "fallback_backends": [{"address": "10.0.0.1"}]}
    with pytest.raises(ConfigError) as err:
        parse_vip_object(data, "vips.d/web.yaml")
    assert "fallback_backends[0] 10.0.0.1 is listed twice" in str(err.value)


def test_a_vip_whose_own_self_test_failed_is_withdrawn_alone():
    d = decide_announce(policy(), PoolCounts(3), NODE, None, 0.0, DAMP, fault="verdict XDP_PASS")
    assert d.state == "withdrawn" and d.code == "forwarder"
    assert d.reason == "forwarder self-test of this VIP failed: verdict XDP_PASS"
