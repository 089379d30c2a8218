"""The "lru" conntrack map's capacity as the README states it, on the real kernel map: one LRU
shared by the CPUs, so flows that all arrive on one CPU can use the whole map (with per-CPU LRU
lists each CPU would hold only conntrack_size / CPUs of them), and a full map evicts instead of
refusing new flows. IPv4 flows have a map of their own (conntrack_v4), also after an upgrade
from pins that kept them with the IPv6 flows. Also: address pre-filter and fragment keys follow the VIPs through syncs
and a restart."""

from __future__ import annotations

import os
from ipaddress import ip_address

import pytest

from node.forwarder import libbpf, maps, packets
from node.forwarder import model as M
from node.forwarder.loader import BackendSpec, Forwarder, VipSpec, read_filter, read_only, write_filter, write_only
from node.forwarder.testing import make_config, temp_bpffs, temp_forwarder

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIP = "10.1.1.1"
SIZE = 16384
# the kernel's common LRU hands each CPU free entries 128 at a time (LOCAL_FREE_TARGET in
# kernel/bpf/bpf_lru_list.c): below this many flows nothing is displaced, however the flows
# spread over the CPUs (the README's guarantee)
GUARANTEED = SIZE - 128 * libbpf.num_possible_cpus()


def _vip(port: int = 80, name: str = "web", address: str = VIP, proto: str = "tcp") -> VipSpec:
    b = BackendSpec("a", ip_address("10.2.0.1"), "active")
    return VipSpec(name, ip_address(address), proto, port, (b,), ["a"] * 13)


def _send_syns(fwd, count: int, first: int = 0) -> None:
    """count distinct SYNs to the VIP, from this process's (single) CPU."""
    runner = libbpf.TestRun(fwd.prog_fd, 512)
    runner.set_packet(packets.flow_packet("198.18.0.0", VIP, 1, 80, tcp_flags=0x02, size=60))
    for f in range(first, first + count):
        runner.inp[28], runner.inp[29] = (f >> 24) & 0xFF, (f >> 16) & 0xFF
        runner.inp[34], runner.inp[35] = (f >> 8) & 0xFF, f & 0xFF
        runner.run_raw()
        assert runner.opts.retval == M.XDP_TX


@pytest.fixture
def one_cpu():
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield
    os.sched_setaffinity(0, before)


def test_flows_arriving_on_one_cpu_can_fill_the_shared_lru(one_cpu) -> None:
    with temp_forwarder(conntrack="lru", conntrack_size=SIZE) as fwd:
        fwd.sync([_vip()])
        assert fwd.ct_entries == SIZE
        for name in ("conntrack", maps.CT_V4):
            info = libbpf.map_info(fwd.fds[name])
            assert info.max_entries == SIZE and not info.map_flags & maps.BPF_F_NO_COMMON_LRU
        _send_syns(fwd, GUARANTEED)
        assert fwd.conntrack_count() == GUARANTEED, "a tracked flow was displaced below capacity"
        # past capacity the least recently used go, new flows are still tracked
        _send_syns(fwd, SIZE, first=GUARANTEED)
        assert GUARANTEED <= fwd.conntrack_count() <= SIZE
        last = GUARANTEED + SIZE - 1
        flow = M.Flow.of(f"198.18.{(last >> 24) & 0xFF}.{(last >> 16) & 0xFF}", VIP, last & 0xFFFF, 80, "tcp")
        assert flow in fwd.model_state(with_conntrack=True).ct


