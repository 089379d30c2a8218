"""The backend setup's pure parts: which sysctls, which devices, which commands, in which order."""

from __future__ import annotations

import re
from ipaddress import ip_address

from node.forwarder import backend as B
from node.forwarder.tc import BPF_DIR, DECAP_COUNTERS, DecapVipKey

V4, V6 = ip_address("198.51.100.10"), ip_address("2001:db8::10")


def test_dsr_sysctls_set_arp_on_all_and_the_interface_and_loose_rp_filter_on_receivers():
    assert B.dsr_sysctls("eth0", ["gre-mlb"]) == [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.conf.eth0.arp_ignore", "1"),
        ("net.ipv4.conf.eth0.arp_announce", "2"),
        ("net.ipv4.conf.eth0.rp_filter", "2"),
        ("net.ipv4.conf.gre-mlb.rp_filter", "2"),
    ]


def test_one_gre_device_per_outer_family():
    assert B.gre_devices_for([V4]) == [("gre-mlb", "gre")]
    assert B.gre_devices_for([V6]) == [("gre6-mlb", "ip6gre")]
    assert B.gre_devices_for([V6, V4]) == [("gre-mlb", "gre"), ("gre6-mlb", "ip6gre")]


def test_kernel_commands_create_devices_before_sysctls_before_vips():
    cmds = [" ".join(c) for c in B.kernel_gre_commands("eth0", [V4, V6])]
    assert cmds[0] == "ip link add gre-mlb type gre external"
    assert cmds.index("sysctl -w net.ipv4.conf.all.arp_ignore=1") > cmds.index("ip link set gre6-mlb up")
    assert cmds[-2:] == ["ip addr replace 198.51.100.10/32 dev lo", "ip addr replace 2001:db8::10/128 dev lo"]


def test_dotted_interface_names_use_the_slash_form_for_sysctl():
    cmds = [" ".join(c) for c in B.kernel_gre_commands("eth0.100", [V4])]
    assert "sysctl -w net/ipv4/conf/eth0.100/rp_filter=2" in cmds
    assert B._split_key("net.ipv4.conf.eth0.100.arp_ignore") == ("ipv4", "conf", "eth0.100", "arp_ignore")


def test_vip_key_layout_matches_the_header():
    key = DecapVipKey.of(V4)
    assert bytes(key) == b"\x04\0\0\0" + V4.packed + bytes(12)
    assert DecapVipKey.of(V6).address() == V6 and key.address() == V4


def test_counter_names_follow_the_enum_in_the_header():
    text = (BPF_DIR / "maglev.h").read_text()
    enum = re.findall(r"^\s*DECAP_([A-Z0-9_]+) = (\d+),", text, re.M)
    names = [n.lower().replace("ok_", "decap_") for n, _ in enum if n != "COUNTER_MAX"]
    assert [int(v) for _, v in enum] == list(range(len(enum)))
    assert tuple(names) == DECAP_COUNTERS
