"""The previous-owner rule (node/forwarder/second_chance.py) and its configuration."""

from __future__ import annotations

from array import array

import pytest
from pydantic import ValidationError

from node.config import VipConfig
from node.forwarder.second_chance import previous_owners


def test_changed_entries_name_their_old_owner_unchanged_name_none() -> None:
    assert previous_owners([1, 2, 3, 1], [1, 5, 3, 5], None).tolist() == [0, 2, 0, 1]


def test_a_second_change_in_the_window_keeps_what_the_first_moved() -> None:
    first = previous_owners([1, 2, 3], [5, 2, 3], None)
    assert previous_owners([5, 2, 3], [5, 2, 6], first).tolist() == [1, 0, 3]


def test_an_entry_moved_back_to_its_previous_owner_names_the_one_it_leaves() -> None:
    first = previous_owners([1, 2], [5, 2], None)
    assert previous_owners([5, 2], [1, 2], first).tolist() == [5, 0]


def test_an_unchanged_entry_whose_carried_owner_is_itself_names_none() -> None:
    assert previous_owners([5, 2], [5, 2], array("I", [5, 0])).tolist() == [0, 0]


def test_tables_of_different_sizes_share_no_entries() -> None:
    assert previous_owners([1, 2, 3], [1, 2, 3, 4, 5], None).tolist() == [0] * 5


def test_the_same_changes_give_the_same_owners_every_time() -> None:
    """Determinism: two nodes applying the same sequence of tables agree."""
    seq = [[1, 2, 3, 4] * 3, [1, 5, 3, 4] * 3, [1, 5, 3, 6] * 3]

    def replay():
        carried = None
        for old, new in zip(seq, seq[1:]):
            carried = previous_owners(old, new, carried)
        return carried.tolist()
    assert replay() == replay() == [0, 2, 0, 4] * 3


def vip(**kw) -> dict:
    return dict(name="web", address="10.0.0.1", port=80, **kw)


def test_config_accepts_a_window_in_seconds() -> None:
    assert VipConfig(**vip(second_chance={"window": 120})).second_chance.window == 120


@pytest.mark.parametrize("window", [0, -1, 0.5, 86401])
def test_config_refuses_a_window_out_of_range(window) -> None:
    with pytest.raises(ValidationError, match="window"):
        VipConfig(**vip(second_chance={"window": window}))


def test_config_refuses_second_chance_on_an_ipv6_vip() -> None:
    with pytest.raises(ValidationError, match="IPv4"):
        VipConfig(name="web6", address="2001:db8::1", port=80, second_chance={"window": 60})


def test_config_refuses_unknown_second_chance_keys() -> None:
    with pytest.raises(ValidationError, match="extra"):
        VipConfig(**vip(second_chance={"window": 60, "forever": True}))


def test_backend_metrics_name_every_decap_outcome() -> None:
    from node.forwarder import tc
    from node.forwarder.backend import decap_metrics

    st = tc.DecapStatus(7, [], {"sc_redirected": (3, 300), "decap_v4": (10, 1000)})
    text = decap_metrics("eth0", st)
    assert 'maglev_decap_packets_total{interface="eth0",outcome="sc_redirected"} 3' in text
    assert 'maglev_decap_bytes_total{interface="eth0",outcome="decap_v4"} 1000' in text
    assert 'maglev_decap_packets_total{interface="eth0",outcome="sc_dropped"} 0' in text
    assert 'maglev_decap_attached{interface="eth0"} 1' in text
    assert text.count("outcome=") == 2 * len(tc.DECAP_COUNTERS)
