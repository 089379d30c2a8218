"""Second chance in the real XDP program (bpf/second_chance.h) against the model: after a table
change, a packet steered by a moved entry carries its previous owner in a GRE key (IPv4 outer,
28 bytes of overhead) and is not tracked; SYNs, unchanged entries, conntrack hits, VIPs without
second chance, a previous owner out of service and a closed window all go as before."""

from __future__ import annotations

import struct
import time
from ipaddress import ip_address

import pytest

from node.forwarder import model as M
from node.forwarder import packets as P
from node.forwarder.loader import BackendSpec, Forwarder, VipSpec
from node.forwarder.testing import temp_forwarder

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIP4, CLIENT4 = "10.1.1.1", "192.0.2.7"
ADDR = {k: f"10.2.0.{i}" for i, k in enumerate("abcde", 1)}
SIZE = 13
BEFORE = [k for k, _ in zip("abcd" * 4, range(SIZE))]
AFTER = ["e" if i % 4 == 0 else k for i, k in enumerate(BEFORE)]  # entries 0, 4, 8, 12 move to e


def spec(table, keys="abcd", window=60.0, states=None) -> VipSpec:
    states = states or {}
    backends = tuple(BackendSpec(k, ip_address(ADDR[k]), states.get(k, "active")) for k in keys)
    return VipSpec("web4", ip_address(VIP4), "tcp", 80, backends, table, second_chance_window=window)


@pytest.fixture(params=["lru", "direct"])
def fwd(request):
    with temp_forwarder(conntrack=request.param) as f:
        f.sync([spec(BEFORE)])
        yield f


def flow_at(fwd, entry: int) -> int:
    """A source port whose flow hashes to table entry ``entry``."""
    for sport in range(20000, 40000):
        h = M.flow_hash(M.Flow.of(CLIENT4, VIP4, sport, 80, "tcp"))
        if M.table_index(h, SIZE) == entry:
            return sport
    raise AssertionError(entry)


def ack(sport: int, **kw) -> bytes:
    return P.flow_packet(CLIENT4, VIP4, sport, 80, tcp_flags=0x10, **kw)


def gre_key(out: bytes) -> bytes | None:
    """The GRE key of an IPv4-outer frame, or None without one."""
    flags = struct.unpack("!H", out[34:36])[0]
    return out[38:42] if flags & 0x2000 else None


def same_as_model(fwd, frame: bytes) -> bytes:
    st = fwd.model_state(with_conntrack=True)
    expect = M.process(st, frame, now_ns=time.monotonic_ns())
    verdict, out = fwd.test_run(frame)
    assert (verdict, out) == (expect.verdict, expect.data)
    return out


def test_moved_entry_names_its_previous_owner_and_is_not_tracked(fwd) -> None:
    fwd.sync([spec(AFTER, keys="abcde")])
    sport = flow_at(fwd, 4)  # BEFORE[4] = a, AFTER[4] = e
    frame = ack(sport, payload=b"mid-flow")
    out = same_as_model(fwd, frame)
    assert str(ip_address(out[30:34])) == ADDR["e"]
    assert gre_key(out) == ip_address(ADDR["a"]).packed
    assert struct.unpack("!H", out[16:18])[0] == len(frame) - 14 + 28
    assert M.checksum(out[14:34]) == 0
    assert out[42:] == frame[14:], "the inner packet is intact after the 8-byte GRE header"
    assert fwd.conntrack_count() == 0, "a hinted packet must not be tracked (the next needs the hint)"
    c = fwd.counters()
    assert c["events"]["second_chance_hinted"] == 1
    assert c["vips"]["web4"]["new_flows"] == 0


