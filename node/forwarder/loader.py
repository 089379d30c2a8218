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

Tables are written into a fresh region of the flat tables array (a BPF_F_MMAPABLE array,
mapped only around the region being written, straight from the builder's compact index array
by node._maglev.write_ids), recorded in the VIP's spare slot and published by flipping the VIP's
active index with one aligned 32-bit store, so a packet never sees a half-written table; the
old region goes back to the allocator (tablespace.py). ``sync`` takes the names of the VIPs
that changed, so a reconcile touches only those; ``self_test`` takes the VIPs to check. Backend ids belong to (VIP name, backend key) pairs, are
recorded in a pinned name map (re-read on open) and are handed out cyclically, so an id freed
by a removed backend is not reused soon; the data path also refuses any id whose owner VIP
differs, so a stale id can only cause a counted drop, never a forward to another VIP's backend.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Literal

from node.config import ForwarderConfig, auto_table_capacity, tables_needed
from node.forwarder import build, libbpf, maps, model, packets
from node.forwarder import second_chance
from node.forwarder.maps import Stat
from node.forwarder.tablespace import NoRoom, TableSpace
from node.maglev import fill_gone

try:  # writes a table's ids straight into the mapped region; a Python loop otherwise
    from node import _maglev as _ext
except ImportError:  # pragma: no cover - exercised when the extension was not built
    _ext = None

log = logging.getLogger("maglev.forwarder")

PROG_NAME = "xdp_lb"
PROG_PIN = "prog_xdp_lb"
SELF_TEST_META = b"MLBT"  # any 4 bytes of XDP metadata mark a self-test packet
SELF_TEST_SRC = {4: "198.18.0.1", 6: "2001:2::1"}  # benchmarking ranges (RFC 2544 / 5180)
SELF_TEST_SPORT = 40000
SELF_TEST_BATCH = 32  # VIPs whose tables the self-test's model holds at once


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
    # The compact form (what the controller hands over): table_entries[j] indexes table_keys
    # (an array('I'), as the builder made it). Keys in table_gone left the pool since the
    # table was built: their entries take the backend of the next remaining entry
    # (_maglev.write_ids), a stop-gap until the exact table is built.
    table_keys: tuple[str, ...] = ()
    table_entries: Sequence[int] = ()
    table_gone: frozenset[str] = frozenset()
    # second chance (node/forwarder/second_chance.py): seconds a table change keeps naming
    # each moved entry's previous owner; 0 = off
    second_chance_window: float = 0.0

    def compact(self) -> tuple[tuple[str, ...], Sequence[int]]:
        """(keys, entries as indexes into keys)."""
        if self.table_keys:
            return self.table_keys, self.table_entries
        if not self.table:
            return (), array("I")
        keys = tuple(sorted(set(self.table)))
        index = {k: i for i, k in enumerate(keys)}
        return keys, array("I", [index[k] for k in self.table])

    @property
    def table_len(self) -> int:
        return len(self.table_entries) if self.table_keys else len(self.table)

    def entry_keys(self) -> list[str]:
        """The backend key of every entry as it will be written (tests, fakes, the trace)."""
        keys, entries = self.compact()
        if not keys:
            return []
        live = [None if k in self.table_gone else k for k in keys]
        return fill_gone([live[i] for i in entries])


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
    # A failure of the forwarder as a whole (not open, our program replaced, maps unreadable),
    # as opposed to some VIPs' checks failing: only the former withdraws every VIP.
    node_wide: bool = False


def write_ids(dest, entries: Sequence[int], idmap: array, live) -> bool:
    """dest[j] = idmap[entries[j]] as uint32 (0 in idmap: a backend that left; its entries take
    the next remaining entry's id). Returns whether dest differs from live (None: True)."""
    if _ext is not None:
        return _ext.write_ids(dest, entries, idmap, live)
    raw = array("I", fill_gone([idmap[i] for i in entries], 0)).tobytes()
    dest[:] = raw
    return live is None or bytes(live) != raw


def patch_ids(dest, entries: Sequence[int], before: array, after: array) -> int:
    """dest holds write_ids(entries, before); store only the entries that differ under
    after (see _maglev.patch_ids). Returns the number written."""
    if _ext is not None:
        return _ext.patch_ids(dest, entries, before, after)
    old, new = bytearray(len(entries) * 4), bytearray(len(entries) * 4)
    write_ids(old, entries, before, None)
    write_ids(new, entries, after, None)
    a, b = array("I"), array("I")
    a.frombytes(bytes(old))
    b.frombytes(bytes(new))
    written = 0
    with memoryview(dest) as view, view.cast("B").cast("I") as out:
        for j, (x, y) in enumerate(zip(a, b)):
            if x != y:
                out[j] = y
                written += 1
    return written


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


def _write_percpu(fd: int, key: int, values: list) -> None:
    stride = (C.sizeof(values[0]) + 7) & ~7
    buf = (C.c_uint8 * (stride * len(values)))()
    for i, v in enumerate(values):
        C.memmove(C.addressof(buf) + i * stride, C.addressof(v), C.sizeof(v))
    libbpf.update(fd, C.c_uint32(key), buf)


def read_filter(fd: int) -> list[int]:
    """The pre-filter's words (the one value of its map, maglev.h)."""
    words = (C.c_uint64 * maps.VIP_FILTER_WORDS)()
    libbpf.lookup(fd, C.c_uint32(0), words)
    return list(words)


def write_filter(fd: int, words: list[int]) -> None:
    """Write the whole filter in one update. A bit that changes may be seen late by a packet in
    flight (as if its VIP came or went a moment later); bits that do not change stay as they
    are throughout the copy."""
    libbpf.update(fd, C.c_uint32(0), (C.c_uint64 * maps.VIP_FILTER_WORDS)(*words))


def read_only(fd: int) -> list[int]:
    """vip_only's entries (the one value of its map, maglev.h)."""
    entries = (C.c_uint16 * maps.VIP_ONLY_ENTRIES)()
    libbpf.lookup(fd, C.c_uint32(0), entries)
    return list(entries)


def write_only(fd: int, entries: list[int]) -> None:
    """Write vip_only in one update, like the filter: an entry that changes may be seen late,
    one that does not stays as it is throughout the copy."""
    libbpf.update(fd, C.c_uint32(0), (C.c_uint16 * maps.VIP_ONLY_ENTRIES)(*entries))


def _read_percpu(fd: int, key: int, ctype, ncpu: int) -> list:
    stride = (C.sizeof(ctype) + 7) & ~7
    buf = (C.c_uint8 * (stride * ncpu))()
    libbpf.lookup(fd, C.c_uint32(key), buf)
    raw = bytes(buf)
    return [ctype.from_buffer_copy(raw[i * stride:i * stride + C.sizeof(ctype)]) for i in range(ncpu)]


class _BackendsOnDemand(dict):
    """The model's backends map for a self-test sample, read from the backends map entry by
    entry as the model asks: a VIP's check meets one backend, and reading all hundred of each
    sampled VIP's backends every round was a good part of a quiet node's CPU. Only the sampled
    VIPs' backends exist in it, as when they were all read up front."""

    def __init__(self, allowed: set[int], read) -> None:
        super().__init__()
        self._allowed, self._read = allowed, read

    def __missing__(self, bid: int):
        if bid not in self._allowed:
            raise KeyError(bid)
        self[bid] = value = self._read(bid)
        return value

    def get(self, bid, default=None):
        try:
            return self[bid]
        except KeyError:
            return default

    def __contains__(self, bid) -> bool:
        return bid in self._allowed


