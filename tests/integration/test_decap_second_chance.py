"""Second chance on the backend (bpf/sc_decap.h): every branch of the keyed-GRE decision, with
real sockets in a namespace of our own and the real program (BPF_PROG_TEST_RUN runs the
program in the calling thread's namespace, where bpf_skc_lookup_tcp / bpf_sk_lookup_udp look).

A keyed packet is kept (decapsulated) when it is a SYN or a local socket owns its flow,
re-encapsulated to the previous owner named in the key otherwise; once spent (key 0), it is
kept with a socket and dropped without one. Each packet moves exactly one counter."""

from __future__ import annotations

import socket
import struct

import pytest

from lab.netns import Netns, cleanup_prefix, unique_prefix
from lab.nssocket import in_netns
from node.forwarder.model import checksum
from node.forwarder.tc import TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, DecapProgram, build_decap_object
from tests.integration.test_decap import (
    BACKEND4, CLIENT4, CLIENT6, ETH_IP, ETH_IP6, GRE, NODE4, TCP, UDP, VIP4, VIP6, eth, gre, ipv4, ipv6,
)

pytestmark = [pytest.mark.root, pytest.mark.integration]

PREV4 = "10.1.0.3"  # the entry's previous owner, named in the key
KEY_SPENT = b"\0\0\0\0"
SPORT, DPORT = 40001, 80


def tcp(flags: int, sport: int = SPORT, dport: int = DPORT) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 7, 9, 0x50, flags, 65535, 0, 0) + b"data"


ACK, SYN = 0x10, 0x02


def keyed(inner: bytes, key: bytes, proto: int = ETH_IP, dst: str = BACKEND4) -> bytes:
    return eth(ETH_IP) + ipv4(NODE4, dst, GRE, gre(proto, inner, 0x2000, key))


def tcp4(flags: int, sport: int = SPORT) -> bytes:
    return ipv4(CLIENT4, str(VIP4), TCP, tcp(flags, sport))


@pytest.fixture(scope="module")
def ns():
    prefix = unique_prefix("k17")
    n = Netns.create(f"{prefix}-sc")
    try:
        for cidr in (f"{VIP4}/32", f"{CLIENT4}/32", f"{VIP6}/128", f"{CLIENT6}/128"):
            n.add_address("lo", cidr)
        yield n
    finally:
        cleanup_prefix(prefix)


@pytest.fixture(scope="module")
def prog():
    with DecapProgram.load(build_decap_object()) as p:
        p.set_vips([VIP4, VIP6])
        yield p


@pytest.fixture(scope="module")
def sockets(ns):
    """A listener on VIP:80 (v4, v6), one established connection from CLIENT:SPORT to each, and
    a UDP socket bound to VIP:53. Closed at the end."""
    made = []
    with in_netns(ns.name):
        for fam, vip, client in ((socket.AF_INET, str(VIP4), CLIENT4), (socket.AF_INET6, str(VIP6), CLIENT6)):
            lst = socket.socket(fam, socket.SOCK_STREAM)
            lst.bind((vip, DPORT))
            lst.listen()
            cli = socket.socket(fam, socket.SOCK_STREAM)
            cli.bind((client, SPORT))
            cli.connect((vip, DPORT))
            srv, _ = lst.accept()
            made += [lst, cli, srv]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((str(VIP4), 53))
        made.append(udp)
    yield made
    for s in made:
        s.close()


def run(prog, ns, frame):
    before = prog.counters()
    with in_netns(ns.name):
        verdict, out = prog.test_run(frame)
    after = prog.counters()
    return verdict, out, {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}


def assert_kept(prog, ns, frame, inner, counter, proto=ETH_IP):
    verdict, out, moved = run(prog, ns, frame)
    assert (verdict, moved) == (TC_ACT_OK, {counter: 1})
    assert out == eth(proto) + inner, "kept: the Ethernet header + the inner packet, byte for byte"


def test_syn_stays_with_the_new_owner(prog, ns, sockets):
    inner = tcp4(SYN, sport=45000)  # no socket for this flow: a SYN needs none
    assert_kept(prog, ns, keyed(inner, socket.inet_aton(PREV4)), inner, "sc_local")


