"""The demo's per-node "fwd" column across a node restart (it showed the node's whole
cumulative count as one interval's packets when the node came back)."""

from lab.demo import counter_delta


def test_delta_runs_on_across_a_restart_with_pinned_maps():
    readings = [100, None, None, 130]  # the node crashed, then came back with its maps
    last = None
    deltas = []
    for now in readings:
        deltas.append(counter_delta(now, last))
        last = now if now is not None else last
    assert deltas == [None, None, None, 30]


def test_recreated_maps_count_from_zero():
    assert counter_delta(12, 5000) == 12
    assert counter_delta(None, 5) is None and counter_delta(5, None) is None
