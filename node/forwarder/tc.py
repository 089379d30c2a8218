"""The backend's GRE decapsulation program (bpf/decap.c): build, load, attach to tc, read counters.

libbpf calls go through node/forwarder/libbpf.py, the project's one binding module; this module
holds what is specific to decap: the map layouts, the filter's slot and the counters' names.

The program sits on clsact ingress with a fixed handle and priority, so setup can replace it in
place (no window without decapsulation) and teardown removes exactly our filter and nothing else.

Public API:
- ``build_decap_object() -> Path``: compile bpf/decap.c (cached by source hash, build.py).
- ``DecapProgram.load(obj_path, pin_dir=None)``: load, reusing pinned maps in pin_dir if present.
- ``DecapProgram.set_vips(addrs)``, ``.vips()``, ``.counters()``, ``.test_run(frame)``,
  ``.attach(ifindex)``, ``.close()``.
- ``detach(ifindex) -> bool``, ``attached_prog_id(ifindex) -> int | None``.
- ``open_pinned_maps(pin_dir) -> PinnedDecapMaps`` (VIPs and counters without loading).
- ``BpfError``: what every libbpf failure raises (libbpf.BpfError, an OSError).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from node.forwarder import build, libbpf
from node.forwarder.libbpf import BpfError

BPF_DIR = Path(__file__).parent / "bpf"
PROG_NAME = "mlb_decap"
VIPS_MAP = "decap_vips"
STATS_MAP = "decap_stats"

# Our filter's identity on clsact ingress. Fixed, so a second setup replaces it and teardown can
# remove it without touching filters that other tools attached.
TC_HANDLE = 0x6D6C  # "ml"
TC_PRIORITY = 0xA11  # low enough to run before most filters, unusual enough not to collide

# Mirrors enum decap_counter_index in bpf/maglev.h, in index order.
DECAP_COUNTERS = (
    "decap_v4",
    "decap_v6",
    "pass_not_ip",
    "pass_not_gre",
    "pass_gre_flags",
    "pass_gre_proto",
    "pass_not_vip",
    "pass_fragment",
    "pass_truncated",
    "drop_adjust",
    # second chance (bpf/sc_decap.h)
    "sc_local",
    "sc_redirected",
    "sc_accepted",
    "sc_dropped",
)

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

T = TypeVar("T")


class DecapVipKey(ctypes.Structure):
    """struct decap_vip_key."""

    _fields_ = [("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3), ("addr", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> "DecapVipKey":
        key = cls()
        key.family = address.version
        packed = address.packed
        ctypes.memmove(key.addr, packed, len(packed))
        return key

    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        raw = bytes(self.addr)
        return ipaddress.IPv4Address(raw[:4]) if self.family == 4 else ipaddress.IPv6Address(raw)


class DecapVipValue(ctypes.Structure):
    _fields_ = [("enabled", ctypes.c_uint32)]


class DecapCounter(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


def build_decap_object(cache_dir: Path | None = None) -> Path:
    """Compile decap.c once per source version (node/forwarder/build.py) and return the object."""
    return build.build("decap", cache_dir)


# ---------------------------------------------------------------------------------------------
# Maps shared by the loaded program and by pinned-map readers
# ---------------------------------------------------------------------------------------------


class _DecapMaps:
    vips_fd: int
    stats_fd: int

    def set_vips(self, addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> None:
        """Make decap_vips hold exactly these addresses (adds first, so a VIP kept across the
        change never misses a packet)."""
        wanted = {(a.version, a.packed): a for a in addresses}
        for addr in wanted.values():
            _about(f"VIP {addr} in {VIPS_MAP}", libbpf.update, self.vips_fd, DecapVipKey.of(addr),
                   DecapVipValue(1))
        for addr in self.vips():
            if (addr.version, addr.packed) not in wanted:
                _about(f"VIP {addr} in {VIPS_MAP}", libbpf.delete, self.vips_fd, DecapVipKey.of(addr))

    def vips(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        keys = _about(VIPS_MAP, libbpf.keys, self.vips_fd, DecapVipKey)
        return sorted((k.address() for k in keys), key=lambda a: (a.version, a.packed))

    def counters(self) -> dict[str, tuple[int, int]]:
        """{counter name: (packets, bytes)} summed over CPUs."""
        ncpu = libbpf.num_possible_cpus()
        out = {}
        for idx, name in enumerate(DECAP_COUNTERS):
            values = _about(f"{STATS_MAP}[{name}]", libbpf.read_percpu, self.stats_fd, idx,
                            DecapCounter, ncpu)
            out[name] = (sum(v.packets for v in values), sum(v.bytes for v in values))
        return out

    def _close_fds(self) -> None:
        for fd in (self.vips_fd, self.stats_fd):
            if fd >= 0:
                os.close(fd)
        self.vips_fd = self.stats_fd = -1


class PinnedDecapMaps(_DecapMaps):
    """The maps of an attached decap program, opened from their bpffs pins."""

    def __init__(self, pin_dir: Path):
        self.vips_fd = self.stats_fd = -1
        fds: list[int] = []
        try:
            for name in (VIPS_MAP, STATS_MAP):
                fds.append(libbpf.obj_get(pin_dir / name))
        except BpfError:
            for fd in fds:
                os.close(fd)
            raise
        self.vips_fd, self.stats_fd = fds

    def close(self) -> None:
        self._close_fds()

    def __enter__(self) -> "PinnedDecapMaps":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pinned_maps(pin_dir: str | Path) -> PinnedDecapMaps:
    return PinnedDecapMaps(Path(pin_dir))


# ---------------------------------------------------------------------------------------------
# The loaded program
# ---------------------------------------------------------------------------------------------


class DecapProgram(_DecapMaps):
    """A loaded decap program. The object stays open until close(); an attached filter keeps
    the program (and its maps) alive in the kernel after that."""

    def __init__(self, obj: libbpf.BpfObject, prog_fd: int, vips_fd: int, stats_fd: int):
        self._obj: libbpf.BpfObject | None = obj
        self.prog_fd = prog_fd
        self.vips_fd = vips_fd
        self.stats_fd = stats_fd

    @classmethod
    def load(cls, obj_path: str | Path, pin_dir: str | Path | None = None) -> "DecapProgram":
        """Open and load the object. With pin_dir, the maps are pinned there (or the existing
        pins reused), so a later setup keeps the VIPs and counters and teardown can find them."""
        obj = libbpf.BpfObject(obj_path)
        try:
            if pin_dir is not None:
                for name in (VIPS_MAP, STATS_MAP):
                    obj.set_pin_path(name, Path(pin_dir) / name)
            try:
                obj.load()
            except BpfError as exc:
                if pin_dir is None:
                    raise
                raise BpfError(f"load BPF object {obj_path} (run as root; a stale pin in {pin_dir} "
                               "with another layout must be removed by `maglev backend teardown`)",
                               exc.errno, exc.log) from None
            try:
                fds = [obj.prog_fd(PROG_NAME), obj.map_fd(VIPS_MAP), obj.map_fd(STATS_MAP)]
            except KeyError as exc:
                raise BpfError(f"{obj_path}: {exc.args[0]} after load", errno.ENOENT) from None
        except BaseException:
            obj.close()
            raise
        return cls(obj, *fds)

    def attach(self, ifindex: int, create_hook: bool = True) -> int:
        """Attach on clsact ingress of ifindex, replacing an earlier copy of this filter
        atomically. Returns the attached program id. create_hook=False skips creating clsact
        when the caller knows it exists (the kernel refuses the redundant create)."""
        if create_hook:
            libbpf.tc_hook_create(ifindex)
        return _about(f"{PROG_NAME} on ingress", libbpf.tc_attach, ifindex, self.prog_fd,
                      TC_HANDLE, TC_PRIORITY)

    def test_run(self, frame: bytes, gso_size: int = 0, gso_segs: int = 0) -> tuple[int, bytes]:
        """Run one frame through the program (BPF_PROG_TEST_RUN): (tc verdict, output frame).
        gso_size/gso_segs make the test skb look GRO-merged (the __sk_buff context fields the
        kernel accepts for a test run)."""
        ctx = libbpf.skb_context(gso_size, gso_segs) if gso_size or gso_segs else b""
        return _about(PROG_NAME, libbpf.prog_test_run, self.prog_fd, frame, ctx)

    def close(self) -> None:
        """Release our references (the object owns the fds). An attached filter stays."""
        if self._obj is not None:
            self._obj.close()
            self._obj = None
            self.prog_fd = self.vips_fd = self.stats_fd = -1

    def __enter__(self) -> "DecapProgram":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def attached_prog_id(ifindex: int) -> int | None:
    """Id of the program in our filter slot on ifindex's ingress, or None if there is none."""
    return libbpf.tc_query(ifindex, TC_HANDLE, TC_PRIORITY)


def detach(ifindex: int) -> bool:
    """Remove our filter (only ours) from ifindex's ingress. False if it was not there."""
    if attached_prog_id(ifindex) is None:
        return False
    return _about(f"{PROG_NAME} on ingress", libbpf.tc_detach, ifindex, TC_HANDLE, TC_PRIORITY)


def _about(what: str, fn: Callable[..., T], *args: object) -> T:
    """Call a libbpf binding; on failure, say which decap map entry or filter it was about."""
    try:
        return fn(*args)
    except BpfError as exc:
        raise exc.about(what) from None


@dataclass(frozen=True)
class DecapStatus:
    prog_id: int | None
    vips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    counters: dict[str, tuple[int, int]]
