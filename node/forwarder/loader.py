"""The Forwarder: load, pin, attach and drive the XDP program (bpf/xdp_lb.c).

Lifecycle: ``open()`` loads the object, re-using maps pinned under ``config.bpffs`` (so a
controller restart keeps conntrack, tables and ids), ``attach()`` puts the program on the
interfaces (atomically replacing an older copy of itself, so traffic never stops),
``sync(vips)`` reconciles VIPs/backends/tables, ``self_test()`` checks each VIP through the
program with BPF_PROG_TEST_RUN, ``counters()`` reads the per-CPU counters, ``detach()`` and
``close()`` undo.

Conntrack has two designs (bpf/maglev.h), one object each, picked by ``config.conntrack``:
"lru" (default; the kernel's LRU hash) and "direct" (a direct-mapped array, faster, a new flow
replaces the one in its slot). Pins made by the other design are refused at ``open()``: the
maps cannot be shared, and switching forgets every tracked flow.

Tables are written into the VIP's spare slot (an mmap of a BPF_F_MMAPABLE array: one memcpy)
and published by flipping the VIP's active index with one aligned 32-bit store, so a packet
never sees a half-written table. Backend ids belong to (VIP name, backend key) pairs, are
recorded in a pinned name map (re-read on open) and are handed out cyclically, so an id freed
by a removed backend is not reused soon; the data path also refuses any id whose owner VIP
differs, so a stale id can only cause a counted drop, never a forward to another VIP's backend.
"""

from __future__ import annotations

import ctypes as C
import functools
import logging
import mmap
import os
import re
import socket
import subprocess
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Literal

from node.config import ForwarderConfig
from node.forwarder import build, libbpf, maps, model, packets
from node.forwarder.maps import Stat

log = logging.getLogger("maglev.forwarder")

PROG_NAME = "xdp_lb"
PROG_PIN = "prog_xdp_lb"
SELF_TEST_META = b"MLBT"  # any 4 bytes of XDP metadata mark a self-test packet
SELF_TEST_SRC = {4: "198.18.0.1", 6: "2001:2::1"}  # benchmarking ranges (RFC 2544 / 5180)
SELF_TEST_SPORT = 40000


class ForwarderError(RuntimeError):
    """Bad input or a refused operation; the message says which VIP/backend and what to do."""


@dataclass(frozen=True)
class BackendSpec:
    key: str
    address: IPv4Address | IPv6Address
    state: Literal["active", "drain", "down"]  # down = unhealthy/disabled: CT hits ignored


@dataclass(frozen=True)
class VipSpec:
    name: str
    address: IPv4Address | IPv6Address
    protocol: Literal["tcp", "udp"]
    port: int | Literal["all"]
    backends: tuple[BackendSpec, ...]
    # backend KEY per table entry (len = the prime table size); empty: no serving backends
    table: Sequence[str] = ()


@dataclass(frozen=True)
class VipCheck:
    vip: str
    ok: bool
    reason: str
    backend: str | None = None


@dataclass(frozen=True)
class SelfTestResult:
    ok: bool
    reason: str
    checks: tuple[VipCheck, ...] = field(default=())


# ---- bpffs --------------------------------------------------------------------------------------


def _mount_type(path: Path) -> str | None:
    """Filesystem type of the mount that holds path (longest mount-point prefix)."""
    best, kind = "", None
    p = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def mount_bpffs(path: str | Path) -> Path:
    """Make path a directory on a bpf filesystem, mounting one there if needed (idempotent).
    ``ip netns exec`` hides /sys/fs/bpf, so tests and the lab mount their own."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    if _mount_type(p) != "bpf":
        subprocess.run(["mount", "-t", "bpf", "bpf", str(p)], check=True, capture_output=True)
    return p


def umount_bpffs(path: str | Path) -> None:
    """Unmount a bpffs mounted by mount_bpffs (pins under it disappear)."""
    p = Path(path)
    if p.exists() and _mount_type(p) == "bpf" and os.path.ismount(p):
        subprocess.run(["umount", str(p)], check=True, capture_output=True)


# ---- helpers ------------------------------------------------------------------------------------


def _name_text(raw: bytes) -> str:
    """A name slot's text: up to the end of the data (backend names hold one inner NUL)."""
    return raw.rstrip(b"\0").decode(errors="replace")


def _zero_percpu(fd: int, key: int, value_size: int, ncpu: int) -> None:
    stride = (value_size + 7) & ~7
    buf = (C.c_uint8 * (stride * ncpu))()
    libbpf.update(fd, C.c_uint32(key), buf)


def _read_percpu(fd: int, key: int, ctype, ncpu: int) -> list:
    stride = (C.sizeof(ctype) + 7) & ~7
    buf = (C.c_uint8 * (stride * ncpu))()
    libbpf.lookup(fd, C.c_uint32(key), buf)
    raw = bytes(buf)
    return [ctype.from_buffer_copy(raw[i * stride:i * stride + C.sizeof(ctype)]) for i in range(ncpu)]


