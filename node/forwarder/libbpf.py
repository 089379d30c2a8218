"""ctypes bindings to the system libbpf.so.1: only what the forwarder needs.

The one binding module of the project: the node's XDP loader (loader.py) and the backend's tc
decapsulation program (tc.py) both call libbpf through it, so every signature is declared once.

Why ctypes: no PyPI libbpf binding is mature (see the datapath field notes), and libbpf itself
is the reference loader. Functions return Python values and raise BpfError (with errno and,
when libbpf printed one, its log such as the verifier output) on failure.
"""

from __future__ import annotations

import ctypes as C
import ctypes.util
import errno
import os
import struct
import threading
from pathlib import Path

_lib = C.CDLL("libbpf.so.1", use_errno=True)
_libc = C.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
VERDICTS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}

BPF_TC_INGRESS = 1  # enum bpf_tc_attach_point
BPF_TC_F_REPLACE = 1 << 0

# struct __sk_buff (uapi linux/bpf.h): its size and the offsets of the fields a tc test run sets.
SKB_CTX_SIZE = 192
SKB_CTX_GSO_SEGS = 164
SKB_CTX_GSO_SIZE = 176


class BpfError(OSError):
    """A libbpf call failed. ``log`` holds what libbpf printed while it ran (verifier log)."""

    def __init__(self, what: str, err: int, log: str = ""):
        self.what = what
        self.log = log
        msg = f"{what}: {os.strerror(err)} (errno {err})"
        if log:
            msg += "\n" + log[-4000:]
        super().__init__(err, msg)

    def __str__(self) -> str:
        return self.strerror  # the message names the errno already; skip OSError's "[Errno N]"

    def about(self, context: str) -> "BpfError":
        """The same failure, naming what it concerned (a VIP, a map entry, a filter)."""
        return BpfError(f"{self.what} ({context})", self.errno, self.log)


# ---- libbpf's log, captured so errors can show the verifier output -------------------------
_PRINT_FN = C.CFUNCTYPE(C.c_int, C.c_int, C.c_char_p, C.c_void_p)
_log_lock = threading.Lock()
_log: list[str] = []
_libc.vsnprintf.argtypes = [C.c_char_p, C.c_size_t, C.c_char_p, C.c_void_p]


@_PRINT_FN
def _print(level: int, fmt: bytes, args: int) -> int:
    buf = C.create_string_buffer(1 << 18)  # the verifier log arrives in one piece
    _libc.vsnprintf(buf, len(buf), fmt, args)  # on x86-64/arm64 a va_list arrives as a pointer
    with _log_lock:
        _log.append(buf.value.decode(errors="replace"))
        del _log[:-400]
    return 0


_lib.libbpf_set_print.argtypes = [_PRINT_FN]
_lib.libbpf_set_print.restype = C.c_void_p
_lib.libbpf_set_print(_print)


def take_log() -> str:
    with _log_lock:
        text = "".join(_log)
        _log.clear()
    return text


def _err(ret: int) -> int:
    return -ret if ret < 0 else (C.get_errno() or 1)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise BpfError(what, _err(ret), take_log())
    return ret