def test_address_filter_and_fragment_keys_follow_syncs_and_a_restart() -> None:
    with temp_bpffs() as root:
        cfg = make_config(root / "maglev")
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            def words():
                return read_filter(fwd.fds["vip_addrs"])

            def addrs(*a):
                return maps.vip_filter_words(maps.addr_bytes(x) for x in a)

            fwd.sync([_vip(), _vip(53, "dns", proto="udp"), _vip(443, "v6", "2001:db8::1")])
            assert words() == addrs(VIP, "2001:db8::1")
            st = fwd.model_state()
            v4 = maps.addr_bytes(VIP)[1]
            assert st.frag_vips == {(4, v4, 6): fwd.vip_ids["web"], (4, v4, 17): fwd.vip_ids["dns"],
                                    (6, maps.addr_bytes("2001:db8::1")[1], 6): fwd.vip_ids["v6"]}
            # a second TCP port VIP on the address: no TCP fragment key any more
            fwd.sync([_vip(), _vip(53, "dns", proto="udp"), _vip(8080, "alt")])
            assert words() == addrs(VIP)
            assert fwd.model_state().frag_vips == {(4, v4, 17): fwd.vip_ids["dns"]}
            # the VIP traffic is steered only while its address bit is set
            frame = packets.flow_packet("192.0.2.1", VIP, 4000, 80)
            assert fwd.test_run(frame)[0] == M.XDP_TX
            i = maps.vip_filter_bit(4, v4)
            cleared = words()
            cleared[i // 64] = 0
            write_filter(fwd.fds["vip_addrs"], cleared)
            assert fwd.test_run(frame) == (M.XDP_PASS, frame)
            fwd.close()
            # a restarted loader rebuilds the filter from the pinned VIPs before anything else
            fwd = Forwarder(cfg, table_capacity=1 << 16)
            fwd.open()
            assert words() == addrs(VIP)
            assert fwd.test_run(frame)[0] == M.XDP_TX
            fwd.sync([])
            assert words() == [0] * maps.VIP_FILTER_WORDS and fwd.model_state().frag_vips == {}
        finally:
            fwd.close()
            fwd.remove_pins()



def test_vip_only_names_an_address_s_only_vip_and_a_wrong_entry_changes_no_packet() -> None:
    """vip_only (maglev.h) saves a new flow's vips lookup where one VIP has the address; an
    entry naming another VIP (stale, or another address) falls back to the lookup, so every
    packet goes where the vips map says, bytes for bytes."""
    def one(name, address, port, backend, proto="tcp"):
        b = BackendSpec(backend, ip_address("10.2.0." + backend), "active")
        return VipSpec(name, ip_address(address), proto, port, (b,), [backend] * 13)

    vips = [one("web", VIP, 80, "1"), one("dns", VIP, 53, "2", "udp"), one("solo", "10.1.1.9", 80, "3"),
            one("v6", "2001:db8::1", "all", "4")]
    with temp_bpffs() as root:
        cfg = make_config(root / "maglev")
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            fwd.sync(vips)
            ids = fwd.vip_ids
            only = read_only(fwd.fds["vip_only"])
            index = {a: maps.vip_filter_bit(*maps.addr_bytes(a)) for a in (VIP, "10.1.1.9", "2001:db8::1")}
            assert only[index[VIP]] == 0  # two VIPs on the address
            assert only[index["10.1.1.9"]] == ids["solo"] + 1 and only[index["2001:db8::1"]] == ids["v6"] + 1
            assert sum(1 for e in only if e) == 2
            frames = [packets.flow_packet("192.0.2.1", VIP, 4000, 80, tcp_flags=0x02),
                      packets.flow_packet("192.0.2.1", VIP, 4000, 53, proto="udp"),
                      packets.flow_packet("192.0.2.1", "10.1.1.9", 4001, 80, tcp_flags=0x02),
                      packets.flow_packet("192.0.2.1", "10.1.1.9", 4001, 81, tcp_flags=0x02),
                      packets.flow_packet("2001:db8::9", "2001:db8::1", 4002, 8443, tcp_flags=0x02)]
            expected = [fwd.test_run(f, selftest=True) for f in frames]  # no inserts: all via the table
            assert [v for v, _ in expected] == [M.XDP_TX, M.XDP_TX, M.XDP_TX, M.XDP_PASS, M.XDP_TX]
            # every index names a VIP of another address, or a VIP on the address that does not
            # own the flow (dns for TCP to VIP:80): the packets still go where vips says
            wrong = list(only)
            wrong[index[VIP]] = ids["dns"] + 1
            wrong[index["10.1.1.9"]] = ids["v6"] + 1
            wrong[index["2001:db8::1"]] = ids["solo"] + 1
            write_only(fwd.fds["vip_only"], wrong)
            assert [fwd.test_run(f, selftest=True) for f in frames] == expected
            fwd.close()
            # an older version's pins have no vip_only: made and written at open
            (root / "maglev" / "vip_only").unlink()
            fwd = Forwarder(cfg, table_capacity=1 << 16)
            fwd.open()
            assert read_only(fwd.fds["vip_only"]) == only
            assert [fwd.test_run(f, selftest=True) for f in frames] == expected
            fwd.sync(vips[:1])  # solo and v6 gone, web alone on its address
            assert read_only(fwd.fds["vip_only"]) == [0] * index[VIP] + [ids["web"] + 1] + \
                [0] * (maps.VIP_ONLY_ENTRIES - index[VIP] - 1)
        finally:
            fwd.close()
            fwd.remove_pins()


def _two_backend_vip(address: str) -> VipSpec:
    a = BackendSpec("a", ip_address("10.2.0.1"), "active")
    b = BackendSpec("b", ip_address("10.2.0.2"), "active")
    return VipSpec(f"web{address}", ip_address(address), "tcp", 80, (a, b), ["a"] * 13)


def test_ipv4_flows_have_their_own_map_and_move_there_from_older_pins() -> None:
    v6 = "fd00:1::1"
    with temp_bpffs() as root:
        cfg = make_config(root / "maglev")
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            fwd.sync([_two_backend_vip(VIP), _two_backend_vip(v6)])
            run = libbpf.TestRun(fwd.prog_fd, 512).run
            assert run(packets.flow_packet("192.0.2.7", VIP, 4000, 80, tcp_flags=0x02))[0] == M.XDP_TX
            assert run(packets.flow_packet("2001:db8::7", v6, 4000, 80, tcp_flags=0x02))[0] == M.XDP_TX
            v4_keys = libbpf.keys(fwd.fds[maps.CT_V4], maps.FlowKeyV4)
            v6_keys = libbpf.keys(fwd.fds["conntrack"], maps.FlowKey)
            assert [(k.family, bytes(k.src)) for k in v4_keys] == [(maps.FAM_V4, bytes([192, 0, 2, 7]))]
            assert [k.family for k in v6_keys] == [maps.FAM_V6]
            assert fwd.conntrack_count() == 2
            # what an older version left: the IPv4 flow in `conntrack` (40-byte key), here on
            # backend b, which the table (all a) would not pick, and no conntrack_v4 pin
            val = maps.CtValue()
            assert libbpf.lookup(fwd.fds[maps.CT_V4], v4_keys[0], val)
            val.backend_id = fwd.backend_ids[(f"web{VIP}", "b")]
            libbpf.update(fwd.fds["conntrack"], v4_keys[0].full(), val)
        finally:
            fwd.close()
        (root / "maglev" / maps.CT_V4).unlink()
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            assert [k.family for k in libbpf.keys(fwd.fds["conntrack"], maps.FlowKey)] == [maps.FAM_V6]
            assert fwd.conntrack_count() == 2
            verdict, out = libbpf.TestRun(fwd.prog_fd, 512).run(
                packets.flow_packet("192.0.2.7", VIP, 4000, 80, tcp_flags=0x10))
            assert verdict == M.XDP_TX
            assert out[14 + 16:14 + 20] == bytes([10, 2, 0, 2]), "the moved flow lost its backend"
        finally:
            fwd.close()
            fwd.remove_pins()
