"""The backend's GRE decapsulation program (bpf/decap.c): build, load, attach to tc, read counters.

ctypes on the system libbpf.so.1, like the rest of the forwarder. These are the few bindings the
tc side needs (tc hooks, map pins, test runs); they are meant to merge into
node/forwarder/libbpf.py, the node's binding module, once both settle.

The program sits on clsact ingress with a fixed handle and priority, so setup can replace it in
place (no window without decapsulation) and teardown removes exactly our filter and nothing else.

Public API:
- ``build_decap_object() -> Path``: compile bpf/decap.c (cached by source hash).
- ``DecapProgram.load(obj_path, pin_dir=None)``: load, reusing pinned maps in pin_dir if present.
- ``DecapProgram.set_vips(addrs)``, ``.vips()``, ``.counters()``, ``.test_run(frame)``,
  ``.attach(ifindex)``, ``.close()``.
- ``detach(ifindex) -> bool``, ``attached_prog_id(ifindex) -> int | None``.
- ``open_pinned_maps(pin_dir) -> PinnedDecapMaps`` (VIPs and counters without loading).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

BPF_DIR = Path(__file__).parent / "bpf"
DECAP_SOURCE = BPF_DIR / "decap.c"
DECAP_HEADER = BPF_DIR / "decap.h"
PROG_NAME = "mlb_decap"
VIPS_MAP = "decap_vips"
STATS_MAP = "decap_stats"

# Our filter's identity on clsact ingress. Fixed, so a second setup replaces it and teardown can
# remove it without touching filters that other tools attached.
TC_HANDLE = 0x6D6C  # "ml"
TC_PRIORITY = 0xA11  # low enough to run before most filters, unusual enough not to collide

# Mirrors enum decap_counter_index in bpf/decap.h, in index order.
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
)

# struct __sk_buff (uapi linux/bpf.h): its size and the offsets of the fields a test run sets.
SKB_CTX_SIZE = 192
SKB_CTX_GSO_SEGS = 164
SKB_CTX_GSO_SIZE = 176

TC_ACT_OK = 0
TC_ACT_SHOT = 2
BPF_TC_INGRESS = 1
BPF_TC_F_REPLACE = 1
BPF_ANY = 0


class BpfError(RuntimeError):
    """A libbpf call failed; the message names the call, the object and the errno."""


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


class TcHook(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class TcOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


class TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """libbpf.so.1 with the signatures we call declared (ctypes would truncate pointers otherwise)."""
    global _LIB
    if _LIB is not None:
        return _LIB
    try:
        so = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise BpfError(f"cannot load libbpf.so.1 ({exc}); install the libbpf1 package") from None
    vp, cp, ci = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    sigs = {
        "bpf_object__open_file": (vp, [cp, vp]),
        "bpf_object__load": (ci, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__find_program_by_name": (vp, [vp, cp]),
        "bpf_object__find_map_by_name": (vp, [vp, cp]),
        "bpf_program__fd": (ci, [vp]),
        "bpf_map__fd": (ci, [vp]),
        "bpf_map__set_pin_path": (ci, [vp, cp]),
        "bpf_map_update_elem": (ci, [ci, vp, vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (ci, [ci, vp, vp]),
        "bpf_map_delete_elem": (ci, [ci, vp]),
        "bpf_map_get_next_key": (ci, [ci, vp, vp]),
        "bpf_obj_get": (ci, [cp]),
        "bpf_tc_hook_create": (ci, [vp]),
        "bpf_tc_attach": (ci, [vp, vp]),
        "bpf_tc_detach": (ci, [vp, vp]),
        "bpf_tc_query": (ci, [vp, vp]),
        "bpf_prog_test_run_opts": (ci, [ci, vp]),
        "libbpf_num_possible_cpus": (ci, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(so, name)
        fn.restype = res
        fn.argtypes = args
    _LIB = so
    return so


def _err(call: str, ret: int, what: str) -> BpfError:
    """libbpf returns -errno (and sets errno); name both the call and the thing it was about."""
    code = -ret if ret < 0 else ctypes.get_errno()
    return BpfError(f"{call} failed for {what}: {os.strerror(code)} (errno {code})")


def possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n <= 0:
        raise _err("libbpf_num_possible_cpus", n, "this machine")
    return n


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _source_digest() -> str:
    h = hashlib.sha256()
    for p in (DECAP_SOURCE, DECAP_HEADER):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build_decap_object(cache_dir: Path | None = None) -> Path:
    """Compile decap.c once per source version and return the object's path.

    Uses the forwarder's builder (node/forwarder/build.py) once it lists "decap" among its
    programs; until then compiles here, with the same kind of source-hash cache.
    """
    try:
        from node.forwarder import build as shared

        if "decap" in getattr(shared, "PROGRAMS", ()):
            return shared.build("decap", cache_dir)
    except ImportError:
        pass
    cache = cache_dir or Path(os.environ.get("MAGLEV_BPF_CACHE", Path.home() / ".cache" / "maglev-bpf"))
    obj = cache / f"decap-{_source_digest()}.o"
    if obj.exists():
        return obj
    clang = shutil.which("clang")
    if not clang:
        raise BpfError("clang not found: install clang (apt-get install clang llvm libbpf-dev)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = obj.with_suffix(f".{os.getpid()}.tmp")
    argv = [
        clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
        f"-I{BPF_DIR}", "-I/usr/include/x86_64-linux-gnu",
        "-c", str(DECAP_SOURCE), "-o", str(tmp),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BpfError(f"compiling {DECAP_SOURCE} failed:\n{proc.stderr.strip()}")
    tmp.replace(obj)  # atomic: concurrent builders never see half an object
    return obj


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
        so = lib()
        value = DecapVipValue(1)
        for addr in wanted.values():
            key = DecapVipKey.of(addr)
            ret = so.bpf_map_update_elem(self.vips_fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY)
            if ret:
                raise _err("bpf_map_update_elem", ret, f"VIP {addr} in {VIPS_MAP}")
        for addr in self.vips():
            if (addr.version, addr.packed) not in wanted:
                key = DecapVipKey.of(addr)
                ret = so.bpf_map_delete_elem(self.vips_fd, ctypes.byref(key))
                if ret and -ret != errno.ENOENT:
                    raise _err("bpf_map_delete_elem", ret, f"VIP {addr} in {VIPS_MAP}")

    def vips(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        so = lib()
        out = []
        key, nxt = DecapVipKey(), DecapVipKey()
        prev = None
        while so.bpf_map_get_next_key(self.vips_fd, prev, ctypes.byref(nxt)) == 0:
            out.append(nxt.address())
            ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key))
            prev = ctypes.byref(key)
        return sorted(out, key=lambda a: (a.version, a.packed))

    def counters(self) -> dict[str, tuple[int, int]]:
        """{counter name: (packets, bytes)} summed over CPUs."""
        so = lib()
        ncpu = possible_cpus()
        values = (DecapCounter * ncpu)()
        out = {}
        for idx, name in enumerate(DECAP_COUNTERS):
            key = ctypes.c_uint32(idx)
            ret = so.bpf_map_lookup_elem(self.stats_fd, ctypes.byref(key), values)
            if ret:
                raise _err("bpf_map_lookup_elem", ret, f"{STATS_MAP}[{name}]")
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
        so = lib()
        fds = []
        for name in (VIPS_MAP, STATS_MAP):
            path = pin_dir / name
            fd = so.bpf_obj_get(str(path).encode())
            if fd < 0:
                for f in fds:
                    os.close(f)
                raise _err("bpf_obj_get", fd, str(path))
            fds.append(fd)
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

    def __init__(self, obj: int, prog_fd: int, vips_fd: int, stats_fd: int):
        self._obj = obj
        self.prog_fd = prog_fd
        self.vips_fd = vips_fd
        self.stats_fd = stats_fd

    @classmethod
    def load(cls, obj_path: str | Path, pin_dir: str | Path | None = None) -> "DecapProgram":
        """Open and load the object. With pin_dir, the maps are pinned there (or the existing
        pins reused), so a later setup keeps the VIPs and counters and teardown can find them."""
        so = lib()
        obj = so.bpf_object__open_file(str(obj_path).encode(), None)
        if not obj:
            raise _err("bpf_object__open_file", -ctypes.get_errno(), str(obj_path))
        try:
            if pin_dir is not None:
                for name in (VIPS_MAP, STATS_MAP):
                    m = so.bpf_object__find_map_by_name(obj, name.encode())
                    ret = so.bpf_map__set_pin_path(m, str(Path(pin_dir) / name).encode())
                    if ret:
                        raise _err("bpf_map__set_pin_path", ret, f"{name} in {pin_dir}")
            ret = so.bpf_object__load(obj)
            if ret:
                raise _err(
                    "bpf_object__load", ret,
                    f"{obj_path} (run as root; a stale pin in {pin_dir} with another layout "
                    "must be removed by `maglev backend teardown`)" if pin_dir else str(obj_path),
                )
            prog = so.bpf_object__find_program_by_name(obj, PROG_NAME.encode())
            fds = [so.bpf_program__fd(prog)]
            for name in (VIPS_MAP, STATS_MAP):
                fds.append(so.bpf_map__fd(so.bpf_object__find_map_by_name(obj, name.encode())))
            if min(fds) < 0:
                raise BpfError(f"{obj_path}: program {PROG_NAME} or its maps missing after load")
        except BaseException:
            so.bpf_object__close(obj)
            raise
        return cls(obj, *fds)

    def attach(self, ifindex: int, create_hook: bool = True) -> int:
        """Attach on clsact ingress of ifindex, replacing an earlier copy of this filter
        atomically. Returns the attached program id. create_hook=False skips creating clsact
        when the caller knows it exists (libbpf logs a kernel error for the redundant create)."""
        so = lib()
        hook = _hook(ifindex)
        ret = so.bpf_tc_hook_create(ctypes.byref(hook)) if create_hook else 0
        if ret and -ret != errno.EEXIST:
            raise _err("bpf_tc_hook_create", ret, f"clsact on ifindex {ifindex}")
        opts = _opts()
        opts.prog_fd = self.prog_fd
        opts.flags = BPF_TC_F_REPLACE
        ret = so.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
        if ret:
            raise _err("bpf_tc_attach", ret, f"{PROG_NAME} on ingress of ifindex {ifindex}")
        return int(opts.prog_id)

    def test_run(self, frame: bytes, gso_size: int = 0, gso_segs: int = 0) -> tuple[int, bytes]:
        """Run one frame through the program (BPF_PROG_TEST_RUN): (tc verdict, output frame).
        gso_size/gso_segs make the test skb look GRO-merged (the __sk_buff context fields the
        kernel accepts for a test run)."""
        so = lib()
        data_in = ctypes.create_string_buffer(frame, len(frame))
        out = ctypes.create_string_buffer(len(frame) + 256)
        opts = TestRunOpts()
        opts.sz = ctypes.sizeof(opts)
        opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
        opts.data_size_in = len(frame)
        opts.data_out = ctypes.cast(out, ctypes.c_void_p)
        opts.data_size_out = len(out)
        opts.repeat = 1
        if gso_size or gso_segs:
            ctx = ctypes.create_string_buffer(SKB_CTX_SIZE)
            ctypes.c_uint32.from_buffer(ctx, SKB_CTX_GSO_SEGS).value = gso_segs
            ctypes.c_uint32.from_buffer(ctx, SKB_CTX_GSO_SIZE).value = gso_size
            opts.ctx_in = ctypes.cast(ctx, ctypes.c_void_p)
            opts.ctx_size_in = SKB_CTX_SIZE
        ret = so.bpf_prog_test_run_opts(self.prog_fd, ctypes.byref(opts))
        if ret:
            raise _err("bpf_prog_test_run_opts", ret, f"{PROG_NAME} with a {len(frame)}-byte frame")
        return int(opts.retval), out.raw[: opts.data_size_out]

    def close(self) -> None:
        """Release our references (the object owns the fds). An attached filter stays."""
        if self._obj:
            lib().bpf_object__close(self._obj)
            self._obj = None
            self.prog_fd = self.vips_fd = self.stats_fd = -1

    def __enter__(self) -> "DecapProgram":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _hook(ifindex: int) -> TcHook:
    hook = TcHook()
    hook.sz = ctypes.sizeof(hook)
    hook.ifindex = ifindex
    hook.attach_point = BPF_TC_INGRESS
    return hook


def _opts() -> TcOpts:
    opts = TcOpts()
    opts.sz = ctypes.sizeof(opts)
    opts.handle = TC_HANDLE
    opts.priority = TC_PRIORITY
    return opts


def attached_prog_id(ifindex: int) -> int | None:
    """Id of the program in our filter slot on ifindex's ingress, or None if there is none."""
    opts = _opts()
    ret = lib().bpf_tc_query(ctypes.byref(_hook(ifindex)), ctypes.byref(opts))
    if ret:
        if -ret in (errno.ENOENT, errno.EINVAL):
            return None
        raise _err("bpf_tc_query", ret, f"ingress of ifindex {ifindex}")
    return int(opts.prog_id)


def detach(ifindex: int) -> bool:
    """Remove our filter (only ours) from ifindex's ingress. False if it was not there."""
    if attached_prog_id(ifindex) is None:
        return False
    ret = lib().bpf_tc_detach(ctypes.byref(_hook(ifindex)), ctypes.byref(_opts()))
    if ret and -ret != errno.ENOENT:
        raise _err("bpf_tc_detach", ret, f"{PROG_NAME} on ingress of ifindex {ifindex}")
    return ret == 0


@dataclass(frozen=True)
class DecapStatus:
    prog_id: int | None
    vips: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
    counters: dict[str, tuple[int, int]]
