"""The health state machine, driven with exact result sequences and a fake clock."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import TypeAdapter

from healthcheck import ProbeResult, State, StateMachine, Target
from node.config import HealthCheck

_checks = TypeAdapter(HealthCheck)


def make_target(**check: object) -> Target:
    data = {"type": "tcp", **check}
    return Target(ipaddress.ip_address("10.0.0.1"), 80, _checks.validate_python(data))


class Driver:
    """Feeds results at a fake time that advances one interval per probe."""

    def __init__(self, **check: object) -> None:
        self.now = 1000.0
        self.machine = StateMachine(make_target(**check), self.now)
        self.transitions = []

    def feed(self, pattern: str, step: float = 1.0):
        """pattern: 'o' success, 'x' failure. Returns transitions in order."""
        out = []
        for ch in pattern:
            self.now += step
            reason = "ok" if ch == "o" else "connection refused"
            t = self.machine.record(ProbeResult(ch == "o", reason, 0.001, self.now))
            if t is not None:
                out.append(t)
                self.transitions.append(t)
        return out


def test_unknown_to_up_after_exactly_rise_successes():
    d = Driver(rise=3, fall=2)
    assert d.feed("oo") == []
    assert d.machine.state is State.UNKNOWN
    [t] = d.feed("o")
    assert (t.old, t.new) == (State.UNKNOWN, State.UP)
    assert t.reason == "3 consecutive successes"
    assert len(t.results) == 3 and all(r.ok for r in t.results)
    assert not t.dampened


def test_unknown_to_down_after_exactly_fall_failures():
    d = Driver(rise=2, fall=3)
    assert d.feed("xx") == []
    [t] = d.feed("x")
    assert (t.old, t.new) == (State.UNKNOWN, State.DOWN)
    assert t.reason == "3 consecutive failures, last: connection refused"


def test_fall_counts_only_consecutive_failures():
    d = Driver(rise=1, fall=3)
    d.feed("o")
    assert d.feed("xxoxxoxx") == []  # never three in a row
    assert d.machine.state is State.UP
    [t] = d.feed("x")
    assert (t.old, t.new) == (State.UP, State.DOWN)


def test_down_to_up_needs_rise_consecutive_successes():
    d = Driver(rise=2, fall=1)
    d.feed("x")
    assert d.feed("oxoxo") == []
    [t] = d.feed("o")
    assert (t.old, t.new) == (State.DOWN, State.UP)


def test_steady_state_emits_nothing():
    d = Driver(rise=1, fall=1)
    d.feed("o")
    assert d.feed("o" * 50) == []
    d.feed("x")
    assert d.feed("x" * 50) == []
    assert d.machine.transitions == 2


def test_status_reports_since_last_and_count():
    d = Driver(rise=1, fall=1)
    d.feed("o")
    up_at = d.now
    d.feed("ooo")
    status = d.machine.status()
    assert status.state is State.UP and status.since == up_at
    assert status.last is not None and status.last.at == d.now
    assert status.transitions == 1 and status.held_until is None


def test_flapping_is_held_down_and_the_event_says_so():
    d = Driver(rise=1, fall=1, flap_threshold=3, flap_window=100, hold_down=10, hold_down_max=40)
    d.feed("o")  # UNKNOWN -> UP does not count as a flap
    flips = d.feed("xoxo")  # 4 transitions, threshold 3 not exceeded yet... until the next DOWN
    assert not any(t.dampened for t in flips)
    [t] = d.feed("x")  # 5th UP<->DOWN transition
    assert t.new is State.DOWN and t.dampened
    assert "flapping (5 transitions within 100 s): held DOWN for 10 s" in t.reason
    held_until = d.machine.held_until
    assert held_until == pytest.approx(d.now + 10)
    # Healthy probes during the hold change nothing.
    assert d.feed("o" * 9) == []
    assert d.machine.state is State.DOWN
    [up] = d.feed("o")  # now == held_until: the hold is over
    assert up.new is State.UP and "hold-down ended after 10 s" in up.reason
    assert d.machine.held_until is None


def test_hold_down_grows_with_repeated_flapping_up_to_the_max():
    d = Driver(rise=1, fall=1, flap_threshold=2, flap_window=1000, hold_down=5, hold_down_max=12)
    d.feed("o")
    d.feed("xo")  # two transitions: at the threshold, not above it
    holds = []
    for _ in range(4):
        # Each cycle: a DOWN that is held, then enough healthy probes to outlast any hold.
        holds += [t.reason.split("held DOWN for ")[1] for t in d.feed("xo" + "o" * 20) if t.dampened]
    assert holds == ["5 s", "10 s", "12 s", "12 s"]


def test_hold_down_resets_after_a_quiet_window():
    d = Driver(rise=1, fall=1, flap_threshold=2, flap_window=50, hold_down=5, hold_down_max=100)
    d.feed("o")
    [first] = [t for t in d.feed("xoxo" + "o" * 10) if t.dampened]
    assert first.reason.endswith("held DOWN for 5 s")
    d.feed("o" * 200)  # quiet for much longer than the window
    damp = [t for t in d.feed("xoxoxo" + "o" * 10) if t.dampened]
    assert damp[0].reason.endswith("held DOWN for 5 s")


def test_flaps_outside_the_window_do_not_count():
    d = Driver(rise=1, fall=1, flap_threshold=3, flap_window=5)
    d.feed("o")
    # One flip every 10 s: never more than one transition inside a 5 s window.
    for _ in range(10):
        assert not any(t.dampened for t in d.feed("x" + "o", step=10))
    assert d.machine.held_until is None


def test_going_down_is_never_delayed_by_dampening():
    d = Driver(rise=1, fall=2, flap_threshold=1, flap_window=100, hold_down=30)
    d.feed("o")
    d.feed("xxo")
    [t] = d.feed("xx")
    assert t.new is State.DOWN and t.dampened


def test_inconclusive_results_neither_extend_nor_break_a_run():
    d = Driver(rise=2, fall=2)
    d.feed("oo")
    stalled = ProbeResult(False, "timeout after 1 s, but this checker was stalled", 1.3, d.now + 1, True)
    d.feed("x")
    assert d.machine.record(stalled) is None  # would have been the second failure in a row
    assert d.machine.state is State.UP and d.machine.last == stalled
    d.feed("o")
    d.feed("x")
    assert d.machine.record(stalled) is None
    [t] = d.feed("x")  # the run of real failures continues across the stalled verdict
    assert t.new is State.DOWN and all(not r.inconclusive for r in t.results)


def test_a_long_stall_counts_as_failures():
    """Starved for more than `fall` probes in a row, the checker can no longer vouch for the
    backend: a dead backend must not stay UP because the node is overloaded."""
    d = Driver(rise=1, fall=2)
    d.feed("o")
    stalled = ProbeResult(False, "timeout after 1 s, but this checker was stalled", 1.3, d.now + 1, True)
    assert d.machine.record(stalled) is None
    assert d.machine.record(stalled) is None
    assert d.machine.state is State.UP
    assert d.machine.record(stalled) is None  # third in a row: the first that counts
    t = d.machine.record(stalled)
    assert t is not None and t.new is State.DOWN


def test_a_new_check_takes_over_the_verdict_and_its_own_runs_decide():
    d = Driver(rise=2, fall=2)
    d.feed("oo")
    assert d.machine.state is State.UP
    d.machine = StateMachine.taking_over(make_target(rise=3, fall=3, interval=5, timeout=1), d.now, d.machine)
    assert d.machine.state is State.UP and d.machine.transitions == 1
    assert d.feed("xxoxx") == []  # runs start again at zero under the new check's fall
    (down,) = d.feed("x")
    assert (down.old, down.new) == (State.UP, State.DOWN)
    assert d.feed("oo") == [] and d.feed("o")[0].new is State.UP  # the new rise (3)


def test_a_hold_down_survives_a_check_change():
    d = Driver(rise=1, fall=1, flap_threshold=2, flap_window=100, hold_down=30)
    d.feed("oxox")
    assert d.machine.held_until is not None
    held = d.machine.held_until
    d.machine = StateMachine.taking_over(make_target(rise=1, fall=1, interval=3, timeout=1), d.now, d.machine)
    assert d.machine.state is State.DOWN and d.machine.held_until == held
    assert d.feed("ooo") == []  # still held


def test_a_backend_without_a_check_hands_over_its_implicit_up():
    machine = StateMachine.taking_over(make_target(), 5.0, State.UP)
    assert machine.state is State.UP and machine.transitions == 0


def test_kept_results_leave_the_cyclic_collectors_view():
    """What a machine keeps of its results (the last one, the recent run) is plain tuples that
    the collector stops tracking after one pass: ten thousand targets' results, kept an interval
    each, would otherwise be promoted to its oldest generation and make full passes frequent.
    The machine still hands out ProbeResults."""
    import gc

    d = Driver(rise=2, fall=2)
    d.feed("oox")
    gc.collect()
    assert not gc.is_tracked(d.machine._last)
    assert not any(gc.is_tracked(r) for r in d.machine._recent)
    assert isinstance(d.machine.last, ProbeResult) and not d.machine.last.ok
    [t] = d.feed("x")
    assert all(isinstance(r, ProbeResult) for r in t.results) and len(t.results) == 2
