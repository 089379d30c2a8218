"""Tunnel health checks, the node's side: the probe device, its routing and bpf/hc_tunnel.c.

A tunnel check probes the VIP address and port, with the probe socket's SO_MARK naming the ONE
backend under test (``mark_for``). The packet must reach the encapsulating program, whatever
the node's own routes say about the VIP (routed elsewhere, or not at all: a lab node has no
default route on purpose). So:

- a probe device: a veth pair ``mlbhc0``/``mlbhc1`` inside the node's network namespace, ARP
  off (a VIP has no neighbour to resolve; with ARP the kernel would ask the fabric who has the
  VIP and a backend might answer), TX offloads off (every probe leaves with full checksums and
  no GSO, so nothing downstream has to segment GRE);
- one ip rule per family, ``fwmark HC_MARK_BASE/HC_MARK_MASK lookup HC_TABLE`` (priority
  HC_RULE_PRIORITY, before main), and in that table ``default dev mlbhc0 src <encap source>
  mtu lock <forwarder.mtu - GRE overhead>``: the source is the node's encap source, which the
  backend's DSR reply goes back to; the MTU leaves room for the 24 (IPv4) / 44 (IPv6) bytes of
  GRE so a probe never needs fragmenting;
- hc_tunnel.c on the probe device's tc egress: GRE to the backend of the mark, mark cleared,
  redirected out of the uplink (forwarder.interfaces[0]) with the kernel's neighbour lookup.

A VIP that is a local address of the node is not covered: the local table (rule priority 0)
delivers it before any fwmark rule. Nodes of this project never hold their VIPs (XDP takes VIP
traffic before the stack).

The reply (VIP -> node) is not for a VIP, so the node's XDP program passes it to the stack and
the probe socket. Marks are node-local: one id per backend address (all VIPs share it, the
inner destination says which VIP), allocated lowest-free and kept while the address stays a
tunnel target, so a probe in flight is never re-steered by a reload.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterable, Sequence

from node.forwarder import build, libbpf
from node.forwarder.libbpf import BpfError

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

PROG_NAME = "mlb_hc_tunnel"
PROBE_DEV, PEER_DEV = "mlbhc0", "mlbhc1"
# Mirrors maglev.h.
HC_MAX_TARGETS = 65536
HC_MARK_BASE = 0x6D6C0000
HC_MARK_MASK = 0xFFFF0000
CFG_F_HAVE_SRC_V4, CFG_F_HAVE_SRC_V6 = 2, 4
GRE_OVERHEAD = {4: 24, 6: 44}
HC_COUNTERS = ("encap_v4", "encap_v6", "pass_unmarked", "drop_no_target", "drop_no_source",
               "drop_malformed", "drop_adjust")
# Routing: a table and rule priority of our own (an operator can move them with the config of a
# later version; these are unlikely to collide: 0x6d6c is "ml").
HC_TABLE = 0x6D6C
HC_RULE_PRIORITY = 1000
TC_HANDLE, TC_PRIORITY = 0x6D6C, 0xA12
BPF_TC_EGRESS = 2


class TunnelError(RuntimeError):
    """The tunnel cannot be set up; the message says what failed and what to do."""


class HcTarget(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint32 * 4), ("family", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class HcConfig(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("src_v4", ctypes.c_uint32), ("src_v6", ctypes.c_uint32 * 4),
                ("out_ifindex", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


def _wire_words(address: IPAddr) -> list[int]:
    """The address as the data path loads it: 4-byte words of wire bytes, little-endian reads."""
    raw = address.packed.ljust(16, b"\0")
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, 16, 4)]


def target_value(address: IPAddr) -> HcTarget:
    t = HcTarget()
    t.addr[:] = _wire_words(address)
    t.family = address.version
    return t


def config_value(src_v4: IPAddr | None, src_v6: IPAddr | None, out_ifindex: int) -> HcConfig:
    c = HcConfig()
    if src_v4 is not None:
        c.flags |= CFG_F_HAVE_SRC_V4
        c.src_v4 = _wire_words(src_v4)[0]
    if src_v6 is not None:
        c.flags |= CFG_F_HAVE_SRC_V6
        c.src_v6[:] = _wire_words(src_v6)
    c.out_ifindex = out_ifindex
    return c


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise TunnelError("ip (iproute2) is not installed") from None
    if check and proc.returncode != 0:
        raise TunnelError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class MarkTable:
    """backend address -> id (1..HC_MAX_TARGETS-1). Pure bookkeeping, so it is unit-tested
    without BPF: kept ids never move, new addresses take the lowest free ids in address order."""

    def __init__(self) -> None:
        self.ids: dict[IPAddr, int] = {}

    def assign(self, addresses: Iterable[IPAddr]) -> tuple[dict[IPAddr, int], list[int]]:
        """Make the table hold exactly these addresses: (added address -> id, freed ids)."""
        wanted = set(addresses)
        freed = [self.ids.pop(a) for a in [a for a in self.ids if a not in wanted]]
        used = set(self.ids.values())
        new = sorted((a for a in wanted if a not in self.ids), key=lambda a: (a.version, a.packed))
        if len(used) + len(new) > HC_MAX_TARGETS - 1:
            raise TunnelError(f"{len(used) + len(new)} tunnel-checked backend addresses exceed the "
                              f"limit of {HC_MAX_TARGETS - 1} (HC_MAX_TARGETS in maglev.h)")
        added, next_id = {}, 1
        for addr in new:
            while next_id in used:
                next_id += 1
            self.ids[addr] = added[addr] = next_id
            used.add(next_id)
        return added, freed


class HealthTunnel:
    """Owns the probe device, the routing and the loaded program. ``open`` is idempotent and
    replaces a leftover of an earlier run in place; ``close`` removes everything it set up."""

    def __init__(self, interfaces: Sequence[str], src_v4: IPAddr | None, src_v6: IPAddr | None,
                 mtu: int, obj_path: Path | None = None) -> None:
        self.interfaces = list(interfaces)
        self.src = {4: src_v4, 6: src_v6}
        self.mtu = mtu
        self.obj_path = obj_path
        self.marks = MarkTable()
        self.error: str | None = "the node's tunnel for health checks is not set up yet"
        self.opened = False  # open() was tried (close() undoes it)
        self._obj: libbpf.BpfObject | None = None
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # set_targets runs in the loop, open in a worker thread

    @classmethod
    def from_config(cls, fwd) -> "HealthTunnel":
        return cls(fwd.interfaces, fwd.encap_source_v4, fwd.encap_source_v6, fwd.mtu)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Load the program, create the probe device and its routes, attach, write the maps.
        Raises TunnelError (and keeps the reason in ``error`` for the probes to report)."""
        self.opened = True
        try:
            self._open()
            self.error = None
        except (TunnelError, BpfError, build.BuildError, OSError) as exc:
            self.error = f"the node's tunnel for health checks is not set up: {exc}"
            raise TunnelError(self.error) from None

    def _open(self) -> None:
        try:
            out_ifindex = socket.if_nametoindex(self.interfaces[0])
        except OSError:
            raise TunnelError(f"forwarder interface {self.interfaces[0]!r} does not exist") from None
        obj = libbpf.BpfObject(self.obj_path or build.build("hc_tunnel"))
        try:
            obj.load()
            fds = {name: obj.map_fd(name) for name in ("hc_targets", "hc_config", "hc_stats")}
            prog_fd = obj.prog_fd(PROG_NAME)
        except BaseException:
            obj.close()
            raise
        libbpf.update(fds["hc_config"], ctypes.c_uint32(0),
                      config_value(self.src[4], self.src[6], out_ifindex))
        with self._lock:
            for addr, mark_id in self.marks.ids.items():
                libbpf.update(fds["hc_targets"], ctypes.c_uint32(mark_id), target_value(addr))
            self._ensure_device()
            ifindex = socket.if_nametoindex(PROBE_DEV)
            libbpf.tc_hook_create(ifindex, BPF_TC_EGRESS)
            libbpf.tc_attach(ifindex, prog_fd, TC_HANDLE, TC_PRIORITY, attach_point=BPF_TC_EGRESS)
            self._ensure_routing()
            old, self._obj, self._fds = self._obj, obj, fds
        if old is not None:
            old.close()

    def close(self) -> None:
        """Remove the rules, the table's routes and the probe device (its filter goes with it)."""
        with self._lock:
            if not self.opened:
                return  # nothing of ours exists: never touch the host's rules and links
            mark = f"{HC_MARK_BASE:#x}/{HC_MARK_MASK:#x}"
            for fam in ("-4", "-6"):
                # only our rule: this priority, this mark, this table
                while _ip(fam, "rule", "del", "pref", str(HC_RULE_PRIORITY), "fwmark", mark,
                          "lookup", str(HC_TABLE), check=False).returncode == 0:
                    pass
                _ip(fam, "route", "flush", "table", str(HC_TABLE), check=False)
            _ip("link", "del", PROBE_DEV, check=False)
            if self._obj is not None:
                self._obj.close()
            self._obj, self._fds = None, {}
            self.error = "the node's tunnel for health checks is closed (the node is stopping)"
            self.opened = False

    # ------------------------------------------------------------------ the device and routes

    def _ensure_device(self) -> None:
        if not Path(f"/sys/class/net/{PROBE_DEV}").exists():
            _ip("link", "add", PROBE_DEV, "type", "veth", "peer", "name", PEER_DEV)
        for dev in (PROBE_DEV, PEER_DEV):
            _ip("link", "set", dev, "arp", "off")
            _ip("link", "set", dev, "addrgenmode", "none", check=False)  # no link-local: cosmetic
            _ip("link", "set", dev, "up")
            try:
                proc = subprocess.run(["ethtool", "-K", dev, "tx", "off"], capture_output=True,
                                      text=True, timeout=30)
            except FileNotFoundError:
                raise TunnelError("ethtool is not installed (apt-get install ethtool)") from None
            if proc.returncode != 0:
                raise TunnelError(f"`ethtool -K {dev} tx off` failed: {proc.stderr.strip()}")

    def _ensure_routing(self) -> None:
        mark = f"{HC_MARK_BASE:#x}/{HC_MARK_MASK:#x}"
        for fam, flag in ((4, "-4"), (6, "-6")):
            src = self.src[fam]
            if src is None:
                continue
            rules = _ip(flag, "rule", "show", "pref", str(HC_RULE_PRIORITY)).stdout
            if f"lookup {HC_TABLE}" not in rules and f"lookup {HC_TABLE:d}" not in rules:
                _ip(flag, "rule", "add", "pref", str(HC_RULE_PRIORITY), "fwmark", mark,
                    "lookup", str(HC_TABLE))
            _ip(flag, "route", "replace", "default", "dev", PROBE_DEV, "table", str(HC_TABLE),
                "src", str(src), "mtu", "lock", str(self.mtu - GRE_OVERHEAD[fam]))

    # ------------------------------------------------------------------ targets

    def set_targets(self, addresses: Iterable[IPAddr]) -> None:
        """Give every backend address a mark and write it to hc_targets (before any probe uses
        it); addresses no longer tunnel-checked are freed (their id is zeroed)."""
        with self._lock:
            added, freed = self.marks.assign(addresses)
            fd = self._fds.get("hc_targets")
            if fd is None:
                return  # written by open()
            for addr, mark_id in added.items():
                libbpf.update(fd, ctypes.c_uint32(mark_id), target_value(addr))
            for mark_id in freed:
                libbpf.update(fd, ctypes.c_uint32(mark_id), HcTarget())

    def mark_for(self, address: IPAddr) -> int:
        """The SO_MARK for probes of this backend; LookupError(reason) when there is none."""
        if self.error is not None:
            raise LookupError(self.error)
        mark_id = self.marks.ids.get(address)
        if mark_id is None:
            raise LookupError(f"backend {address} has no tunnel mark on this node")
        return HC_MARK_BASE | mark_id

    def counters(self) -> dict[str, int]:
        fd = self._fds.get("hc_stats")
        if fd is None:
            return {}
        ncpu = libbpf.num_possible_cpus()
        return {name: sum(v.value for v in libbpf.read_percpu(fd, i, ctypes.c_uint64, ncpu))
                for i, name in enumerate(HC_COUNTERS)}

    def status(self) -> dict[str, object]:
        return {"ok": self.error is None, "error": self.error, "device": PROBE_DEV,
                "table": HC_TABLE, "rule_priority": HC_RULE_PRIORITY,
                "targets": len(self.marks.ids), "counters": self.counters()}


def run_once(prog_fd: int, frame: bytes, mark: int) -> tuple[int, bytes]:
    """One BPF_PROG_TEST_RUN of hc_tunnel.c with skb->mark set (the golden test)."""
    ctx = bytearray(libbpf.skb_context())
    ctx[8:12] = mark.to_bytes(4, "little")  # struct __sk_buff: len, pkt_type, mark
    return libbpf.prog_test_run(prog_fd, frame, bytes(ctx))


__all__ = ["HealthTunnel", "MarkTable", "TunnelError", "HC_MARK_BASE", "HC_TABLE", "PROBE_DEV",
           "HC_COUNTERS", "run_once", "target_value", "config_value"]