def _one_at_a_time(method):
    """Runs the method under the forwarder's lock. A test run uses the one preallocated buffer
    pair, and a self-test compares the program with a model read from the maps: two overlapping
    self-tests read each other's output, and a self-test during a sync reads half-written maps.
    Either way a healthy forwarder failed its self-test and the node withdrew every VIP."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Forwarder:
    """The XDP forwarder on this node's interfaces (one instance per controller)."""

    def __init__(self, config: ForwarderConfig, *, obj_path: str | Path | None = None,
                 table_capacity: int = maps.DEFAULT_TABLE_CAPACITY):
        if table_capacity % maps.TABLE_CHUNK:
            raise ForwarderError(f"table_capacity {table_capacity} must be a multiple of {maps.TABLE_CHUNK}")
        self.config = config
        self.obj_path = Path(obj_path) if obj_path else None
        self.table_capacity = table_capacity
        self.pin_dir = Path(config.bpffs)
        self._obj: libbpf.BpfObject | None = None
        self.fds: dict[str, int] = {}
        self.prog_fd = -1
        self._own_fds: list[int] = []
        self._meta_mm: mmap.mmap | None = None
        self._tab_mm: mmap.mmap | None = None
        self._ct_mm: mmap.mmap | None = None  # "direct" only (an LRU hash cannot be mmapped)
        self.conntrack = config.conntrack
        self._ncpu = libbpf.num_possible_cpus()
        self.ct_entries = maps.ct_entries(config.conntrack_size, self.conntrack, self._ncpu)
        self.vip_ids: dict[str, int] = {}
        self.backend_ids: dict[tuple[str, str], int] = {}
        self._next_be = 1
        self._attached: dict[str, tuple[int, str]] = {}  # ifname -> (ifindex, mode)
        self._runner: libbpf.TestRun | None = None
        self._filter: list[int] = []  # vip_addrs words as written
        self._frag_keys: dict[tuple[int, bytes, int], int] = {}  # fragment keys in vips
        self._lock = threading.RLock()  # see _one_at_a_time

    # ---- open / close ----------------------------------------------------------------------

    def open(self) -> None:
        """Load the program re-using pinned maps, pin what is new, read the ids back."""
        if self._obj is not None:
            return
        mount_bpffs(self.pin_dir)
        obj = libbpf.BpfObject(self.obj_path or build.build(build.FORWARDER_OBJECTS[self.conntrack]))
        try:
            obj.set_max_entries("conntrack", self.ct_entries)
            obj.set_max_entries("tables", self.table_capacity // maps.TABLE_CHUNK)
            for name in maps.MAP_NAMES:
                pin = self.pin_dir / name
                if pin.exists():
                    fd = libbpf.obj_get(pin)
                    self._own_fds.append(fd)
                    self._check_pinned(name, fd)
                    obj.reuse_map_fd(name, fd)
            obj.load()
            self._check_object(obj)
        except Exception:
            obj.close()
            self._close_own_fds()
            raise
        self._obj = obj
        self.fds = {name: obj.map_fd(name) for name in maps.MAP_NAMES}
        for name, fd in self.fds.items():
            pin = self.pin_dir / name
            if not pin.exists():
                libbpf.obj_pin(fd, pin)
        self.prog_fd = obj.prog_fd(PROG_NAME)
        self.ct_entries = libbpf.map_info(self.fds["conntrack"]).max_entries
        prog_pin = self.pin_dir / PROG_PIN
        if prog_pin.exists():
            prog_pin.unlink()  # the freshly loaded copy replaces the pin; attach() swaps atomically
        libbpf.obj_pin(self.prog_fd, prog_pin)
        self._mmap()
        self._write_config()
        self._read_back()
        self._load_addresses()
        self._sync_addresses(self.vip_ids.values())  # pins of an older version lack them
        self._runner = libbpf.TestRun(self.prog_fd, 4096)

    def _check_object(self, obj: libbpf.BpfObject) -> None:
        """The loaded object (obj_path may name any) must be built for the configured design."""
        kind = libbpf.map_info(obj.map_fd("conntrack")).type
        if kind != maps.CT_MAP_TYPES[self.conntrack]:
            other = next((m for m, t in maps.CT_MAP_TYPES.items() if t == kind), f"map type {kind}")
            raise ForwarderError(
                f"BPF object {self.obj_path} keeps conntrack as {other!r} but forwarder.conntrack is "
                f"{self.conntrack!r}; use the {build.FORWARDER_OBJECTS[self.conntrack]} object")

    def _check_pinned(self, name: str, fd: int) -> None:
        info = libbpf.map_info(fd)
        advice = (f"Detach the old forwarder and remove the pins under {self.pin_dir} (that forgets "
                  "tracked flows), then start again")
        if name == "conntrack" and info.type != maps.CT_MAP_TYPES[self.conntrack]:
            other = next((m for m, t in maps.CT_MAP_TYPES.items() if t == info.type), None)
            if other is None:
                raise ForwarderError(
                    f"pinned map {self.pin_dir / name} has map type {info.type}, this version needs "
                    f"{maps.CT_MAP_TYPES[self.conntrack]}: it was made by an incompatible version. {advice}")
            raise ForwarderError(
                f"pinned conntrack map {self.pin_dir / name} is the {other!r} design but "
                f"forwarder.conntrack is {self.conntrack!r}: the two cannot share maps. {advice} "
                f"(or set forwarder.conntrack: {other} to keep the tracked flows)")
        shape = maps.map_shape(name, self.conntrack)
        if (info.key_size, info.value_size) != shape:
            raise ForwarderError(
                f"pinned map {self.pin_dir / name} has key/value sizes {info.key_size}/{info.value_size}, "
                f"this version needs {shape[0]}/{shape[1]}: it was made by an incompatible version. "
                + advice)
        if name == "conntrack" and info.max_entries != self.ct_entries:
            log.warning("pinned conntrack map has %d entries, config asks %d (conntrack_size %d%s); "
                        "keeping the pinned one (remove %s to resize; that forgets every tracked flow)",
                        info.max_entries, self.ct_entries, self.config.conntrack_size,
                        " rounded up to a power of two" if self.conntrack == "direct" else "",
                        self.pin_dir / name)
        if name == "conntrack" and info.map_flags & maps.BPF_F_NO_COMMON_LRU:
            log.warning("pinned conntrack map %s has per-CPU LRU lists (made by an older version): "
                        "each CPU holds only %d of its %d flows; keeping it with its tracked flows "
                        "(remove it to get one shared LRU; that forgets every tracked flow)",
                        self.pin_dir / name, info.max_entries // self._ncpu, info.max_entries)
        if name == "tables":
            self.table_capacity = info.max_entries * maps.TABLE_CHUNK

    def _mmap(self) -> None:
        page = mmap.PAGESIZE
        meta_len = (maps.MAX_VIPS * C.sizeof(maps.VipMeta) + page - 1) // page * page
        tab_len = (self.table_capacity * 4 + page - 1) // page * page
        self._meta_mm = mmap.mmap(self.fds["vip_meta"], meta_len, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self._tab_mm = mmap.mmap(self.fds["tables"], tab_len, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        if self.conntrack == "direct":
            ct_len = (self.ct_entries * C.sizeof(maps.CtEntry) + page - 1) // page * page
            self._ct_mm = mmap.mmap(self.fds["conntrack"], ct_len, mmap.MAP_SHARED,
                                    mmap.PROT_READ | mmap.PROT_WRITE)

    def _write_config(self) -> None:
        c = self.config
        cfg = maps.Config()
        if c.next_hop_mac:
            cfg.next_hop_mac[:] = bytes.fromhex(c.next_hop_mac.replace(":", ""))
        else:
            cfg.flags |= maps.CFG_F_FIB_LOOKUP
        if c.encap_source_v4 is not None:
            cfg.flags |= maps.CFG_F_HAVE_SRC_V4
            cfg.src_v4[:] = c.encap_source_v4.packed
        if c.encap_source_v6 is not None:
            cfg.flags |= maps.CFG_F_HAVE_SRC_V6
            cfg.src_v6[:] = c.encap_source_v6.packed
        cfg.mtu = c.mtu
        cfg.udp_idle_ns = int(c.udp_idle_timeout * 1e9)
        cfg.new_flow_rate = c.new_flow_rate_limit
        cfg.ct_mask = self.ct_entries - 1 if self.conntrack == "direct" else 0  # "lru" ignores it
        libbpf.update(self.fds["config"], C.c_uint32(0), cfg)

    def _meta(self, vid: int) -> maps.VipMeta:
        return maps.VipMeta.from_buffer(self._meta_mm, vid * C.sizeof(maps.VipMeta))

    def _read_back(self) -> None:
        """Rebuild the name -> id maps from the pinned maps (a restarted controller)."""
        self.vip_ids.clear()
        self.backend_ids.clear()
        names = maps.Name()
        for vid in range(maps.MAX_VIPS):
            if self._meta(vid).in_use:
                libbpf.lookup(self.fds["vip_names"], C.c_uint32(vid), names)
                self.vip_ids[_name_text(bytes(names))] = vid
        be = maps.Backend()
        top = 0
        for bid in range(1, maps.MAX_BACKENDS):
            libbpf.lookup(self.fds["backends"], C.c_uint32(bid), be)
            if be.state != maps.BE_STATE_UNUSED:
                libbpf.lookup(self.fds["be_names"], C.c_uint32(bid), names)
                vip, _, key = _name_text(bytes(names)).partition("\0")
                self.backend_ids[(vip, key)] = bid
                top = bid
        self._next_be = top + 1 if top + 1 < maps.MAX_BACKENDS else 1

    def _close_own_fds(self) -> None:
        for fd in self._own_fds:
            os.close(fd)
        self._own_fds.clear()

    def close(self) -> None:
        """Release this process's handles; pins and any attachment stay (restart-safe)."""
        self._runner = None
        for mm in (self._meta_mm, self._tab_mm, self._ct_mm):
            if mm is not None:
                mm.close()
        self._meta_mm = self._tab_mm = self._ct_mm = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        self._close_own_fds()
        self.fds = {}
        self.prog_fd = -1

    def remove_pins(self) -> None:
        """Forget all state: unlink every pin (tests, and `on_stop: detach` with a clean slate)."""
        for name in (*maps.MAP_NAMES, PROG_PIN):
            try:
                (self.pin_dir / name).unlink()
            except FileNotFoundError:
                pass

    def _require_open(self) -> None:
        if self._obj is None:
            raise ForwarderError("forwarder is not open; call open() first")

    # ---- attach / detach -------------------------------------------------------------------

    def attach(self) -> str:
        """Attach to every configured interface; returns the mode used ("native"/"generic").
        An older copy of this program already attached is replaced atomically."""
        self._require_open()
        modes = set()
        for ifname in self.config.interfaces:
            try:
                ifindex = socket.if_nametoindex(ifname)
            except OSError:
                raise ForwarderError(f"interface {ifname!r} (forwarder.interfaces) does not exist") from None
            modes.add(self._attach_one(ifname, ifindex))
        return "generic" if "generic" in modes else "native"

    def _attach_one(self, ifname: str, ifindex: int) -> str:
        tries = [("native", libbpf.XDP_FLAGS_DRV_MODE), ("generic", libbpf.XDP_FLAGS_SKB_MODE)]
        if self.config.xdp_mode == "generic":
            tries = tries[1:]
        last: Exception | None = None
        for mode, flags in tries:
            old = libbpf.xdp_query_id(ifindex, flags)
            try:
                if old:
                    old_fd = libbpf.prog_fd_by_id(old)
                    try:
                        if old != libbpf.prog_id(self.prog_fd):
                            libbpf.xdp_attach(ifindex, self.prog_fd, flags, old_prog_fd=old_fd)
                    finally:
                        os.close(old_fd)
                else:
                    libbpf.xdp_attach(ifindex, self.prog_fd, flags | libbpf.XDP_FLAGS_UPDATE_IF_NOEXIST)
            except libbpf.BpfError as exc:
                last = exc
                log.warning("XDP %s attach on %s refused (%s); trying the next mode", mode, ifname, exc)
                continue
            self._attached[ifname] = (ifindex, mode)
            return mode
        raise ForwarderError(f"cannot attach XDP to {ifname}: {last}")

    def detach(self) -> None:
        """Remove the forwarder from the configured interfaces: this copy, or an older copy
        a previous controller attached (recognised by its program name); another program
        someone else attached is left alone."""
        self._require_open()
        our = libbpf.prog_id(self.prog_fd)
        for ifname in self.config.interfaces:
            try:
                ifindex = socket.if_nametoindex(ifname)
            except OSError:
                continue
            for flags in (libbpf.XDP_FLAGS_DRV_MODE, libbpf.XDP_FLAGS_SKB_MODE):
                cur = libbpf.xdp_query_id(ifindex, flags)
                if cur and (cur == our or libbpf.prog_name_by_id(cur) == PROG_NAME):
                    libbpf.xdp_detach(ifindex, flags)
                elif cur:
                    log.warning("XDP program id %d on %s is not the forwarder; left attached", cur, ifname)
            self._attached.pop(ifname, None)

    def attached_mode(self, ifname: str) -> str | None:
        """"native"/"generic" when our program runs on ifname, else None (read from the kernel)."""
        self._require_open()
        ifindex = socket.if_nametoindex(ifname)
        our = libbpf.prog_id(self.prog_fd)
        if libbpf.xdp_query_id(ifindex, libbpf.XDP_FLAGS_DRV_MODE) == our:
            return "native"
        if libbpf.xdp_query_id(ifindex, libbpf.XDP_FLAGS_SKB_MODE) == our:
            return "generic"
        return None

    # ---- sync -----------------------------------------------------------------------------

    @_one_at_a_time
    def sync(self, vips: Sequence[VipSpec]) -> None:
        """Make the maps match ``vips`` exactly (idempotent). Order matters for packets in
        flight: backends gain service before tables flip, lose it after."""
        self._require_open()
        self._validate(vips)
        wanted = {v.name: v for v in vips}
        later: list[tuple[int, int]] = []  # (backend id, state) to apply after the flips
        for v in vips:
            vid = self._vip_id(v.name)
            ids = {}
            for b in v.backends:
                bid, deferred = self._put_backend(v.name, vid, b)
                ids[b.key] = bid
                if deferred is not None:
                    later.append((bid, deferred))
            self._write_table(vid, [ids[k] for k in v.table])
            self._put_vip_key(vid, v)
            libbpf.update(self.fds["vip_names"], C.c_uint32(vid), self._name(maps.encode_name(v.name)))
            self._meta(vid).in_use = 1
        for bid, state in later:
            self._set_state(bid, state)
        self._sync_addresses([self.vip_ids[n] for n in wanted])
        # Removed VIPs stop matching before their backends disappear: packets pass to the
        # kernel rather than meeting a table of freed ids.
        for name in [n for n in self.vip_ids if n not in wanted]:
            self._remove_vip(name)
        for (vip, key), bid in list(self.backend_ids.items()):
            spec = wanted.get(vip)
            if spec is None or key not in {b.key for b in spec.backends}:
                self._free_backend(vip, key, bid)

    def _validate(self, vips: Sequence[VipSpec]) -> None:
        seen: dict[str, VipSpec] = {}
        idents: dict[tuple, str] = {}
        nbackends = 0
        for v in vips:
            where = f"VIP {v.name!r}"
            if v.name in seen:
                raise ForwarderError(f"{where} is listed twice")
            seen[v.name] = v
            if len(maps.encode_name(v.name)) > 200:
                raise ForwarderError(f"{where}: name too long")
            ident = (str(v.address), v.protocol, v.port)
            if ident in idents:
                raise ForwarderError(f"{where} has the same address/protocol/port as VIP {idents[ident]!r}")
            idents[ident] = v.name
            if v.protocol not in maps.IPPROTO:
                raise ForwarderError(f"{where}: protocol {v.protocol!r} must be tcp or udp")
            if v.port != "all" and not (isinstance(v.port, int) and 1 <= v.port <= 65535):
                raise ForwarderError(f"{where}: port {v.port!r} must be 1-65535 or 'all'")
            keys = {}
            for b in v.backends:
                if b.key in keys:
                    raise ForwarderError(f"{where}: backend {b.key!r} is listed twice")
                if b.state not in maps.STATE_CODES:
                    raise ForwarderError(f"{where}: backend {b.key!r} state {b.state!r} must be active, drain or down")
                keys[b.key] = b
            nbackends += len(keys)
            for k in set(v.table):
                if k not in keys:
                    raise ForwarderError(f"{where}: table names backend {k!r}, which is not in its backends")
                if keys[k].state != "active":
                    raise ForwarderError(
                        f"{where}: table names backend {k!r} in state {keys[k].state}; only active "
                        "backends may take new flows (rebuild the table without it)")
            if len(v.table) >= 1 << 31:
                raise ForwarderError(f"{where}: table too large")
        if len(vips) > maps.MAX_VIPS:
            raise ForwarderError(f"{len(vips)} VIPs exceed the data path's limit of {maps.MAX_VIPS}")
        if nbackends > maps.MAX_BACKENDS - 1:
            raise ForwarderError(f"{nbackends} VIP backends exceed the limit of {maps.MAX_BACKENDS - 1}")
        # Each VIP may need two regions of its table size at once.
        need = sum(2 * len(v.table) for v in vips)
        if need > self.table_capacity:
            raise ForwarderError(
                f"tables need {need} entries (two slots per VIP) but the tables map holds "
                f"{self.table_capacity}; use smaller table sizes or a larger table_capacity")

    @staticmethod
    def _name(raw: bytes) -> maps.Name:
        n = maps.Name()
        C.memmove(C.addressof(n), raw, len(raw))  # c_char fields stop at the first NUL
        return n

    def _vip_id(self, name: str) -> int:
        if name in self.vip_ids:
            return self.vip_ids[name]
        used = set(self.vip_ids.values())
        vid = next(i for i in range(maps.MAX_VIPS) if i not in used and not self._meta(i).in_use)
        m = self._meta(vid)
        m.active = 0
        m.slot[0].offset = m.slot[0].size = m.slot[1].offset = m.slot[1].size = 0
        _zero_percpu(self.fds["vip_stats"], vid, C.sizeof(maps.FlowStats), self._ncpu)
        self.vip_ids[name] = vid
        return vid

    def _put_vip_key(self, vid: int, v: VipSpec) -> None:
        key = maps.vip_key(v.address, v.protocol, v.port)
        m = self._meta(vid)
        if m.in_use and bytes(m.key) != bytes(key):
            libbpf.delete(self.fds["vips"], m.key)  # the VIP's address/protocol/port changed
        libbpf.update(self.fds["vips"], key, maps.VipValue(vip_id=vid))
        C.memmove(C.addressof(m.key), C.addressof(key), C.sizeof(key))

    # ---- address pre-filter and fragment keys (maglev.h) ---------------------------------

    def _load_addresses(self) -> None:
        """Read back the pre-filter words and the fragment keys the maps hold now."""
        self._filter.clear()
        w = C.c_uint64()
        for i in range(maps.VIP_FILTER_WORDS):
            libbpf.lookup(self.fds["vip_addrs"], C.c_uint32(i), w)
            self._filter.append(w.value)
        self._frag_keys.clear()
        val = maps.VipValue()
        for key in libbpf.keys(self.fds["vips"], maps.VipKey):
            if key.family & maps.VIP_KEY_FRAG and libbpf.lookup(self.fds["vips"], key, val):
                self._frag_keys[(key.family & ~maps.VIP_KEY_FRAG, bytes(key.addr), key.proto)] = val.vip_id

    def _sync_addresses(self, vids) -> None:
        """Make the pre-filter and the fragment keys match the VIPs ``vids`` (whose keys are
        written). Run before removed VIPs' keys go, so no fragment key names a removed VIP;
        a filter bit set late or cleared early only sends that address's packets to the
        kernel, as if the VIP did not exist yet or any more."""
        keys = []
        for vid in vids:
            k = self._meta(vid).key
            keys.append((k.family, bytes(k.addr), int.from_bytes(bytes(k.port_be), "big"), k.proto, vid))
        words = maps.vip_filter_words((fam, addr) for fam, addr, *_ in keys)
        for i, word in enumerate(words):
            if word != self._filter[i]:
                libbpf.update(self.fds["vip_addrs"], C.c_uint32(i), C.c_uint64(word))
                self._filter[i] = word
        want = maps.fragment_owners(keys)
        for (fam, addr, proto), vid in want.items():
            if self._frag_keys.get((fam, addr, proto)) != vid:
                try:
                    libbpf.update(self.fds["vips"], self._frag_key(fam, addr, proto), maps.VipValue(vip_id=vid))
                except libbpf.BpfError as exc:
                    # only with a vips map pinned by a version that had no room for them
                    log.warning("no fragment key for %s proto %d (%s): its fragments are not "
                                "forwarded; re-create the pins under %s to make room",
                                self._addr_text(fam, addr), proto, exc, self.pin_dir)
                    continue
                self._frag_keys[(fam, addr, proto)] = vid
        for k in [k for k in self._frag_keys if k not in want]:
            libbpf.delete(self.fds["vips"], self._frag_key(*k))
            del self._frag_keys[k]

    @staticmethod
    def _frag_key(fam: int, addr: bytes, proto: int) -> maps.VipKey:
        k = maps.VipKey()
        k.addr[:] = addr
        k.proto = proto
        k.family = fam | maps.VIP_KEY_FRAG
        return k

    @staticmethod
    def _addr_text(fam: int, addr: bytes) -> str:
        return str(ip_address(addr[:4] if fam == maps.FAM_V4 else addr))

    def _put_backend(self, vip: str, vid: int, b: BackendSpec) -> tuple[int, int | None]:
        """Write a backend; returns (id, state to apply after the table flip, if any)."""
        fam, raw = maps.addr_bytes(b.address)
        want = maps.STATE_CODES[b.state]
        bid = self.backend_ids.get((vip, b.key))
        cur = maps.Backend()
        deferred = None
        if bid is None:
            bid = self._alloc_backend()
            _zero_percpu(self.fds["be_stats"], bid, C.sizeof(maps.FlowStats), self._ncpu)
            libbpf.update(self.fds["be_names"], C.c_uint32(bid), self._name(maps.backend_name(vip, b.key)))
            self.backend_ids[(vip, b.key)] = bid
            state = want
        else:
            libbpf.lookup(self.fds["backends"], C.c_uint32(bid), cur)
            state = want
            if want != maps.BE_STATE_ACTIVE and cur.state == maps.BE_STATE_ACTIVE:
                state, deferred = cur.state, want  # leave the tables first
        if (bytes(cur.addr), cur.family, cur.state, cur.vip_id) != (raw, fam, state, vid):
            new = maps.Backend(family=fam, state=state, vip_id=vid)
            new.addr[:] = raw
            libbpf.update(self.fds["backends"], C.c_uint32(bid), new)
        return bid, deferred

    def _set_state(self, bid: int, state: int) -> None:
        be = maps.Backend()
        libbpf.lookup(self.fds["backends"], C.c_uint32(bid), be)
        be.state = state
        libbpf.update(self.fds["backends"], C.c_uint32(bid), be)

    def _alloc_backend(self) -> int:
        used = set(self.backend_ids.values())
        n = maps.MAX_BACKENDS - 1
        for i in range(n):
            bid = (self._next_be - 1 + i) % n + 1
            if bid not in used:
                self._next_be = bid + 1 if bid + 1 < maps.MAX_BACKENDS else 1
                return bid
        raise ForwarderError(f"no free backend id (limit {n})")

    def _free_backend(self, vip: str, key: str, bid: int) -> None:
        libbpf.update(self.fds["backends"], C.c_uint32(bid), maps.Backend())
        libbpf.update(self.fds["be_names"], C.c_uint32(bid), maps.Name())
        del self.backend_ids[(vip, key)]

    def _remove_vip(self, name: str) -> None:
        vid = self.vip_ids.pop(name)
        m = self._meta(vid)
        libbpf.delete(self.fds["vips"], m.key)
        m.in_use = 0
        m.slot[0].size = m.slot[1].size = 0
        libbpf.update(self.fds["vip_names"], C.c_uint32(vid), maps.Name())

    # ---- tables ---------------------------------------------------------------------------

    def _regions(self, skip: tuple[int, int] | None = None) -> list[tuple[int, int]]:
        """Table regions in use by every VIP slot, sorted (skip: one (vid, slot) to ignore)."""
        out = []
        for vid in set(self.vip_ids.values()):
            m = self._meta(vid)
            for s in (0, 1):
                if (vid, s) != skip and m.slot[s].size:
                    out.append((m.slot[s].offset, m.slot[s].size))
        return sorted(out)

    def _allocate(self, size: int, skip: tuple[int, int]) -> int:
        """First fit over the flat table array."""
        start = 0
        for off, n in self._regions(skip):
            if off - start >= size:
                return start
            start = max(start, off + n)
        if self.table_capacity - start >= size:
            return start
        raise ForwarderError(f"no room for a table of {size} entries in the tables map "
                             f"({self.table_capacity} entries); raise table_capacity")

    def table_ids(self, vid: int) -> list[int]:
        """The active table of a VIP as backend ids (read back from the map)."""
        m = self._meta(vid)
        s = m.slot[m.active & 1]
        if not s.size:
            return []
        a = array("I")
        a.frombytes(self._tab_mm[s.offset * 4:(s.offset + s.size) * 4])
        return a.tolist()

    def _write_table(self, vid: int, ids: list[int]) -> bool:
        """Write ids into the spare slot and flip; False when the live table already matches."""
        spare = self.stage_table(vid, ids)
        if spare is None:
            return False
        self.flip_table(vid, spare)
        return True

    def stage_table(self, vid: int, ids: list[int]) -> int | None:
        """Write ids into the VIP's spare slot without publishing it; returns the spare slot
        index, or None when the live table already holds exactly these ids."""
        m = self._meta(vid)
        active = m.active & 1
        new = array("I", ids).tobytes()
        cur = m.slot[active]
        if cur.size == len(ids) and self._tab_mm[cur.offset * 4:(cur.offset + cur.size) * 4] == new:
            return None
        spare = active ^ 1
        if ids:
            if m.slot[spare].size != len(ids):
                m.slot[spare].size = 0
                off = self._allocate(len(ids), (vid, spare))
            else:
                off = m.slot[spare].offset
            self._tab_mm[off * 4:off * 4 + len(new)] = new
            m.slot[spare].offset = off
            m.slot[spare].size = len(ids)
        else:
            m.slot[spare].size = 0
        return spare

    def flip_table(self, vid: int, slot: int) -> None:
        """Publish a staged slot: one aligned 32-bit store, after the table and slot are in
        place (x86-64 and arm64 keep a single aligned store atomic; the data path reads the
        index once per packet)."""
        C.c_uint32.from_buffer(self._meta_mm, vid * C.sizeof(maps.VipMeta)).value = slot

    # ---- reading state --------------------------------------------------------------------

    def vip_id(self, name: str) -> int:
        return self.vip_ids[name]

    def backend_id(self, vip: str, key: str) -> int:
        return self.backend_ids[(vip, key)]

    def model_state(self, with_conntrack: bool = False) -> model.ModelState:
        """The model's view of the maps as they are now (read back, not remembered)."""
        self._require_open()
        c = self.config
        mac = bytes.fromhex(c.next_hop_mac.replace(":", "")) if c.next_hop_mac else bytes(6)
        st = model.ModelState(model.ModelConfig(
            next_hop_mac=mac,
            src_v4=c.encap_source_v4.packed if c.encap_source_v4 else None,
            src_v6=c.encap_source_v6.packed if c.encap_source_v6 else None,
            mtu=c.mtu, udp_idle_ns=int(c.udp_idle_timeout * 1e9),
            new_flow_rate=c.new_flow_rate_limit, conntrack=self.conntrack,
            ct_slots=self.ct_entries if self.conntrack == "direct" else maps.DEFAULT_CT_SLOTS))
        for key in libbpf.keys(self.fds["vips"], maps.VipKey):
            val = maps.VipValue()
            if libbpf.lookup(self.fds["vips"], key, val):
                port = int.from_bytes(bytes(key.port_be), "big")
                if key.family & maps.VIP_KEY_FRAG:
                    st.frag_vips[(key.family & ~maps.VIP_KEY_FRAG, bytes(key.addr), key.proto)] = val.vip_id
                    continue
                st.vips[(key.family, bytes(key.addr), port, key.proto)] = val.vip_id
                st.tables[val.vip_id] = self.table_ids(val.vip_id)
        be = maps.Backend()
        for bid in set(self.backend_ids.values()):
            libbpf.lookup(self.fds["backends"], C.c_uint32(bid), be)
            st.backends[bid] = model.ModelBackend(be.family, bytes(be.addr), be.state, be.vip_id)
        if with_conntrack:
            for k, v in self._ct_items():
                f = model.Flow(k.family, bytes(k.src), bytes(k.dst),
                               int.from_bytes(bytes(k.sport_be), "big"),
                               int.from_bytes(bytes(k.dport_be), "big"), k.proto)
                st.ct_put(f, (v.backend_id, v.last_seen_ns, v.vip_id))
        return st

    def _ct_items(self) -> list[tuple[maps.FlowKey, maps.CtValue]]:
        """Every tracked flow and its value, in either design."""
        if self.conntrack == "direct":
            return [(e.key, e.val) for e in self._ct_entries()]
        out = []
        for k in libbpf.keys(self.fds["conntrack"], maps.FlowKey):
            v = maps.CtValue()
            if libbpf.lookup(self.fds["conntrack"], k, v):  # it may have been evicted meanwhile
                out.append((k, v))
        return out

    # The family byte of slot i sits at i * 64 + _CT_FAMILY_OFF: scanning that one byte per
    # slot (a slice of the mmap) finds the used slots of a million-entry table in milliseconds.
    _CT_FAMILY_OFF = maps.CtEntry.key.offset + maps.FlowKey.family.offset

    def _ct_used_slots(self) -> list[int]:
        assert self._ct_mm is not None
        fams = self._ct_mm[self._CT_FAMILY_OFF:self.ct_entries * C.sizeof(maps.CtEntry):C.sizeof(maps.CtEntry)]
        return [m.start() for m in re.finditer(rb"[^\x00]", fams)]

    def _ct_entries(self) -> list[maps.CtEntry]:
        """Copies of the used, stable (even seq) conntrack slots."""
        size = C.sizeof(maps.CtEntry)
        out = []
        for i in self._ct_used_slots():
            e = maps.CtEntry.from_buffer_copy(self._ct_mm[i * size:(i + 1) * size])
            if not e.seq & 1:
                out.append(e)
        return out

    def conntrack_count(self) -> int:
        """Tracked flows (entries of the LRU hash, or used slots of the direct array)."""
        self._require_open()
        if self.conntrack == "lru":
            return len(libbpf.keys(self.fds["conntrack"], maps.FlowKey))
        return len(self._ct_used_slots())

    def conntrack_flows(self, vip: str | None = None, limit: int | None = None) -> list[dict]:
        """Tracked flows, in either design, for operators (``maglev conntrack``): source,
        destination, protocol, the VIP and backend they are pinned to, and for UDP the seconds
        since the flow's last packet (bpf_ktime_get_ns is CLOCK_MONOTONIC)."""
        self._require_open()
        vips = {vid: name for name, vid in self.vip_ids.items()}
        backends = {bid: key for (_, key), bid in self.backend_ids.items()}
        now = time.monotonic_ns()
        out = []
        for k, v in self._ct_items():
            name = vips.get(v.vip_id, f"#{v.vip_id}")
            if vip is not None and name != vip:
                continue
            out.append({
                "vip": name, "protocol": {6: "tcp", 17: "udp"}.get(k.proto, str(k.proto)),
                "src": str(maps.bytes_addr(k.family, bytes(k.src))),
                "sport": int.from_bytes(bytes(k.sport_be), "big"),
                "dst": str(maps.bytes_addr(k.family, bytes(k.dst))),
                "dport": int.from_bytes(bytes(k.dport_be), "big"),
                "backend": backends.get(v.backend_id, f"#{v.backend_id}"),
                # TCP entries store no time (only UDP expires by idleness): None, not "idle since boot"
                "idle_seconds": round(max(0, now - v.last_seen_ns) / 1e9, 3) if v.last_seen_ns else None,
            })
            if limit is not None and len(out) >= limit:
                break
        return out

    def conntrack_clear(self) -> None:
        """Forget every tracked flow (tests, and an operator's last resort)."""
        self._require_open()
        if self.conntrack == "lru":
            for k in libbpf.keys(self.fds["conntrack"], maps.FlowKey):
                libbpf.delete(self.fds["conntrack"], k)
            return
        assert self._ct_mm is not None
        step = 1 << 20
        zero = bytes(step)
        total = self.ct_entries * C.sizeof(maps.CtEntry)
        for off in range(0, total, step):
            n = min(step, total - off)
            self._ct_mm[off:off + n] = zero[:n]

    def counters(self) -> dict:
        """{"vips": {vip: stats}, "backends": {key: stats summed over the VIPs it serves},
        "vip_backends": {vip: {key: stats}}, "drops": {reason: n}, "events": {name: n}};
        stats = packets, bytes, new_flows, ct_hits, ct_misses (sums over CPUs)."""
        self._require_open()

        def total(fd: int, idx: int) -> dict[str, int]:
            per = _read_percpu(fd, idx, maps.FlowStats, self._ncpu)
            return {f: sum(getattr(s, f) for s in per) for f in maps.STAT_FIELDS}

        out: dict = {"vips": {}, "backends": {}, "vip_backends": {}, "drops": {}, "events": {}}
        for name, vid in self.vip_ids.items():
            out["vips"][name] = total(self.fds["vip_stats"], vid)
            out["vip_backends"][name] = {}
        for (vip, key), bid in sorted(self.backend_ids.items()):
            stats = total(self.fds["be_stats"], bid)
            out["vip_backends"].setdefault(vip, {})[key] = stats
            # one backend key may serve several VIPs: "backends" sums them per key
            agg = out["backends"].setdefault(key, dict.fromkeys(maps.STAT_FIELDS, 0))
            for f in maps.STAT_FIELDS:
                agg[f] += stats[f]
        for reason in Stat:
            n = sum(v.value for v in _read_percpu(self.fds["stats"], int(reason), C.c_uint64, self._ncpu))
            kind, _, rest = reason.name.partition("_")
            if kind == "DROP":
                out["drops"][rest.lower()] = n
            else:
                out["events"][reason.name.lower()] = n
        return out

    # ---- self-test ------------------------------------------------------------------------

    @_one_at_a_time
    def test_run(self, frame: bytes, *, selftest: bool = False, ingress_ifindex: int = 0) -> tuple[int, bytes]:
        """Run one frame through the loaded program (BPF_PROG_TEST_RUN): (verdict, output)."""
        self._require_open()
        assert self._runner is not None
        return self._runner.run(frame, SELF_TEST_META if selftest else b"", ingress_ifindex)

    @_one_at_a_time
    def self_test(self) -> SelfTestResult:
        """For each VIP with backends: a synthetic packet through the program must come out as
        XDP_TX (or REDIRECT with fib lookup), GRE to the backend the model picks, with the same
        bytes as the model's (MACs excepted under fib lookup). Self-test packets insert no
        conntrack entry and touch no VIP counters (they are marked with XDP metadata)."""
        if self._obj is None:
            return SelfTestResult(False, "forwarder is not open")
        problems = []
        our = libbpf.prog_id(self.prog_fd)
        for ifname, (ifindex, mode) in self._attached.items():
            flag = libbpf.XDP_FLAGS_DRV_MODE if mode == "native" else libbpf.XDP_FLAGS_SKB_MODE
            cur = libbpf.xdp_query_id(ifindex, flag)
            if cur != our:
                problems.append(f"{ifname}: XDP program id {cur or 'none'} runs, expected ours ({our}); "
                                "something replaced or detached it: restart the forwarder")
        try:
            st = self.model_state()
        except OSError as exc:
            return SelfTestResult(False, f"cannot read maps: {exc}")
        checks = [self._check_vip(st, name, vid) for name, vid in sorted(self.vip_ids.items())]
        problems += [f"VIP {c.vip}: {c.reason}" for c in checks if not c.ok]
        if problems:
            return SelfTestResult(False, "; ".join(problems), tuple(checks))
        return SelfTestResult(True, f"{len(checks)} VIP(s) checked", tuple(checks))

    def _check_vip(self, st: model.ModelState, name: str, vid: int) -> VipCheck:
        keys = [k for k, v in st.vips.items() if v == vid]
        if not keys:
            return VipCheck(name, False, "no VIP lookup entry in the vips map")
        fam, addr, port, proto = keys[0]
        if not st.tables.get(vid):
            return VipCheck(name, True, "no serving backends (packets are dropped and counted)")
        dst = str(maps.bytes_addr(fam, addr))
        frame = packets.flow_packet(SELF_TEST_SRC[fam], dst, SELF_TEST_SPORT + vid, port or 80,
                                    "tcp" if proto == 6 else "udp", size=60)
        fib = self.config.next_hop_mac is None
        ifindex = next(iter(self._attached.values()))[0] if (fib and self._attached) else 0
        if fib and not ifindex:
            ifindex = socket.if_nametoindex(self.config.interfaces[0])
        try:
            verdict, out = self.test_run(frame, selftest=True, ingress_ifindex=ifindex)
        except OSError as exc:
            return VipCheck(name, False, f"BPF_PROG_TEST_RUN failed: {exc}")
        expect = model.process(st, frame, selftest=True)
        be_key = self._key_of(expect.backend_id)
        ok_verdicts = {model.XDP_TX} | ({libbpf.XDP_REDIRECT} if fib else set())
        if verdict not in ok_verdicts:
            return VipCheck(name, False, f"verdict {libbpf.VERDICTS.get(verdict, verdict)}, expected TX "
                            f"to backend {be_key} (model: {libbpf.VERDICTS.get(expect.verdict)})", be_key)
        got, want = (out[12:], expect.data[12:]) if fib else (out, expect.data)
        if got != want:
            return VipCheck(name, False, f"output differs from the model's (expected GRE to {be_key}); "
                            f"got {out[:80].hex()} want {expect.data[:80].hex()}", be_key)
        return VipCheck(name, True, f"GRE to {be_key}", be_key)

    def _key_of(self, bid: int | None) -> str | None:
        for (_, key), b in self.backend_ids.items():
            if b == bid:
                return key
        return None

    def __enter__(self) -> "Forwarder":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
