"""The forwarder's per-VIP and per-backend counters on the real program (maglev.h, counters):
a forwarded packet touches only its backend id's be_stats; a VIP's figures are the sums of
its backends plus what its removed backends had (vip_stats), and misses are packets minus
hits. Removing a backend must not make its VIP's figures go down, through a restart too; a
counter map or address pre-filter pinned by the older layout is replaced (the filter rebuilt
from the VIPs), the tracked flows kept."""

from __future__ import annotations

import ctypes as C
import os
from ipaddress import ip_address

import pytest

from node.forwarder import libbpf, maps, packets
from node.forwarder import model as M
from node.forwarder.loader import BackendSpec, Forwarder, VipSpec, read_filter
from node.forwarder.testing import make_config, temp_bpffs

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIP = "10.1.1.1"
A = BackendSpec("a", ip_address("10.2.0.1"), "active")
B = BackendSpec("b", ip_address("10.2.0.2"), "active")


def _vip(backends, table) -> VipSpec:
    return VipSpec("web", ip_address(VIP), "tcp", 80, tuple(backends), table)


def _send(fwd: Forwarder, port: int, flags: int) -> None:
    verdict, _ = libbpf.TestRun(fwd.prog_fd, 512).run(packets.flow_packet("192.0.2.7", VIP, port, 80, tcp_flags=flags))
    assert verdict == M.XDP_TX


def _traffic(fwd: Forwarder) -> None:
    """Two flows on the table's backend: a SYN (miss, insert) then an ACK (hit) each."""
    for port in (4000, 4001):
        _send(fwd, port, 0x02)
        _send(fwd, port, 0x10)


def test_vip_figures_sum_backends_and_survive_a_removed_backend_and_a_restart() -> None:
    with temp_bpffs() as root:
        cfg = make_config(root / "maglev")
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            fwd.sync([_vip((A, B), ["a"] * 13)])
            _traffic(fwd)
            c = fwd.counters()
            want = {"packets": 4, "bytes": 4 * 40, "new_flows": 2, "ct_hits": 2, "ct_misses": 2}
            assert c["vips"]["web"] == want
            assert c["vip_backends"]["web"]["a"] == want
            assert c["vip_backends"]["web"]["b"] == dict.fromkeys(want, 0)
            # a leaves: its counts stay in the VIP's figures; b's traffic adds to them
            fwd.sync([_vip((B,), ["b"] * 13)])
            assert fwd.counters()["vips"]["web"] == want
            assert "a" not in fwd.counters()["vip_backends"]["web"]
            _send(fwd, 5000, 0x02)
        finally:
            fwd.close()
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            c = fwd.counters()
            assert c["vips"]["web"] == {"packets": 5, "bytes": 5 * 40, "new_flows": 3, "ct_hits": 2,
                                        "ct_misses": 3}
            assert c["vip_backends"]["web"]["b"]["packets"] == 1
            # an id given out again starts from zero and adds nothing stale to the new VIP
            fwd.sync([_vip((A, B), ["a"] * 13)])
            assert fwd.counters()["vip_backends"]["web"]["a"]["packets"] == 0
            assert fwd.counters()["vips"]["web"]["packets"] == 5
        finally:
            fwd.close()
            fwd.remove_pins()


def _old_map(path, kind: int, value_size: int, entries: int) -> None:
    lib = C.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_map_create.restype = C.c_int
    lib.bpf_map_create.argtypes = [C.c_int, C.c_char_p, C.c_uint32, C.c_uint32, C.c_uint32, C.c_void_p]
    fd = lib.bpf_map_create(kind, b"old", 4, value_size, entries, None)
    assert fd >= 0, C.get_errno()
    try:
        libbpf.obj_pin(fd, path)
    finally:
        os.close(fd)


def _pinned_id(path) -> int:
    fd = libbpf.obj_get(path)
    try:
        return libbpf.map_info(fd).id
    finally:
        os.close(fd)


def test_older_counter_and_filter_pins_are_replaced_and_flows_kept() -> None:
    with temp_bpffs() as root:
        cfg = make_config(root / "maglev")
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            fwd.sync([_vip((A, B), ["a"] * 13)])
            _send(fwd, 4000, 0x02)
            ids = dict(fwd.backend_ids)
        finally:
            fwd.close()
        # the older layouts: per-CPU arrays of 40-byte values (with ct_misses), and a filter of
        # one word per element, all zero (a VIP packet would pass to the kernel)
        for name in maps.COUNTER_MAPS:
            (root / "maglev" / name).unlink()
            _old_map(root / "maglev" / name, 6, 40, maps.MAX_BACKENDS)  # BPF_MAP_TYPE_PERCPU_ARRAY
        (root / "maglev" / "vip_addrs").unlink()
        _old_map(root / "maglev" / "vip_addrs", 2, 8, maps.VIP_FILTER_WORDS)  # BPF_MAP_TYPE_ARRAY
        # the reasons counter of a version with one reason fewer (before DROP_STOP_GAP_RUN)
        (root / "maglev" / "stats").unlink()
        _old_map(root / "maglev" / "stats", 6, 8, maps.STAT_MAX - 1)
        fwd = Forwarder(cfg, table_capacity=1 << 16)
        fwd.open()
        try:
            assert libbpf.map_info(fwd.fds["stats"]).max_entries == maps.STAT_MAX
            assert _pinned_id(root / "maglev" / "stats") == libbpf.map_info(fwd.fds["stats"]).id
            for name in maps.COUNTER_MAPS:
                assert libbpf.map_info(fwd.fds[name]).value_size == C.sizeof(maps.FlowStats)
                assert _pinned_id(root / "maglev" / name) == libbpf.map_info(fwd.fds[name]).id
            assert read_filter(fwd.fds["vip_addrs"]) == maps.vip_filter_words([maps.addr_bytes(VIP)])
            assert fwd.backend_ids == ids and fwd.conntrack_count() == 1
            _send(fwd, 4000, 0x10)  # the tracked flow is still a hit
            assert fwd.counters()["vips"]["web"] == {"packets": 1, "bytes": 40, "new_flows": 0, "ct_hits": 1,
                                                     "ct_misses": 0}
        finally:
            fwd.close()
            fwd.remove_pins()