def _sig(name: str, restype, *argtypes):
    fn = getattr(_lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


P = C.c_void_p
_open_file = _sig("bpf_object__open_file", P, C.c_char_p, P)
_obj_load = _sig("bpf_object__load", C.c_int, P)
_obj_close = _sig("bpf_object__close", None, P)
_find_map = _sig("bpf_object__find_map_by_name", P, P, C.c_char_p)
_find_prog = _sig("bpf_object__find_program_by_name", P, P, C.c_char_p)
_map_fd = _sig("bpf_map__fd", C.c_int, P)
_map_reuse_fd = _sig("bpf_map__reuse_fd", C.c_int, P, C.c_int)
_map_set_max = _sig("bpf_map__set_max_entries", C.c_int, P, C.c_uint32)
_map_set_pin_path = _sig("bpf_map__set_pin_path", C.c_int, P, C.c_char_p)
_prog_fd = _sig("bpf_program__fd", C.c_int, P)
_libbpf_get_error = _sig("libbpf_get_error", C.c_long, P)
_num_cpus = _sig("libbpf_num_possible_cpus", C.c_int)
map_lookup = _sig("bpf_map_lookup_elem", C.c_int, C.c_int, P, P)
map_update = _sig("bpf_map_update_elem", C.c_int, C.c_int, P, P, C.c_uint64)
map_delete = _sig("bpf_map_delete_elem", C.c_int, C.c_int, P)
map_next_key = _sig("bpf_map_get_next_key", C.c_int, C.c_int, P, P)
_map_update_batch = _sig("bpf_map_update_batch", C.c_int, C.c_int, P, P, C.POINTER(C.c_uint32), P)
_obj_pin = _sig("bpf_obj_pin", C.c_int, C.c_int, C.c_char_p)
_obj_get = _sig("bpf_obj_get", C.c_int, C.c_char_p)
_info_by_fd = _sig("bpf_obj_get_info_by_fd", C.c_int, C.c_int, P, C.POINTER(C.c_uint32))
_prog_fd_by_id = _sig("bpf_prog_get_fd_by_id", C.c_int, C.c_uint32)
_xdp_attach = _sig("bpf_xdp_attach", C.c_int, C.c_int, C.c_int, C.c_uint32, P)
_xdp_detach = _sig("bpf_xdp_detach", C.c_int, C.c_int, C.c_uint32, P)
_xdp_query_id = _sig("bpf_xdp_query_id", C.c_int, C.c_int, C.c_int, C.POINTER(C.c_uint32))
_tc_hook_create = _sig("bpf_tc_hook_create", C.c_int, P)
_tc_attach = _sig("bpf_tc_attach", C.c_int, P, P)
_tc_detach = _sig("bpf_tc_detach", C.c_int, P, P)
_tc_query = _sig("bpf_tc_query", C.c_int, P, P)
test_run_raw = _sig("bpf_prog_test_run_opts", C.c_int, C.c_int, P)


class XdpAttachOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("old_prog_fd", C.c_int), ("_pad", C.c_int)]


class TcHook(C.Structure):
    """struct bpf_tc_hook (libbpf.h); ctypes pads it to 8 bytes like the C ``size_t :0``."""

    _fields_ = [("sz", C.c_size_t), ("ifindex", C.c_int), ("attach_point", C.c_int),
                ("parent", C.c_uint32)]


class TcOpts(C.Structure):
    """struct bpf_tc_opts (libbpf.h)."""

    _fields_ = [("sz", C.c_size_t), ("prog_fd", C.c_int), ("flags", C.c_uint32),
                ("prog_id", C.c_uint32), ("handle", C.c_uint32), ("priority", C.c_uint32)]


class TestRunOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("data_in", P), ("data_out", P), ("data_size_in", C.c_uint32),
                ("data_size_out", C.c_uint32), ("ctx_in", P), ("ctx_out", P),
                ("ctx_size_in", C.c_uint32), ("ctx_size_out", C.c_uint32), ("retval", C.c_uint32),
                ("repeat", C.c_int), ("duration", C.c_uint32), ("flags", C.c_uint32),
                ("cpu", C.c_uint32), ("batch_size", C.c_uint32)]


class XdpMd(C.Structure):
    _fields_ = [("data", C.c_uint32), ("data_end", C.c_uint32), ("data_meta", C.c_uint32),
                ("ingress_ifindex", C.c_uint32), ("rx_queue_index", C.c_uint32),
                ("egress_ifindex", C.c_uint32)]


class MapInfo(C.Structure):
    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("key_size", C.c_uint32),
                ("value_size", C.c_uint32), ("max_entries", C.c_uint32), ("map_flags", C.c_uint32),
                ("name", C.c_char * 16), ("_rest", C.c_uint8 * 64)]


class ProgInfo(C.Structure):
    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("tag", C.c_uint8 * 8),
                ("jited_prog_len", C.c_uint32), ("xlated_prog_len", C.c_uint32),
                ("jited_prog_insns", C.c_uint64), ("xlated_prog_insns", C.c_uint64),
                ("load_time", C.c_uint64), ("created_by_uid", C.c_uint32),
                ("nr_map_ids", C.c_uint32), ("map_ids", C.c_uint64), ("name", C.c_char * 16),
                ("_rest", C.c_uint8 * 256)]


def num_possible_cpus() -> int:
    return _check(_num_cpus(), "libbpf_num_possible_cpus")