def test_syn_unchanged_entry_and_conntrack_hit_carry_no_key(fwd) -> None:
    tracked = flow_at(fwd, 8)
    fwd.test_run(P.flow_packet(CLIENT4, VIP4, tracked, 80))  # SYN before the change: on d
    fwd.sync([spec(AFTER, keys="abcde")])
    syn = P.flow_packet(CLIENT4, VIP4, flow_at(fwd, 0), 80)
    out = same_as_model(fwd, syn)
    assert gre_key(out) is None and str(ip_address(out[30:34])) == ADDR["e"]  # a new flow is e's
    unchanged = same_as_model(fwd, ack(flow_at(fwd, 1)))
    assert gre_key(unchanged) is None and str(ip_address(unchanged[30:34])) == ADDR["b"]
    hit = same_as_model(fwd, ack(tracked))
    assert gre_key(hit) is None and str(ip_address(hit[30:34])) == ADDR["a"]  # BEFORE[8] = a
    assert fwd.counters()["events"].get("second_chance_hinted", 0) == 0


def test_without_second_chance_a_moved_entry_carries_no_key(fwd) -> None:
    fwd.sync([spec(AFTER, keys="abcde", window=0.0)])
    out = same_as_model(fwd, ack(flow_at(fwd, 4)))
    assert gre_key(out) is None
    assert fwd.conntrack_count() == 1


def test_previous_owner_out_of_service_is_not_named(fwd) -> None:
    fwd.sync([spec(AFTER, keys="abcde")])
    # a goes down: its entries move again, and no entry may name it any more
    after = [("e" if k == "a" else k) for k in AFTER]
    fwd.sync([spec(after, keys="abcde", states={"a": "down"})])
    out = same_as_model(fwd, ack(flow_at(fwd, 4)))
    assert gre_key(out) is None


def test_a_second_change_in_the_window_keeps_the_first_previous_owner(fwd) -> None:
    fwd.sync([spec(AFTER, keys="abcde")])
    later = [("c" if i == 1 else k) for i, k in enumerate(AFTER)]  # entry 1 moves b -> c
    fwd.sync([spec(later, keys="abcde")])
    assert gre_key(same_as_model(fwd, ack(flow_at(fwd, 4)))) == ip_address(ADDR["a"]).packed
    assert gre_key(same_as_model(fwd, ack(flow_at(fwd, 1)))) == ip_address(ADDR["b"]).packed


def test_closed_window_names_nobody_and_gives_the_room_back(fwd) -> None:
    fwd.sync([spec(AFTER, keys="abcde", window=1.0)])
    used = fwd.space.in_use()
    time.sleep(1.1)  # the window is data: the program compares bpf_ktime_get_ns with it
    out = same_as_model(fwd, ack(flow_at(fwd, 4)))
    assert gre_key(out) is None
    assert fwd.expire_second_chance() == 1
    assert fwd.space.in_use() == used - SIZE


def test_hinted_packet_too_big_for_the_key_gets_frag_needed_with_the_keyed_budget(fwd) -> None:
    fwd.sync([spec(AFTER, keys="abcde")])
    mtu = fwd.config.mtu
    frame = ack(flow_at(fwd, 4), size=14 + mtu - 26)  # fits with 24 bytes, not with 28
    out = same_as_model(fwd, frame)
    assert out[23] == 1 and out[34] == 3 and out[35] == 4  # ICMP frag-needed to the client
    assert struct.unpack("!H", out[40:42])[0] == mtu - 28


def test_a_restarted_controller_keeps_the_previous_owners(fwd) -> None:
    fwd.sync([spec(AFTER, keys="abcde")])
    frame = ack(flow_at(fwd, 4))
    before = fwd.test_run(frame)
    again = Forwarder(fwd.config, table_capacity=fwd.table_capacity)
    again.open()
    try:
        assert again.model_state().prev_tables == fwd.model_state().prev_tables
        assert again.space.in_use() == fwd.space.in_use()
        assert again.test_run(frame) == before
    finally:
        again.close()


def test_self_test_packets_are_never_hinted(fwd) -> None:
    """Their expected output must not depend on which side of the deadline the check ran."""
    fwd.sync([spec(AFTER, keys="abcde")])
    frame = ack(flow_at(fwd, 4))
    verdict, out = fwd.test_run(frame, selftest=True)
    assert verdict == M.XDP_TX and gre_key(out) is None
    assert out == M.process(fwd.model_state(), frame, now_ns=time.monotonic_ns(), selftest=True).data
    assert fwd.self_test().ok