class _Windows:
    """Mappings of the tables array, WINDOW bytes each, reused while a region fits in one;
    at most KEEP idle ones stay mapped (a mapping a caller still reads is never closed)."""

    WINDOW = 4 << 20
    KEEP = 3

    def __init__(self, fd: int, total: int) -> None:
        page = mmap.PAGESIZE
        self.fd, self.total = fd, -(-total // page) * page
        self.open: list[list] = []  # [base, length, mmap, memoryview, readers]

    @contextmanager
    def view(self, start: int, end: int):
        win = next((w for w in self.open if w[0] <= start and end <= w[0] + w[1]), None)
        if win is None:
            win = self._map(start, end)
        win[4] += 1
        try:
            with win[3][start - win[0]:end - win[0]] as view:
                yield view
        finally:
            win[4] -= 1

    def _map(self, start: int, end: int) -> list:
        page = mmap.PAGESIZE
        base = start // page * page
        length = min(max(-(-(end - base) // page) * page, self.WINDOW), self.total - base)
        mm = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        win = [base, length, mm, memoryview(mm), 0]
        idle = [w for w in self.open if not w[4]]
        while len(idle) >= self.KEEP:
            self._unmap(idle.pop(0))
        self.open.append(win)
        return win

    def _unmap(self, win: list) -> None:
        self.open.remove(win)
        win[3].release()
        win[2].close()

    def close(self) -> None:
        for win in list(self.open):
            self._unmap(win)


_NO_BACKEND = (b"", 0, maps.BE_STATE_UNUSED, 0)  # a _be_mirror value: nothing written


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


def _prev_owner(vid: int, slot: int) -> tuple[int, str, int]:
    """The allocator's owner key of a slot's previous-owner region (second chance)."""
    return (vid, "prev", slot)


class Forwarder:
    """The XDP forwarder on this node's interfaces (one instance per controller)."""

    def __init__(self, config: ForwarderConfig, *, obj_path: str | Path | None = None,
                 table_capacity: int | None = maps.DEFAULT_TABLE_CAPACITY):
        """table_capacity None: sized from the VIPs (size_tables, before open)."""
        if table_capacity is not None and table_capacity % maps.TABLE_CHUNK:
            raise ForwarderError(f"table_capacity {table_capacity} must be a multiple of {maps.TABLE_CHUNK}")
        self.config = config
        self.obj_path = Path(obj_path) if obj_path else None
        self.auto_tables = table_capacity is None
        self.table_capacity = table_capacity or maps.DEFAULT_TABLE_CAPACITY
        self._tables_need = 0
        self.pin_dir = Path(config.bpffs)
        self._obj: libbpf.BpfObject | None = None
        self.fds: dict[str, int] = {}
        self.prog_fd = -1
        self._own_fds: list[int] = []
        self._meta_mm: mmap.mmap | None = None
        self._sc_mm: mmap.mmap | None = None  # sc_meta (second chance)
        self._ct_mm: mmap.mmap | None = None  # "direct" only (an LRU hash cannot be mmapped)
        self.conntrack = config.conntrack
        self._ncpu = libbpf.num_possible_cpus()
        self.ct_entries = maps.ct_entries(config.conntrack_size, self.conntrack, self._ncpu)
        self.vip_ids: dict[str, int] = {}
        self.backend_ids: dict[tuple[str, str], int] = {}
        self._vip_backends: dict[str, dict[str, int]] = {}  # vip -> backend key -> id
        self._used_ids: set[int] = set()
        self._be_mirror: dict[int, tuple[bytes, int, int, int]] = {}  # id -> (addr, family, state, vip id)
        # vip id -> (entries array, idmap) its live table was written from: lets a stop-gap
        # patch the live table in place (see _write_spec_table)
        self._live_from: dict[int, tuple[Sequence[int], array]] = {}
        self._named: dict[int, str] = {}  # vip id -> name written to vip_names
        self._next_be = 1
        self.space = TableSpace(table_capacity)
        self._attached: dict[str, tuple[int, str]] = {}  # ifname -> (ifindex, mode)
        self._runner: libbpf.TestRun | None = None
        self._filter: list[int] = []  # vip_addrs words as written
        self._only: list[int] = []  # vip_only entries as written
        self._frag_keys: dict[tuple[int, bytes, int], int] = {}  # fragment keys in vips
        # What the pre-filter and fragment keys were last made from (VIP keys written so far,
        # the VIP ids): a sync that changed no VIP key skips the O(VIPs) recomputation.
        self._keys_written = 0
        self._addresses_from: tuple | None = None
        self._windows: _Windows | None = None  # during a sync: shared table mappings
        # What this process last wrote, from which spec: a sync skips the backends and VIP
        # keys whose spec is equal (a backend shared by every VIP going down changes one
        # backend per VIP; the other nine were converted and compared again each time).
        self._be_specs: dict[tuple[str, str], BackendSpec] = {}
        self._keys_from: dict[int, tuple] = {}
        self._lock = threading.RLock()  # see _one_at_a_time

    # ---- open / close ----------------------------------------------------------------------

    def size_tables(self, need: int) -> None:
        """With an automatic table_capacity: make the tables map fit ``need`` entries (and a
        quarter more) at open. A pinned map that is too small is replaced by a larger copy,
        so the tables packets use now stay valid."""
        if self.auto_tables:
            self._tables_need = need
            self.table_capacity = auto_table_capacity(need)

    def open(self) -> None:
        """Load the program re-using pinned maps, pin what is new, read the ids back."""
        if self._obj is not None:
            return
        mount_bpffs(self.pin_dir)
        obj = libbpf.BpfObject(self.obj_path or build.build(build.FORWARDER_OBJECTS[self.conntrack]))
        old_tables = None  # a pinned tables map too small for the VIPs: copied into a new one
        try:
            obj.set_max_entries("conntrack", self.ct_entries)
            if self.conntrack == "lru":
                with contextlib.suppress(KeyError):  # absent: the other design's object (refused below)
                    obj.set_max_entries(maps.CT_V4, self.ct_entries)
            wanted = self.table_capacity
            for name in maps.map_names(self.conntrack):
                pin = self.pin_dir / name
                if pin.exists():
                    fd = libbpf.obj_get(pin)
                    self._own_fds.append(fd)
                    if self._replaced_derived(name, fd):
                        continue
                    self._check_pinned(name, fd)
                    if name == "tables" and self.auto_tables and self.table_capacity < self._tables_need:
                        old_tables = (fd, self.table_capacity)
                        self.table_capacity = wanted
                        continue
                    obj.reuse_map_fd(maps.obj_map_name(name), fd)
            obj.set_max_entries("tables", self.table_capacity // maps.TABLE_CHUNK)
            obj.load()
            self._check_object(obj)
        except Exception:
            obj.close()
            self._close_own_fds()
            raise
        self._obj = obj
        # pins of a version before conntrack_v4: its IPv4 flows are in `conntrack`
        older_pins = (self.pin_dir / "conntrack").exists() and not (self.pin_dir / maps.CT_V4).exists()
        self.fds = {name: obj.map_fd(maps.obj_map_name(name)) for name in maps.map_names(self.conntrack)}
        if old_tables is not None:
            self._copy_tables(*old_tables)
            (self.pin_dir / "tables").unlink()
            log.warning("tables map grown from %d to %d entries (the VIPs need %d)",
                        old_tables[1], self.table_capacity, self._tables_need)
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
        if older_pins and self.conntrack == "lru":
            self._move_v4_flows()
        self._write_config()
        self._read_back()
        self._load_addresses()
        self._sync_addresses(self.vip_ids.values())  # pins of an older version lack them
        self._runner = libbpf.TestRun(self.prog_fd, 4096)

    def _copy_tables(self, old_fd: int, old_capacity: int) -> None:
        """Copy a smaller tables map into the new one, before the new program is attached
        (the old one keeps reading the old map until then), in 4 MiB windows."""
        page, step = mmap.PAGESIZE, 1 << 20
        for off in range(0, old_capacity, step):
            n = min(step, old_capacity - off)
            length = -(-n * 4 // page) * page
            src = mmap.mmap(old_fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=off * 4)
            try:
                with self._table_window(off, n) as dest:
                    dest[:] = src[:n * 4]
            finally:
                src.close()

    def _check_object(self, obj: libbpf.BpfObject) -> None:
        """The loaded object (obj_path may name any) must be built for the configured design."""
        kind = libbpf.map_info(obj.map_fd("conntrack")).type
        if kind != maps.CT_MAP_TYPES[self.conntrack]:
            other = next((m for m, t in maps.CT_MAP_TYPES.items() if t == kind), f"map type {kind}")
            raise ForwarderError(
                f"BPF object {self.obj_path} keeps conntrack as {other!r} but forwarder.conntrack is "
                f"{self.conntrack!r}; use the {build.FORWARDER_OBJECTS[self.conntrack]} object")

    def _replaced_derived(self, name: str, fd: int) -> bool:
        """A pinned counter map or pre-filter of an older layout (vip_stats/be_stats with
        ct_misses and per-packet VIP counts; stats with fewer reasons; vip_addrs with one word
        per element) is unlinked so a fresh one is pinned: the counters restart at zero
        (Prometheus sees a reset), the filter is rebuilt from the VIPs at open; flows, tables
        and backends are kept."""
        if name not in (*maps.COUNTER_MAPS, *maps.COUNTER_LENGTHS, *maps.REBUILT_MAPS):
            return False
        info = libbpf.map_info(fd)
        shape = maps.map_shape(name, self.conntrack)
        length = maps.COUNTER_LENGTHS.get(name)
        if length is not None:  # fewer reasons, same layout: replaced; any other shape: refused
            if ((info.type, info.key_size, info.value_size) != (maps.BPF_MAP_TYPE_PERCPU_ARRAY, *shape)
                    or info.max_entries == length):
                return False
        elif (info.key_size, info.value_size) == shape:
            return False
        what = "rebuilt from the VIPs" if name in maps.REBUILT_MAPS else "its counters restart at zero"
        log.warning("pinned map %s has %d %d-byte values (an older version's layout), this version "
                    "needs %d of %d: replaced, %s", self.pin_dir / name, info.max_entries, info.value_size,
                    length or info.max_entries, shape[1], what)
        (self.pin_dir / name).unlink()
        return True

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
        if name in (maps.CT_V4, "conntrack") and info.max_entries != self.ct_entries:
            log.warning("pinned conntrack map has %d entries, config asks %d (conntrack_size %d%s); "
                        "keeping the pinned one (remove %s to resize; that forgets every tracked flow)",
                        info.max_entries, self.ct_entries, self.config.conntrack_size,
                        " rounded up to a power of two" if self.conntrack == "direct" else "",
                        self.pin_dir / name)
        if name in (maps.CT_V4, "conntrack") and info.map_flags & maps.BPF_F_NO_COMMON_LRU:
            log.warning("pinned conntrack map %s has per-CPU LRU lists (made by an older version): "
                        "each CPU holds only %d of its %d flows; keeping it with its tracked flows "
                        "(remove it to get one shared LRU; that forgets every tracked flow)",
                        self.pin_dir / name, info.max_entries // self._ncpu, info.max_entries)
        fixed = {"vip_meta": maps.MAX_VIPS, "vip_names": maps.MAX_VIPS,
                 "vip_stats": maps.MAX_VIPS, "backends": maps.MAX_BACKENDS, "be_names": maps.MAX_BACKENDS,
                 "be_stats": maps.MAX_BACKENDS}
        if name in fixed and info.max_entries != fixed[name]:
            raise ForwarderError(
                f"pinned map {self.pin_dir / name} has {info.max_entries} entries, this version needs "
                f"{fixed[name]} (MAX_VIPS / MAX_BACKENDS in maglev.h): it was made by an older version. "
                + advice)
        if name == "tables":
            self.table_capacity = info.max_entries * maps.TABLE_CHUNK

    def _mmap(self) -> None:
        page = mmap.PAGESIZE
        meta_len = (maps.MAX_VIPS * C.sizeof(maps.VipMeta) + page - 1) // page * page
        self._meta_mm = mmap.mmap(self.fds["vip_meta"], meta_len, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        sc_len = (maps.MAX_VIPS * C.sizeof(maps.ScMeta) + page - 1) // page * page
        self._sc_mm = mmap.mmap(self.fds["sc_meta"], sc_len, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # The tables array is mapped only around the region being read or written
        # (_table_window): a mapping of all of it would count every table in this process's RSS.
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

    def _sc(self, vid: int) -> maps.ScMeta:
        return maps.ScMeta.from_buffer(self._sc_mm, vid * C.sizeof(maps.ScMeta))

    def _read_back(self) -> None:
        """Rebuild the name -> id maps from the pinned maps (a restarted controller)."""
        self.vip_ids.clear()
        self.backend_ids.clear()
        self._vip_backends.clear()
        self._used_ids.clear()
        self._be_mirror.clear()
        self._live_from.clear()
        self._named.clear()
        self._be_specs.clear()
        self._keys_from.clear()
        self.space = TableSpace(self.table_capacity)
        names = maps.Name()
        for vid in range(maps.MAX_VIPS):
            m = self._meta(vid)
            if m.in_use:
                libbpf.lookup(self.fds["vip_names"], C.c_uint32(vid), names)
                self.vip_ids[_name_text(bytes(names))] = vid
                live = m.slot[m.active & 1]  # the other slot is a released (or staged) region
                if live.size:
                    self.space.take((vid, m.active & 1), live.offset, live.size)
                sc = self._sc(vid)
                if live.size and sc.prev[m.active & 1]:
                    self.space.take(_prev_owner(vid, m.active & 1), sc.prev[m.active & 1] - 1, live.size)
        be = maps.Backend()
        top = 0
        for bid in range(1, maps.MAX_BACKENDS):
            libbpf.lookup(self.fds["backends"], C.c_uint32(bid), be)
            if be.state != maps.BE_STATE_UNUSED:
                self._be_mirror[bid] = (bytes(be.addr), be.family, be.state, be.vip_id)
                libbpf.lookup(self.fds["be_names"], C.c_uint32(bid), names)
                vip, _, key = _name_text(bytes(names)).partition("\0")
                self._own_backend(vip, key, bid)
                top = bid
        self._next_be = top + 1 if top + 1 < maps.MAX_BACKENDS else 1

    def _close_own_fds(self) -> None:
        for fd in self._own_fds:
            os.close(fd)
        self._own_fds.clear()

    def close(self) -> None:
        """Release this process's handles; pins and any attachment stay (restart-safe)."""
        self._runner = None
        for mm in (self._meta_mm, self._sc_mm, self._ct_mm):
            if mm is not None:
                mm.close()
        self._meta_mm = self._sc_mm = self._ct_mm = None
        if self._obj is not None:
            self._obj.close()
            self._obj = None
        self._close_own_fds()
        self.fds = {}
        self.prog_fd = -1

    def remove_pins(self) -> None:
        """Forget all state: unlink every pin (tests, and `on_stop: detach` with a clean slate)."""
        for name in (*maps.ALL_MAP_NAMES, PROG_PIN):
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
    def sync(self, vips: Sequence[VipSpec], changed: Iterable[str] | None = None) -> None:
        """Make the maps match ``vips`` exactly (idempotent). ``changed``: the names of the VIPs
        whose spec differs from the last sync (None: all of them); the others are trusted to be
        in the maps as last written, so the work is proportional to the change. Order matters
        for packets in flight: backends gain service before tables flip, lose it after."""
        self._require_open()
        with self._batched_windows():
            try:
                self._sync(vips, changed)
            except BaseException:
                self._be_specs.clear()  # unsure what was written: convert everything again
                self._keys_from.clear()
                self._live_from.clear()  # a table may be staged, not flipped: write them afresh
                raise

    def _sync(self, vips: Sequence[VipSpec], changed: Iterable[str] | None) -> None:
        self.expire_second_chance()
        wanted = {v.name: v for v in vips}
        todo = list(vips) if changed is None else [wanted[n] for n in sorted(set(changed)) if n in wanted]
        self._validate(vips, todo)
        later: list[tuple[int, int]] = []  # (backend id, state) to apply after the flips
        stale: list[tuple[str, str, int]] = []
        for v in todo:
            vid = self._vip_id(v.name)
            ids = {}
            for b in v.backends:
                pair = (v.name, b.key)
                if self._be_specs.get(pair) == b:  # written from an equal spec: nothing to do
                    ids[b.key] = self.backend_ids[pair]
                    continue
                bid, deferred = self._put_backend(v.name, vid, b)
                ids[b.key] = bid
                self._be_specs[pair] = b  # final once `later` is applied, below
                if deferred is not None:
                    later.append((bid, deferred))
            self._write_spec_table(vid, v, ids)
            self._put_vip_key(vid, v)
            if self._named.get(vid) != v.name:
                libbpf.update(self.fds["vip_names"], C.c_uint32(vid), self._name(maps.encode_name(v.name)))
                self._named[vid] = v.name
            self._meta(vid).in_use = 1
            stale += [(v.name, k, bid) for k, bid in self._vip_backends.get(v.name, {}).items() if k not in ids]
        for bid, state in later:
            self._set_state(bid, state)
        self._sync_addresses([self.vip_ids[n] for n in wanted])
        # Removed VIPs stop matching before their backends disappear: packets pass to the
        # kernel rather than meeting a table of freed ids.
        for name in [n for n in self.vip_ids if n not in wanted]:
            self._remove_vip(name)
            stale += [(name, k, bid) for k, bid in self._vip_backends.get(name, {}).items()]
        for vip, key, bid in stale:
            self._free_backend(vip, key, bid)

    def _validate(self, vips: Sequence[VipSpec], todo: Sequence[VipSpec] | None = None) -> None:
        """Every VIP's name, identity and size (cheap); backends and tables of ``todo`` only
        (the others were validated when they changed)."""
        seen: set[str] = set()
        idents: dict[tuple, str] = {}
        nbackends = 0
        for v in vips:
            where = f"VIP {v.name!r}"
            if v.name in seen:
                raise ForwarderError(f"{where} is listed twice")
            seen.add(v.name)
            ident = (str(v.address), v.protocol, v.port)
            if ident in idents:
                raise ForwarderError(f"{where} has the same address/protocol/port as VIP {idents[ident]!r}")
            idents[ident] = v.name
            nbackends += len(v.backends)
        for v in vips if todo is None else todo:
            self._validate_one(v)
        if len(vips) > maps.MAX_VIPS:
            raise ForwarderError(f"{len(vips)} VIPs exceed the data path's limit of {maps.MAX_VIPS} "
                                 "(MAX_VIPS in maglev.h)")
        if nbackends > maps.MAX_BACKENDS - 1:
            raise ForwarderError(f"{nbackends} VIP backends exceed the data path's limit of "
                                 f"{maps.MAX_BACKENDS - 1} (MAX_BACKENDS in maglev.h)")
        # with second chance, a VIP also keeps its entries' previous owners (a region as large)
        need = tables_needed([n for v in vips for n in (v.table_len,) * (2 if v.second_chance_window else 1)])
        if need > self.table_capacity:
            raise ForwarderError(
                f"tables need {need} entries (every VIP's table, twice with second chance, plus room to rebuild the largest) "
                f"but the tables map holds {self.table_capacity}; use smaller table sizes or a "
                "larger table_capacity")

    @staticmethod
    def _validate_one(v: VipSpec) -> None:
        where = f"VIP {v.name!r}"
        if len(maps.encode_name(v.name)) > 200:
            raise ForwarderError(f"{where}: name too long")
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
        table_keys, entries = v.compact()
        for k in table_keys:
            if k in v.table_gone:
                continue
            if k not in keys:
                raise ForwarderError(f"{where}: table names backend {k!r}, which is not in its backends")
            if keys[k].state != "active":
                raise ForwarderError(
                    f"{where}: table names backend {k!r} in state {keys[k].state}; only active "
                    "backends may take new flows (rebuild the table without it)")
        if table_keys and all(k in v.table_gone for k in table_keys):
            raise ForwarderError(f"{where}: every backend of its table is gone; send an empty table")
        if len(entries) >= 1 << 31:
            raise ForwarderError(f"{where}: table too large")

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
        sc = self._sc(vid)
        sc.prev[0] = sc.prev[1] = 0
        sc.until_ns = 0
        _zero_percpu(self.fds["vip_stats"], vid, C.sizeof(maps.FlowStats), self._ncpu)
        self.vip_ids[name] = vid
        return vid

    def _put_vip_key(self, vid: int, v: VipSpec) -> None:
        ident = (v.name, v.address, v.protocol, v.port)
        if self._keys_from.get(vid) == ident:
            return  # written from the same identity by this process
        key = maps.vip_key(v.address, v.protocol, v.port)
        m = self._meta(vid)
        if m.in_use and bytes(m.key) == bytes(key) and self._named.get(vid) == v.name:
            self._keys_from[vid] = ident
            return  # written by this process already (the self-test proves it is there)
        if m.in_use and bytes(m.key) != bytes(key):
            libbpf.delete(self.fds["vips"], m.key)  # the VIP's address/protocol/port changed
        libbpf.update(self.fds["vips"], key, maps.VipValue(vip_id=vid))
        C.memmove(C.addressof(m.key), C.addressof(key), C.sizeof(key))
        self._keys_written += 1
        self._keys_from[vid] = ident

    # ---- address pre-filter and fragment keys (maglev.h) ---------------------------------

    def _load_addresses(self) -> None:
        """Read back the pre-filter words and the fragment keys the maps hold now."""
        self._addresses_from = None
        self._filter[:] = read_filter(self.fds["vip_addrs"])
        self._only[:] = read_only(self.fds["vip_only"])
        self._frag_keys.clear()
        val = maps.VipValue()
        for key in libbpf.keys(self.fds["vips"], maps.VipKey):
            if key.family & maps.VIP_KEY_FRAG and libbpf.lookup(self.fds["vips"], key, val):
                self._frag_keys[(key.family & ~maps.VIP_KEY_FRAG, bytes(key.addr), key.proto)] = val.vip_id

    def _sync_addresses(self, vids) -> None:
        """Make the pre-filter, vip_only and the fragment keys match the VIPs ``vids`` (whose
        keys are written). Run before removed VIPs' keys go, so no fragment key names a removed
        VIP; a filter bit set late or cleared early only sends that address's packets to the
        kernel, as if the VIP did not exist yet or any more. A vip_only entry set late or
        cleared early only costs a vips lookup; one cleared late (a second VIP's key is written
        just before) can steer that VIP's packets by the first a moment longer, as if the
        second came a moment later."""
        vids = list(vids)
        signature = (self._keys_written, vids)
        if signature == self._addresses_from:
            return  # the same VIPs with the same keys as last time: the words are right
        keys = []
        for vid in vids:
            k = self._meta(vid).key
            keys.append((k.family, bytes(k.addr), int.from_bytes(bytes(k.port_be), "big"), k.proto, vid))
        words = maps.vip_filter_words((fam, addr) for fam, addr, *_ in keys)
        if words != self._filter:
            write_filter(self.fds["vip_addrs"], words)
            self._filter[:] = words
        only = [0] * maps.VIP_ONLY_ENTRIES
        for i, v in maps.vip_only_entries(keys).items():
            only[i] = v
        if only != self._only:
            write_only(self.fds["vip_only"], only)
            self._only[:] = only
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
        self._addresses_from = signature

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
        deferred = None
        if bid is None:
            bid = self._alloc_backend()
            _zero_percpu(self.fds["be_stats"], bid, C.sizeof(maps.FlowStats), self._ncpu)
            libbpf.update(self.fds["be_names"], C.c_uint32(bid), self._name(maps.backend_name(vip, b.key)))
            self._own_backend(vip, b.key, bid)
            state = want
        else:
            state = want
            cur_state = self._be_mirror.get(bid, _NO_BACKEND)[2]
            if want != maps.BE_STATE_ACTIVE and cur_state == maps.BE_STATE_ACTIVE:
                state, deferred = cur_state, want  # leave the tables first
        self._write_backend(bid, (raw, fam, state, vid))
        return bid, deferred

    def _write_backend(self, bid: int, value: tuple[bytes, int, int, int]) -> None:
        """Write a backends entry unless it already holds value; a mirror of what this process
        wrote (read back at open) saves a lookup per backend."""
        if self._be_mirror.get(bid) == value:
            return
        raw, fam, state, vid = value
        new = maps.Backend(family=fam, state=state, vip_id=vid)
        new.addr[:] = raw
        libbpf.update(self.fds["backends"], C.c_uint32(bid), new)
        self._be_mirror[bid] = value

    def _set_state(self, bid: int, state: int) -> None:
        raw, fam, _, vid = self._be_mirror[bid]
        self._write_backend(bid, (raw, fam, state, vid))

    def _own_backend(self, vip: str, key: str, bid: int) -> None:
        self.backend_ids[(vip, key)] = bid
        self._vip_backends.setdefault(vip, {})[key] = bid
        self._used_ids.add(bid)

    def _alloc_backend(self) -> int:
        n = maps.MAX_BACKENDS - 1
        for i in range(n):
            bid = (self._next_be - 1 + i) % n + 1
            if bid not in self._used_ids:
                self._next_be = bid + 1 if bid + 1 < maps.MAX_BACKENDS else 1
                return bid
        raise ForwarderError(f"no free backend id (limit {n}, MAX_BACKENDS in maglev.h)")

    def _free_backend(self, vip: str, key: str, bid: int) -> None:
        self._be_specs.pop((vip, key), None)
        vid = self.vip_ids.get(vip)
        if vid is not None:
            self._retire_counts(vid, bid)
        libbpf.update(self.fds["backends"], C.c_uint32(bid), maps.Backend())
        libbpf.update(self.fds["be_names"], C.c_uint32(bid), maps.Name())
        self._be_mirror.pop(bid, None)
        del self.backend_ids[(vip, key)]
        own = self._vip_backends.get(vip, {})
        own.pop(key, None)
        if not own:
            self._vip_backends.pop(vip, None)
        self._used_ids.discard(bid)

    def _retire_counts(self, vid: int, bid: int) -> None:
        """Add backend id bid's counts to its VIP's vip_stats before the id is freed (and
        zeroed when it is given out again), CPU by CPU: the VIP's figures, vip_stats plus its
        live backend ids, stay what they were. A packet the old program counts on bid after
        this read is lost from the VIP's figures (the id is already out of its tables)."""
        n = self._ncpu
        be = _read_percpu(self.fds["be_stats"], bid, maps.FlowStats, n)
        acc = _read_percpu(self.fds["vip_stats"], vid, maps.FlowStats, n)
        for a, b in zip(acc, be):
            for f in maps.STORED_STAT_FIELDS:
                setattr(a, f, getattr(a, f) + getattr(b, f))
        _write_percpu(self.fds["vip_stats"], vid, acc)

    def _remove_vip(self, name: str) -> None:
        vid = self.vip_ids.pop(name)
        self._keys_from.pop(vid, None)
        m = self._meta(vid)
        libbpf.delete(self.fds["vips"], m.key)
        m.in_use = 0
        m.slot[0].size = m.slot[1].size = 0
        self._live_from.pop(vid, None)
        self._named.pop(vid, None)
        sc = self._sc(vid)
        sc.prev[0] = sc.prev[1] = 0
        self.space.release((vid, 0))
        self.space.release((vid, 1))
        self.space.release(_prev_owner(vid, 0))
        self.space.release(_prev_owner(vid, 1))
        libbpf.update(self.fds["vip_names"], C.c_uint32(vid), maps.Name())

    # ---- tables ---------------------------------------------------------------------------

    @contextmanager
    def _table_window(self, offset: int, size: int):
        """A writable view of entries [offset, offset + size) of the tables array, mapped for
        the duration of the block only (or, during a sync, taken from its shared windows)."""
        page = mmap.PAGESIZE
        start, end = offset * 4, (offset + size) * 4
        if self._windows is not None:
            with self._windows.view(start, end) as view:
                yield view
            return
        base = start // page * page
        length = -(-(end - base) // page) * page
        mm = mmap.mmap(self.fds["tables"], length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                       offset=base)
        try:
            with memoryview(mm) as whole, whole[start - base:end - base] as view:
                yield view
        finally:
            mm.close()

    @contextmanager
    def _batched_windows(self):
        """For one sync: the tables array is mapped a few MiB at a time, each mapping reused
        by the regions that fall inside it, instead of one mmap and munmap per table (a
        backend shared by 1000 VIPs going down made 1000 of each). Few are open at once, so
        RSS stays near what per-table mappings cost."""
        self._windows = _Windows(self.fds["tables"], self.table_capacity * 4)
        try:
            yield
        finally:
            self._windows.close()
            self._windows = None

    def table_ids(self, vid: int) -> list[int]:
        """The active table of a VIP as backend ids (read back from the map)."""
        return self._live_table(vid).tolist()

    def _live_table(self, vid: int) -> array:
        m = self._meta(vid)
        s = m.slot[m.active & 1]
        a = array("I")
        if s.size:
            with self._table_window(s.offset, s.size) as view:
                a.frombytes(view)
        return a

    def _write_spec_table(self, vid: int, v: VipSpec, ids: dict[str, int]) -> bool:
        keys, entries = v.compact()
        idmap = array("I", [0 if k in v.table_gone else ids[k] for k in keys])
        if v.table_gone and self._patch_in_place(vid, entries, idmap):
            return True
        spare = self._stage(vid, len(entries), lambda dest, live: write_ids(dest, entries, idmap, live))
        if spare is None:  # the live table holds exactly this already
            self._live_from[vid] = (entries, idmap)
            return False
        self._stage_previous_owners(vid, spare, v.second_chance_window)
        self.flip_table(vid, spare)
        self._live_from[vid] = (entries, idmap)  # only once it is the live one
        return True

    # ---- second chance (node/forwarder/second_chance.py, bpf/second_chance.h) ---------------

    def _stage_previous_owners(self, vid: int, spare: int, window: float) -> None:
        """Write the previous owners of the staged table's entries in a region of their own and
        record it in the spare slot (published by the flip with the table). Never refuses the
        table change: without room, the VIP goes without second chance and a warning says so."""
        m, sc = self._meta(vid), self._sc(vid)
        active = spare ^ 1
        sc.prev[spare] = 0
        self.space.release(_prev_owner(vid, spare), quarantine=False)
        cur, new = m.slot[active], m.slot[spare]
        if window <= 0 or not cur.size or cur.size != new.size:
            return
        now = time.monotonic_ns()
        old, fresh = self._read_ids(cur.offset, cur.size), self._read_ids(new.offset, new.size)
        carried = None
        if sc.prev[active] and now < sc.until_ns:
            carried = self._read_ids(sc.prev[active] - 1, cur.size)
        prev = second_chance.previous_owners(old, fresh, carried)
        if not any(prev):
            return
        try:
            off = self.space.alloc(_prev_owner(vid, spare), len(prev))
        except NoRoom:
            log.warning("VIP %s: no room in the tables map for its previous owners; this table "
                        "change goes without second chance (raise table_capacity)", self._named.get(vid, vid))
            return
        with self._table_window(off, len(prev)) as dest:
            dest[:] = prev.tobytes()
        sc.prev[spare] = off + 1
        sc.until_ns = now + second_chance.window_ns(window)

    def _read_ids(self, offset: int, size: int) -> array:
        a = array("I")
        with self._table_window(offset, size) as view:
            a.frombytes(view)
        return a

    def expire_second_chance(self, now_ns: int | None = None) -> int:
        """Give back the previous-owner regions whose window closed (the data path already
        ignores them: this only frees room). Returns how many were released."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        released = 0
        for vid in list(self.vip_ids.values()):
            active = self._meta(vid).active & 1
            sc = self._sc(vid)
            if sc.prev[active] and now >= sc.until_ns:
                sc.prev[active] = 0
                self.space.release(_prev_owner(vid, active))
                released += 1
        return released

    def _drop_all_previous_owners(self) -> bool:
        """Make room for a table: second chance yields to the tables themselves."""
        dropped = False
        for vid in list(self.vip_ids.values()):
            sc = self._sc(vid)
            for slot in (0, 1):
                if sc.prev[slot]:
                    sc.prev[slot] = 0
                    self.space.release(_prev_owner(vid, slot))
                    dropped = True
        if dropped:
            log.warning("tables map full: previous owners of every VIP dropped (second chance "
                        "off until the next change); raise table_capacity")
        return dropped

    def _patch_in_place(self, vid: int, entries: Sequence[int], idmap: array) -> bool:
        """A stop-gap over the table that is live: only the entries of the backends that left
        change, each with one aligned 32-bit store (a packet meets the entry's old or new
        backend, both valid for the VIP; the old one stays in service until after the sync),
        worked out from the builder's compact entries, so a backend shared by every VIP leaves
        every table with a few thousand stores each. Only when the live table was written
        from the same build with the same ids; False otherwise."""
        last = self._live_from.get(vid)
        if last is None or last[0] is not entries or len(last[1]) != len(idmap):
            return False
        before = last[1]
        if any(now and now != was for now, was in zip(idmap, before)):
            return False  # a remaining backend's id changed: write the table afresh
        m = self._meta(vid)
        live = m.slot[m.active & 1]
        if live.size != len(entries) or not any(idmap):
            return False
        with self._table_window(live.offset, live.size) as view:
            patch_ids(view, entries, before, idmap)
        self._live_from[vid] = (entries, idmap)
        return True

    def _known_live(self, gone: dict[str, Iterable[str]]):
        """(vip, vip id, keys, entries, backend id per index) of each VIP of ``gone`` whose
        live table this process wrote from a build it knows (the stop-gap's inputs)."""
        for vip, keys in gone.items():
            vid = self.vip_ids.get(vip)
            last = self._live_from.get(vid) if vid is not None else None
            if last is not None:
                yield vip, vid, keys, *last

    @_one_at_a_time
    def stop_serving(self, gone: dict[str, Iterable[str]]) -> list[str]:
        """The stop-gap in the data path, at once (node.stop_gaps): each active backend of
        ``gone[vip]`` (keys) is set to drain. A table entry naming a draining backend stands
        for the next entry whose backend is active (maglev.h: STOP_GAP_STEPS), the rule of
        maglev.StopGapTable, so one store per (VIP, backend) takes the backend out of every
        table that names it, however many, before any table is rewritten (drop_from_tables
        follows). Drain, not down: its tracked flows stay until the sync applies the decision
        (which moves them if it is down). A VIP that would lose more than half of its active
        backends is left to drop_from_tables (with equal weights, a run of more than
        STOP_GAP_STEPS lost entries is then below one in 2^32), and so is one whose live table
        this process did not write. The next sync writes these backends from the decision again,
        whatever it says. Returns the VIPs whose backends were set to drain."""
        self._require_open()
        done = []
        for vip, _, keys, _, idmap in self._known_live(gone):
            serving = {b for b in idmap if self._be_mirror.get(b, _NO_BACKEND)[2] == maps.BE_STATE_ACTIVE}
            stopping = [(self.backend_ids.get((vip, k)), k) for k in keys]
            stopping = [(bid, k) for bid, k in stopping if bid in serving]
            # More than half of its serving backends at once: runs of their entries could pass
            # STOP_GAP_STEPS (and be dropped), so that VIP waits for its table patch instead.
            if not stopping or 2 * len(stopping) > len(serving):
                continue
            for bid, key in stopping:
                self._set_state(bid, maps.BE_STATE_DRAIN)
                self._be_specs.pop((vip, key), None)  # the next sync writes the decision's state
            done.append(vip)
        return done

    @_one_at_a_time
    def drop_from_tables(self, gone: dict[str, Iterable[str]]) -> list[str]:
        """The stop-gap at once, before any decision is made again (node.stop_gaps): for each
        VIP, the entries of the backends ``gone[vip]`` (keys) in its live table take the
        backend of the next entry (cyclically) that remains, the rule of maglev.StopGapTable,
        a pure function of the live table, so every node writes the same. Each entry is one
        aligned 32-bit store, as in _patch_in_place; every table goes in one C call
        (_maglev.patch_tables, a window of the map at a time, without the interpreter lock).
        Only a live table this process wrote from a build it knows is touched, and only while
        some backend of it remains; the backends' states (stop_serving's) and every other map
        stay as they are (the next sync makes them match the decision, and finds these tables
        patched already). Returns the VIPs whose tables changed."""
        self._require_open()
        jobs = []
        for vip, vid, keys, entries, before in self._known_live(gone):
            meta = self._meta(vid)
            live = meta.slot[meta.active & 1]
            after = array("I", before)
            for key in keys:
                bid = self.backend_ids.get((vip, key))
                if bid is not None and bid in after:
                    after[after.index(bid)] = 0
            if not live.size or live.size != len(entries) or after == before or not any(after):
                continue
            jobs.append((live.offset, entries, before, after, vid, vip))
        if not jobs:
            return []
        jobs.sort(key=lambda job: job[0])
        try:
            self._patch_tables([job[:4] for job in jobs])
        except BaseException:
            for job in jobs:  # unsure how far it got: the next sync writes these afresh
                self._live_from.pop(job[4], None)
            raise
        for _, entries, _, after, vid, _ in jobs:
            self._live_from[vid] = (entries, after)
        return [job[5] for job in jobs]

    def _patch_tables(self, jobs: list[tuple[int, Sequence[int], array, array]]) -> None:
        """patch_ids over many live tables: (offset, entries, before, after) each, sorted by
        offset. One C call, without the interpreter lock (a second thread sharing the batch
        was no faster here: the cost is the memory the stores touch, ~80 us a 65537-entry
        table on this VM, not the arithmetic)."""
        if _ext is not None and hasattr(_ext, "patch_tables"):
            _ext.patch_tables(self.fds["tables"], self.table_capacity * 4, jobs)
            return
        with self._batched_windows():
            for offset, entries, before, after in jobs:
                with self._table_window(offset, len(entries)) as view:
                    patch_ids(view, entries, before, after)

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
        new = array("I", ids).tobytes()

        def fill(dest, live) -> bool:
            dest[:] = new
            return live is None or bytes(live) != new
        return self._stage(vid, len(ids), fill)

    def _stage(self, vid: int, size: int, fill) -> int | None:
        """Fill a fresh region of ``size`` entries (fill(dest, live view or None) -> differs)
        and record it in the spare slot; None (and the region given back) when it equals the
        live table."""
        m = self._meta(vid)
        active = m.active & 1
        spare = active ^ 1
        cur = m.slot[active]
        m.slot[spare].size = 0
        self.space.release((vid, spare), quarantine=False)  # staged earlier, never published
        self._sc(vid).prev[spare] = 0  # a stale region must not be published with this table
        self.space.release(_prev_owner(vid, spare), quarantine=False)
        if not size:
            return None if not cur.size else spare
        try:
            off = self.space.alloc((vid, spare), size)
        except NoRoom as exc:
            if not self._drop_all_previous_owners():
                raise ForwarderError(f"{exc} in the tables map; raise table_capacity") from None
            try:
                off = self.space.alloc((vid, spare), size)
            except NoRoom as exc2:
                raise ForwarderError(f"{exc2} in the tables map; raise table_capacity") from None
        with self._table_window(off, size) as dest:
            if cur.size == size:
                with self._table_window(cur.offset, cur.size) as live:
                    differs = fill(dest, live)
            else:
                differs = fill(dest, None)
        if not differs:
            self.space.release((vid, spare), quarantine=False)
            return None
        m.slot[spare].offset = off
        m.slot[spare].size = size
        return spare

    def flip_table(self, vid: int, slot: int) -> None:
        """Publish a staged slot: one aligned 32-bit store, after the table and slot are in
        place (x86-64 and arm64 keep a single aligned store atomic; the data path reads the
        index once per packet). The old table's region goes back to the allocator, which keeps
        it out of use for a grace period (packets that read the old slot may still be on it)."""
        C.c_uint32.from_buffer(self._meta_mm, vid * C.sizeof(maps.VipMeta)).value = slot
        self._live_from.pop(vid, None)  # written by the caller (_write_spec_table) if it knows
        # The old slot keeps its {offset, size} (a packet may be between reading the index
        # and the slot); only the allocator forgets the region.
        self.space.release((vid, slot ^ 1))
        self.space.release(_prev_owner(vid, slot ^ 1))

    # ---- reading state --------------------------------------------------------------------

    def vip_id(self, name: str) -> int:
        return self.vip_ids[name]

    def backend_id(self, vip: str, key: str) -> int:
        return self.backend_ids[(vip, key)]

    def model_state(self, with_conntrack: bool = False, vips: Iterable[str] | None = None) -> model.ModelState:
        """The model's view of the maps as they are now (read back, not remembered); ``vips``:
        only these VIPs' lookup entries, tables and backends (the self-test's sample)."""
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
        if vips is None:
            keys = libbpf.keys(self.fds["vips"], maps.VipKey)
            bids: Iterable[int] = set(self.backend_ids.values())
        else:  # the keys the VIPs were written with; the lookup below proves they are there
            names = [n for n in vips if n in self.vip_ids]
            keys = [maps.VipKey.from_buffer_copy(bytes(self._meta(self.vip_ids[n]).key)) for n in names]
            bids = [b for n in names for b in self._vip_backends.get(n, {}).values()]
        for key in keys:
            val = maps.VipValue()
            if libbpf.lookup(self.fds["vips"], key, val):
                port = int.from_bytes(bytes(key.port_be), "big")
                if key.family & maps.VIP_KEY_FRAG:
                    st.frag_vips[(key.family & ~maps.VIP_KEY_FRAG, bytes(key.addr), key.proto)] = val.vip_id
                    continue
                st.vips[(key.family, bytes(key.addr), port, key.proto)] = val.vip_id
                st.tables[val.vip_id] = self._live_table(val.vip_id)
                m = self._meta(val.vip_id)
                s = m.slot[m.active & 1]
                sc = self._sc(val.vip_id)
                if s.size and sc.prev[m.active & 1]:
                    st.prev_tables[val.vip_id] = (self._read_ids(sc.prev[m.active & 1] - 1, s.size).tolist(),
                                                  sc.until_ns)
        if vips is None:
            for bid in bids:
                st.backends[bid] = self._model_backend(bid)
        else:  # a sample's check reads the one backend its packet meets, not all of them
            st.backends = _BackendsOnDemand(set(bids), self._model_backend)
        if with_conntrack:
            for k, v in self._ct_items():
                f = model.Flow(k.family, bytes(k.src), bytes(k.dst),
                               int.from_bytes(bytes(k.sport_be), "big"),
                               int.from_bytes(bytes(k.dport_be), "big"), k.proto)
                st.ct_put(f, (v.backend_id, v.last_seen_ns, v.vip_id))
        return st

    def _model_backend(self, bid: int) -> model.ModelBackend:
        be = maps.Backend()
        libbpf.lookup(self.fds["backends"], C.c_uint32(bid), be)
        return model.ModelBackend(be.family, bytes(be.addr), be.state, be.vip_id)

    def _ct_items(self) -> list[tuple[maps.FlowKey, maps.CtValue]]:
        """Every tracked flow and its value, in either design."""
        if self.conntrack == "direct":
            return [(e.key, e.val) for e in self._ct_entries()]
        out = []
        for name, ktype in self._LRU_MAPS:
            fd = self.fds[name]
            for k in libbpf.keys(fd, ktype):
                v = maps.CtValue()
                if libbpf.lookup(fd, k, v):  # it may have been evicted meanwhile
                    out.append((k.full() if ktype is maps.FlowKeyV4 else k, v))
        return out

    # "lru": IPv4 flows in conntrack_v4, IPv6 flows in conntrack (maglev.h)
    _LRU_MAPS = ((maps.CT_V4, maps.FlowKeyV4), ("conntrack", maps.FlowKey))

    def _move_v4_flows(self) -> None:
        """Pins of a version that kept IPv4 flows in `conntrack` (40-byte keys): move them to
        conntrack_v4, which the data path now reads for IPv4, so a restart loses no flow."""
        fd, fd4 = self.fds["conntrack"], self.fds[maps.CT_V4]
        moved = 0
        for k in libbpf.keys(fd, maps.FlowKey):
            if k.family != maps.FAM_V4:
                continue
            v = maps.CtValue()
            if libbpf.lookup(fd, k, v):
                libbpf.update(fd4, maps.FlowKeyV4.of(k), v)
                moved += 1
            libbpf.delete(fd, k)
        if moved:
            log.info("moved %d tracked IPv4 flows from %s to %s (the IPv4 conntrack map of this "
                     "version)", moved, self.pin_dir / "conntrack", self.pin_dir / maps.CT_V4)

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
            return sum(len(libbpf.keys(self.fds[n], t)) for n, t in self._LRU_MAPS)
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
            for name, ktype in self._LRU_MAPS:
                for k in libbpf.keys(self.fds[name], ktype):
                    libbpf.delete(self.fds[name], k)
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
            t = {f: sum(getattr(s, f) for s in per) for f in maps.STORED_STAT_FIELDS}
            t["ct_misses"] = t["packets"] - t["ct_hits"]
            return t

        out: dict = {"vips": {}, "backends": {}, "vip_backends": {}, "drops": {}, "events": {}}
        for name, vid in self.vip_ids.items():
            out["vips"][name] = total(self.fds["vip_stats"], vid)  # its retired backend ids
            out["vip_backends"][name] = {}
        for (vip, key), bid in sorted(self.backend_ids.items()):
            stats = total(self.fds["be_stats"], bid)
            out["vip_backends"].setdefault(vip, {})[key] = stats
            if vip in out["vips"]:  # the VIP's figures: its backends' sums (maglev.h)
                vs = out["vips"][vip]
                for f in maps.STAT_FIELDS:
                    vs[f] += stats[f]
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
        for idx, name in enumerate(maps.SC_STAT_NAMES):  # second chance's own counters
            out["events"][name] = sum(v.value for v in _read_percpu(self.fds["sc_stats"], idx, C.c_uint64, self._ncpu))
        return out

    # ---- self-test ------------------------------------------------------------------------

    @_one_at_a_time
    def test_run(self, frame: bytes, *, selftest: bool = False, ingress_ifindex: int = 0) -> tuple[int, bytes]:
        """Run one frame through the loaded program (BPF_PROG_TEST_RUN): (verdict, output)."""
        self._require_open()
        assert self._runner is not None
        return self._runner.run(frame, SELF_TEST_META if selftest else b"", ingress_ifindex)

    @_one_at_a_time
    def self_test(self, vips: Iterable[str] | None = None) -> SelfTestResult:
        """For each VIP with backends (``vips``: only these; the controller passes what changed
        plus a rotating sample): a synthetic packet through the program must come out as
        XDP_TX (or REDIRECT with fib lookup), GRE to the backend the model picks, with the same
        bytes as the model's (MACs excepted under fib lookup). Self-test packets insert no
        conntrack entry and touch no VIP counters (they are marked with XDP metadata)."""
        if self._obj is None:
            return SelfTestResult(False, "forwarder is not open", node_wide=True)
        problems = []
        our = libbpf.prog_id(self.prog_fd)
        for ifname, (ifindex, mode) in self._attached.items():
            flag = libbpf.XDP_FLAGS_DRV_MODE if mode == "native" else libbpf.XDP_FLAGS_SKB_MODE
            cur = libbpf.xdp_query_id(ifindex, flag)
            if cur != our:
                problems.append(f"{ifname}: XDP program id {cur or 'none'} runs, expected ours ({our}); "
                                "something replaced or detached it: restart the forwarder")
        names = sorted(self.vip_ids) if vips is None else sorted(n for n in set(vips) if n in self.vip_ids)
        checks = []
        # A slice of VIPs at a time: the model holds a copy of each VIP's table, and a
        # thousand of them at once would be a quarter of a gigabyte.
        for i in range(0, len(names), SELF_TEST_BATCH):
            batch = names[i:i + SELF_TEST_BATCH]
            try:
                st = self.model_state(vips=batch)
            except OSError as exc:
                return SelfTestResult(False, f"cannot read maps: {exc}", node_wide=True)
            checks += [self._check_vip(st, name, self.vip_ids[name]) for name in batch]
        node_wide = bool(problems)
        problems += [f"VIP {c.vip}: {c.reason}" for c in checks if not c.ok]
        if problems:
            return SelfTestResult(False, "; ".join(problems), tuple(checks), node_wide)
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
        be_key = self._key_of(expect.backend_id, name)
        ok_verdicts = {model.XDP_TX} | ({libbpf.XDP_REDIRECT} if fib else set())
        if verdict not in ok_verdicts:
            return VipCheck(name, False, f"verdict {libbpf.VERDICTS.get(verdict, verdict)}, expected TX "
                            f"to backend {be_key} (model: {libbpf.VERDICTS.get(expect.verdict)})", be_key)
        got, want = (out[12:], expect.data[12:]) if fib else (out, expect.data)
        if got != want:
            return VipCheck(name, False, f"output differs from the model's (expected GRE to {be_key}); "
                            f"got {out[:80].hex()} want {expect.data[:80].hex()}", be_key)
        return VipCheck(name, True, f"GRE to {be_key}", be_key)

    def _key_of(self, bid: int | None, vip: str) -> str | None:
        return next((k for k, b in self._vip_backends.get(vip, {}).items() if b == bid), None)

    def vip_names(self) -> list[str]:
        return sorted(self.vip_ids)

    def __enter__(self) -> "Forwarder":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