def test_flow_owned_by_a_local_socket_stays(prog, ns, sockets):
    inner = tcp4(ACK)
    assert_kept(prog, ns, keyed(inner, socket.inet_aton(PREV4)), inner, "sc_local")


def test_ipv6_inner_flow_owned_here_stays(prog, ns, sockets):
    inner = ipv6(CLIENT6, str(VIP6), TCP, tcp(ACK))
    assert_kept(prog, ns, keyed(inner, socket.inet_aton(PREV4), ETH_IP6), inner, "sc_local", ETH_IP6)


def test_key_naming_this_backend_stays(prog, ns, sockets):
    inner = tcp4(ACK, sport=45001)
    assert_kept(prog, ns, keyed(inner, socket.inet_aton(BACKEND4)), inner, "sc_local")


def test_unknown_flow_goes_to_the_previous_owner_with_the_key_spent(prog, ns, sockets):
    """Only the listener matches (not a connection): re-encapsulated from this backend to the
    previous owner, inner packet intact, key spent, outer checksum valid."""
    inner = tcp4(ACK, sport=45002)
    frame = keyed(inner, socket.inet_aton(PREV4))
    verdict, out, moved = run(prog, ns, frame)
    assert (verdict, moved) == (TC_ACT_REDIRECT, {"sc_redirected": 1})
    want_ip = ipv4(BACKEND4, PREV4, GRE, gre(ETH_IP, inner, 0x2000, KEY_SPENT))
    got_ip = out[14:]
    assert checksum(got_ip[:20]) == 0, "outer IPv4 checksum must be valid"
    # id/tos/ttl are kept from the received header (ipv4() writes the same ones)
    assert got_ip == want_ip
    assert len(out) == len(frame), "same size: the MTU budget of the first hop holds"


def test_unknown_udp_flow_goes_to_the_previous_owner(prog, ns, sockets):
    inner = ipv4(CLIENT4, str(VIP4), UDP, struct.pack("!HHHH", 5000, 54, 12, 0) + b"dnsq")
    verdict, out, moved = run(prog, ns, keyed(inner, socket.inet_aton(PREV4)))
    assert (verdict, moved) == (TC_ACT_REDIRECT, {"sc_redirected": 1})


def test_udp_flow_with_a_local_socket_stays(prog, ns, sockets):
    inner = ipv4(CLIENT4, str(VIP4), UDP, struct.pack("!HHHH", 5000, 53, 12, 0) + b"dnsq")
    assert_kept(prog, ns, keyed(inner, socket.inet_aton(PREV4)), inner, "sc_local")


def test_spent_second_chance_with_a_socket_is_accepted(prog, ns, sockets):
    inner = tcp4(ACK)
    assert_kept(prog, ns, keyed(inner, KEY_SPENT, dst=BACKEND4), inner, "sc_accepted")


def test_spent_second_chance_without_a_socket_is_dropped_never_sent_on(prog, ns, sockets):
    frame = keyed(tcp4(ACK, sport=45003), KEY_SPENT)
    verdict, _, moved = run(prog, ns, frame)
    assert (verdict, moved) == (TC_ACT_SHOT, {"sc_dropped": 1})


def test_keyed_gre_to_a_non_vip_passes_untouched(prog, ns, sockets):
    frame = keyed(ipv4(CLIENT4, "198.51.100.99", TCP, tcp(ACK)), socket.inet_aton(PREV4))
    verdict, out, moved = run(prog, ns, frame)
    assert (verdict, out, moved) == (TC_ACT_OK, frame, {"pass_not_vip": 1})


def test_keyed_gre_cut_before_the_key_is_truncated(prog, ns, sockets):
    frame = keyed(tcp4(ACK), socket.inet_aton(PREV4))[:14 + 20 + 6]
    verdict, out, moved = run(prog, ns, frame)
    assert (verdict, out, moved) == (TC_ACT_OK, frame, {"pass_truncated": 1})