class BpfObject:
    """An opened (then loaded) BPF object file. Map and program handles stay owned by it."""

    def __init__(self, path: str | Path):
        take_log()
        self.path = str(path)
        ptr = _open_file(self.path.encode(), None)
        err = _libbpf_get_error(ptr) if ptr else -(C.get_errno() or 2)
        if not ptr or err:
            raise BpfError(f"cannot open BPF object {self.path}", -err if err else 2, take_log())
        self._obj = ptr

    def _map(self, name: str) -> int:
        m = _find_map(self._obj, name.encode())
        if not m:
            raise KeyError(f"map {name!r} not in {self.path}")
        return m

    def set_max_entries(self, name: str, n: int) -> None:
        _check(_map_set_max(self._map(name), n), f"set max_entries of map {name}")

    def set_pin_path(self, name: str, path: str | Path) -> None:
        """Pin the map at path on load, or reuse the pin already there (libbpf checks that its
        layout matches and fails the load otherwise)."""
        ret = _map_set_pin_path(self._map(name), str(path).encode())
        _check(ret, f"set pin path of map {name} to {path}")

    def reuse_map_fd(self, name: str, fd: int) -> None:
        _check(_map_reuse_fd(self._map(name), fd), f"reuse pinned map {name}")

    def load(self) -> None:
        take_log()
        _check(_obj_load(self._obj), f"load BPF object {self.path} (verifier log follows)")
        take_log()  # success: the progress lines are noise for later errors

    def map_fd(self, name: str) -> int:
        return _check(_map_fd(self._map(name)), f"fd of map {name}")

    def prog_fd(self, name: str) -> int:
        p = _find_prog(self._obj, name.encode())
        if not p:
            raise KeyError(f"program {name!r} not in {self.path}")
        return _check(_prog_fd(p), f"fd of program {name}")

    def close(self) -> None:
        if self._obj:
            _obj_close(self._obj)
            self._obj = None


def obj_pin(fd: int, path: str | Path) -> None:
    _check(_obj_pin(fd, str(path).encode()), f"pin {path}")


def obj_get(path: str | Path) -> int:
    return _check(_obj_get(str(path).encode()), f"open pinned {path}")


def _info(fd: int, info_type, what: str):
    info = info_type()
    n = C.c_uint32(C.sizeof(info))
    _check(_info_by_fd(fd, C.byref(info), C.byref(n)), what)
    return info


def map_info(fd: int) -> MapInfo:
    return _info(fd, MapInfo, "map info")


def prog_id(fd: int) -> int:
    return _info(fd, ProgInfo, "program info").id


def prog_name_by_id(prog_id_: int) -> str:
    """The name of a loaded program (e.g. to recognise an older copy of ours)."""
    fd = prog_fd_by_id(prog_id_)
    try:
        return _info(fd, ProgInfo, "program info").name.decode(errors="replace")
    finally:
        os.close(fd)


def prog_fd_by_id(prog_id_: int) -> int:
    return _check(_prog_fd_by_id(prog_id_), f"open program id {prog_id_}")


def xdp_attach(ifindex: int, prog_fd: int, flags: int, old_prog_fd: int | None = None) -> None:
    opts = None
    if old_prog_fd is not None:
        o = XdpAttachOpts(sz=C.sizeof(XdpAttachOpts), old_prog_fd=old_prog_fd)
        opts = C.byref(o)
        flags |= XDP_FLAGS_REPLACE
    _check(_xdp_attach(ifindex, prog_fd, flags, opts), f"attach XDP to ifindex {ifindex}")


def xdp_detach(ifindex: int, flags: int) -> None:
    _check(_xdp_detach(ifindex, flags, None), f"detach XDP from ifindex {ifindex}")


def xdp_query_id(ifindex: int, flags: int) -> int:
    out = C.c_uint32(0)
    _check(_xdp_query_id(ifindex, flags, C.byref(out)), f"query XDP on ifindex {ifindex}")
    return out.value


# ---- tc (clsact) filters: one filter slot is named by ifindex, direction, handle and priority --


def _tc_hook(ifindex: int, attach_point: int) -> TcHook:
    return TcHook(sz=C.sizeof(TcHook), ifindex=ifindex, attach_point=attach_point)


def _tc_opts(handle: int, priority: int) -> TcOpts:
    return TcOpts(sz=C.sizeof(TcOpts), handle=handle, priority=priority)


def tc_hook_create(ifindex: int, attach_point: int = BPF_TC_INGRESS) -> bool:
    """Add the clsact qdisc to ifindex. False when it was already there."""
    ret = _tc_hook_create(C.byref(_tc_hook(ifindex, attach_point)))
    if ret < 0 and _err(ret) == errno.EEXIST:
        take_log()  # libbpf logged the kernel's refusal; it is not an error here
        return False
    _check(ret, f"create clsact qdisc on ifindex {ifindex}")
    return True


def tc_attach(ifindex: int, prog_fd: int, handle: int, priority: int,
              attach_point: int = BPF_TC_INGRESS, replace: bool = True) -> int:
    """Attach a direct-action filter in the (handle, priority) slot; with replace, an earlier
    filter in that slot is swapped atomically. Returns the attached program id."""
    opts = _tc_opts(handle, priority)
    opts.prog_fd = prog_fd
    opts.flags = BPF_TC_F_REPLACE if replace else 0
    ret = _tc_attach(C.byref(_tc_hook(ifindex, attach_point)), C.byref(opts))
    _check(ret, f"attach tc filter (handle {handle:#x}, priority {priority}) to ifindex {ifindex}")
    return int(opts.prog_id)


def tc_query(ifindex: int, handle: int, priority: int, attach_point: int = BPF_TC_INGRESS) -> int | None:
    """Id of the program in the (handle, priority) slot, or None when the slot (or clsact) is empty."""
    opts = _tc_opts(handle, priority)
    ret = _tc_query(C.byref(_tc_hook(ifindex, attach_point)), C.byref(opts))
    if ret < 0 and _err(ret) in (errno.ENOENT, errno.EINVAL):
        take_log()
        return None
    _check(ret, f"query tc filter (handle {handle:#x}, priority {priority}) on ifindex {ifindex}")
    return int(opts.prog_id)


def tc_detach(ifindex: int, handle: int, priority: int, attach_point: int = BPF_TC_INGRESS) -> bool:
    """Remove the filter in the (handle, priority) slot and nothing else. False if it was empty."""
    ret = _tc_detach(C.byref(_tc_hook(ifindex, attach_point)), C.byref(_tc_opts(handle, priority)))
    if ret < 0 and _err(ret) == errno.ENOENT:
        take_log()
        return False
    _check(ret, f"detach tc filter (handle {handle:#x}, priority {priority}) from ifindex {ifindex}")
    return True


# ---- map elements ----------------------------------------------------------------------------


def lookup(fd: int, key: C.Structure | C._SimpleCData, value) -> bool:
    """Fill value; False when the key is absent."""
    ret = map_lookup(fd, C.byref(key), C.byref(value))
    if ret < 0:
        if _err(ret) == errno.ENOENT:
            return False
        raise BpfError("map lookup", _err(ret))
    return True


def update(fd: int, key, value, flags: int = 0) -> None:
    _check(map_update(fd, C.byref(key), C.byref(value), flags), "map update")


def delete(fd: int, key) -> bool:
    ret = map_delete(fd, C.byref(key))
    if ret < 0:
        if _err(ret) == errno.ENOENT:
            return False
        raise BpfError("map delete", _err(ret))
    return True


def read_percpu(fd: int, index: int, ctype, ncpu: int | None = None) -> list:
    """One entry of a per-CPU array map: a ctype value per possible CPU. The kernel copies each
    CPU's value into an 8-byte aligned slot, hence the padded buffer."""
    ncpu = ncpu or num_possible_cpus()
    stride = (C.sizeof(ctype) + 7) & ~7
    buf = (C.c_uint8 * (stride * ncpu))()
    if not lookup(fd, C.c_uint32(index), buf):
        raise BpfError(f"per-CPU map entry {index}", errno.ENOENT)
    return [ctype.from_buffer_copy(buf, i * stride) for i in range(ncpu)]


def keys(fd: int, key_type) -> list:
    """Every key of a hash map (a snapshot; concurrent changes may be missed)."""
    out = []
    cur = None
    nxt = key_type()
    while True:
        ret = map_next_key(fd, C.byref(cur) if cur is not None else None, C.byref(nxt))
        if ret < 0:
            if _err(ret) == errno.ENOENT:
                return out
            raise BpfError("map iteration", _err(ret))
        out.append(nxt)
        cur, nxt = nxt, key_type()


class TestRun:
    """BPF_PROG_TEST_RUN with preallocated buffers: one call costs one ctypes call, so a bench
    measures the program rather than Python."""

    def __init__(self, prog_fd: int, max_out: int = 4096):
        self.prog_fd = prog_fd
        self.out = C.create_string_buffer(max_out)
        self.inp = C.create_string_buffer(max_out)
        self.ctx = XdpMd()
        self.opts = TestRunOpts(sz=C.sizeof(TestRunOpts))
        self.opts.data_in = C.cast(self.inp, P)
        self.opts.data_out = C.cast(self.out, P)
        self.opts.repeat = 1
        self._opts_ref = C.byref(self.opts)
        self._max = max_out

    def set_packet(self, data: bytes, meta: bytes = b"", ingress_ifindex: int = 0) -> None:
        if len(meta) % 4 or len(meta) > 32:
            raise ValueError("XDP metadata must be a multiple of 4 bytes, at most 32")
        buf = meta + data
        C.memmove(self.inp, buf, len(buf))
        self.opts.data_size_in = len(buf)
        if meta or ingress_ifindex:
            self.ctx.data = len(meta)
            self.ctx.data_end = len(buf)
            self.ctx.data_meta = 0
            self.ctx.ingress_ifindex = ingress_ifindex
            self.opts.ctx_in = C.cast(C.byref(self.ctx), P)
            self.opts.ctx_size_in = C.sizeof(XdpMd)
        else:
            self.opts.ctx_in = None
            self.opts.ctx_size_in = 0

    def set_ports(self, offset: int, value: int) -> None:
        """Overwrite 2 bytes of the prepared input (the bench varies source ports in place)."""
        self.inp[offset] = value >> 8
        self.inp[offset + 1] = value & 0xFF

    def run_raw(self) -> int:
        """One call; returns the ioctl result (the verdict is in opts.retval)."""
        self.opts.data_size_out = self._max
        return test_run_raw(self.prog_fd, self._opts_ref)

    def run(self, data: bytes, meta: bytes = b"", ingress_ifindex: int = 0) -> tuple[int, bytes]:
        self.set_packet(data, meta, ingress_ifindex)
        ret = self.run_raw()
        if ret < 0:
            raise BpfError("BPF_PROG_TEST_RUN", _err(ret), take_log())
        n = self.opts.data_size_out
        # data_out holds the metadata too when some was passed in
        return self.opts.retval, self.out.raw[len(meta):n] if meta else self.out.raw[:n]


def prog_test_run(prog_fd: int, data: bytes, ctx: bytes = b"", room: int = 256) -> tuple[int, bytes]:
    """One BPF_PROG_TEST_RUN of any program type, with an optional raw context (for tc, a
    ``skb_context()``): (return value, output data). ``room`` is how far the output may grow
    beyond the input. For repeated XDP runs use TestRun, which allocates once."""
    data_in = C.create_string_buffer(data, len(data))
    out = C.create_string_buffer(len(data) + room)
    opts = TestRunOpts(sz=C.sizeof(TestRunOpts), data_in=C.cast(data_in, P), data_out=C.cast(out, P),
                       data_size_in=len(data), data_size_out=len(out), repeat=1)
    ctx_in = C.create_string_buffer(ctx, len(ctx))
    if ctx:
        opts.ctx_in = C.cast(ctx_in, P)
        opts.ctx_size_in = len(ctx)
    ret = test_run_raw(prog_fd, C.byref(opts))
    if ret < 0:
        raise BpfError(f"BPF_PROG_TEST_RUN with a {len(data)}-byte input", _err(ret), take_log())
    return int(opts.retval), out.raw[:opts.data_size_out]


def skb_context(gso_size: int = 0, gso_segs: int = 0) -> bytes:
    """A struct __sk_buff for a tc test run; gso_size/gso_segs make the skb look GRO-merged
    (fields the kernel accepts from a test run's context)."""
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("=I", ctx, SKB_CTX_GSO_SEGS, gso_segs)
    struct.pack_into("=I", ctx, SKB_CTX_GSO_SIZE, gso_size)
    return bytes(ctx)
