"""Prepare a host to be a DSR backend of the load balancer, and undo it.

A backend receives client packets wrapped in GRE by a forwarder node and answers the client
directly (direct server return), with the VIP as its source. That needs four things:

1. the VIPs on ``lo`` (/32, /128), so the kernel accepts and answers packets for them;
2. ARP sysctls, so the backend never answers ARP for a VIP or uses one as an ARP source
   (``arp_ignore=1``, ``arp_announce=2``; otherwise it would steal the VIP from the router);
3. loose reverse-path filtering on the receiving interface (``rp_filter=2``): the decapsulated
   packet carries the client's source, which strict rp_filter may reject;
4. something that strips GRE: the tc-BPF program bpf/decap.c (``decap="bpf"``, for kernels
   without GRE, like the lab's), or a kernel collect-metadata gre / ip6gre device
   (``decap="kernel"``).

Setup is declarative and idempotent: running it again with another VIP list makes that list the
served set (VIPs dropped from it leave ``lo`` and the decap map). What setup changed, and the
sysctl values it replaced, is recorded in a state file so teardown restores exactly that.

Public API:
- ``setup(BackendOptions, log=print, dry_run=False) -> None``
- ``teardown(interface, vips=None, bpffs=..., state_dir=..., log=print) -> None``
- ``status(interface, bpffs=...) -> tc.DecapStatus``
- ``kernel_gre_commands(interface, vips) -> list[list[str]]`` (the kernel path, as commands)
- ``BackendSetupError``
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

from node.forwarder import tc

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
Log = Callable[[str], None]

DEFAULT_BPFFS = Path("/sys/fs/bpf/maglev-backend")
DEFAULT_STATE_DIR = Path("/run/maglev")
GRE4_DEV = "gre-mlb"
GRE6_DEV = "gre6-mlb"
ARP_IGNORE, ARP_ANNOUNCE, RP_FILTER = 1, 2, 2


class BackendSetupError(RuntimeError):
    """Setup or teardown cannot proceed; the message says what failed and what to do."""


@dataclass(frozen=True)
class BackendOptions:
    interface: str
    vips: tuple[IPAddr, ...]
    decap: Literal["bpf", "kernel"] = "bpf"
    bpffs: Path = DEFAULT_BPFFS
    state_dir: Path = DEFAULT_STATE_DIR


@dataclass
class _State:
    """What setup changed; persisted as JSON so teardown (another process) can undo it."""

    interface: str
    decap: str
    vips: list[str] = field(default_factory=list)
    added_vips: list[str] = field(default_factory=list)  # on lo because of us
    sysctls: dict[str, str] = field(default_factory=dict)  # key -> value before our first write
    created_clsact: bool = False
    gre_devices: list[str] = field(default_factory=list)
    pin_dir: str | None = None


# ---------------------------------------------------------------------------------------------
# Small system helpers
# ---------------------------------------------------------------------------------------------


def _run(argv: Sequence[str], what: str) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise BackendSetupError(f"{what}: {argv[0]} is not installed (install iproute2)") from None
    if proc.returncode != 0:
        raise BackendSetupError(
            f"{what}: `{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def _netns_tag() -> str:
    """'' in the host's network namespace, '_netns<inode>' in another one. Pins and state of
    backends in different namespaces (the lab) must not collide even with equal interface
    names. (bpffs refuses '.' in names, hence '_'.)"""
    mine = os.stat("/proc/self/ns/net").st_ino
    try:
        init = os.stat("/proc/1/ns/net").st_ino
    except OSError:
        init = None
    return "" if mine == init else f"_netns{mine}"


def _sysctl_key(family: str, dev: str, name: str) -> str:
    # Interface names may contain dots; /proc/sys paths keep them, so build the key from parts.
    return f"net.{family}.conf.{dev}.{name}"


def _read_sysctl(key: str) -> str:
    family, _, dev, name = _split_key(key)
    return (Path("/proc/sys/net") / family / "conf" / dev / name).read_text().strip()


def _write_sysctl(key: str, value: str) -> None:
    family, _, dev, name = _split_key(key)
    path = Path("/proc/sys/net") / family / "conf" / dev / name
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise BackendSetupError(f"cannot set {key}={value}: {exc.strerror} (run as root)") from None


def _sysctl_arg(key: str) -> str:
    """The key as sysctl(8) accepts it: the slash form when a device name contains a dot."""
    family, conf, dev, name = _split_key(key)
    return f"net/{family}/{conf}/{dev}/{name}" if "." in dev else key


def _split_key(key: str) -> tuple[str, str, str, str]:
    # "net.ipv4.conf.<dev>.<name>", where <dev> may contain dots.
    head, name = key.rsplit(".", 1)
    parts = head.split(".", 3)
    return parts[1], parts[2], parts[3], name


def _lo_addresses() -> set[IPAddr]:
    out = _run(["ip", "-j", "addr", "show", "dev", "lo"], "listing addresses on lo")
    found: set[IPAddr] = set()
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            found.add(ipaddress.ip_address(a["local"]))
    return found


def _prefix(vip: IPAddr) -> str:
    return f"{vip}/{vip.max_prefixlen}"


def _ifindex(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise BackendSetupError(
            f"interface {interface!r} does not exist in this network namespace "
            "(check --interface; `ip link` lists the interfaces)"
        ) from None


def _is_bpffs(path: Path) -> bool:
    """Whether path lies on a bpf filesystem (by the longest matching mount point)."""
    best, fstype = "", ""
    target = str(path.resolve()) if path.exists() else str(path)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype == "bpf"


def _pin_dir(bpffs: Path, interface: str) -> Path:
    return bpffs / f"{interface.replace('.', '_')}{_netns_tag()}"


def _state_path(state_dir: Path, interface: str) -> Path:
    return state_dir / f"backend-{interface}{_netns_tag()}.json"


def _load_state(path: Path) -> _State | None:
    try:
        return _State(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise BackendSetupError(f"{path}: unreadable backend state ({exc}); delete it and re-run") from None


def _save_state(path: Path, state: _State) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.__dict__, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _has_clsact(interface: str) -> bool:
    return "clsact" in _run(["tc", "qdisc", "show", "dev", interface], f"listing qdiscs of {interface}")


def _tc_filters_left(interface: str) -> bool:
    for direction in ("ingress", "egress"):
        if _run(["tc", "filter", "show", "dev", interface, direction], f"listing tc filters of {interface}").strip():
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Plans shared by both paths
# ---------------------------------------------------------------------------------------------


def dsr_sysctls(interface: str, extra_devices: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The sysctls a DSR backend needs, in the order setup writes them. The kernel takes the
    max of 'all' and the device for each of these, so loose rp_filter on the receiving devices
    is enough and 'all' keeps its (possibly strict) value for the rest of the host."""
    out = []
    for dev in ("all", interface):
        out.append((_sysctl_key("ipv4", dev, "arp_ignore"), str(ARP_IGNORE)))
        out.append((_sysctl_key("ipv4", dev, "arp_announce"), str(ARP_ANNOUNCE)))
    for dev in (interface, *extra_devices):
        out.append((_sysctl_key("ipv4", dev, "rp_filter"), str(RP_FILTER)))
    return out


def gre_devices_for(vips: Iterable[IPAddr]) -> list[tuple[str, str]]:
    """(device, type) per outer family. A VIP's backends share its family, so the forwarder's
    outer header is IPv4 for IPv4 VIPs and IPv6 for IPv6 VIPs."""
    families = {v.version for v in vips}
    out = []
    if 4 in families:
        out.append((GRE4_DEV, "gre"))
    if 6 in families:
        out.append((GRE6_DEV, "ip6gre"))
    return out


def kernel_gre_commands(interface: str, vips: Sequence[IPAddr]) -> list[list[str]]:
    """The kernel-GRE backend setup as shell commands (what --decap kernel runs, in order).

    'external' (collect-metadata) devices receive every plain GRE packet for a local address
    that no more specific tunnel claims, whatever the forwarder's source address, so one device
    per family serves all nodes."""
    devices = gre_devices_for(vips)
    cmds: list[list[str]] = []
    for dev, kind in devices:
        cmds.append(["ip", "link", "add", dev, "type", kind, "external"])
        cmds.append(["ip", "link", "set", dev, "up"])
    for key, value in dsr_sysctls(interface, [d for d, _ in devices]):
        cmds.append(["sysctl", "-w", f"{_sysctl_arg(key)}={value}"])
    for vip in vips:
        cmds.append(["ip", "addr", "replace", _prefix(vip), "dev", "lo"])
    return cmds


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def setup(opts: BackendOptions, log: Log = print, dry_run: bool = False) -> None:
    """Make this host a DSR backend for opts.vips on opts.interface. Prints one line per change.

    Order matters: sysctls before the VIPs reach lo (or the host could answer ARP for a VIP
    in between), VIPs before decapsulation starts (or decapsulated packets would be dropped)."""
    if not opts.vips:
        raise BackendSetupError("give at least one --vip ADDRESS the backend serves")
    for vip in opts.vips:
        if vip.is_multicast or vip.is_unspecified or vip.is_loopback or vip.is_link_local:
            raise BackendSetupError(f"--vip {vip}: a VIP must be a unicast, non-loopback, non-link-local address")
    ifindex = _ifindex(opts.interface)
    if opts.decap == "kernel":
        return _setup_kernel(opts, log, dry_run)
    pin_dir = _pin_dir(opts.bpffs, opts.interface)
    if dry_run:
        for key, value in dsr_sysctls(opts.interface):
            log(f"would set {key}={value}")
        for vip in opts.vips:
            log(f"would add {_prefix(vip)} to lo")
        log(f"would attach {tc.PROG_NAME} (bpf/decap.c) on {opts.interface} clsact ingress, "
            f"decapsulating GRE for {', '.join(map(str, opts.vips))}; maps pinned in {pin_dir}")
        return None
    if not _is_bpffs(opts.bpffs):
        raise BackendSetupError(
            f"{opts.bpffs} is not on a bpf filesystem, so the decap maps cannot be pinned. Mount "
            f"one (`mount -t bpf bpf {opts.bpffs}`; note `ip netns exec` hides /sys/fs/bpf) or "
            "pass --bpffs DIR on a mounted bpffs"
        )
    state_path, state = _state_for(opts, "bpf")
    obj = tc.build_decap_object()
    # Record the pre-existing clsact before anything else touches it, so teardown only removes
    # the qdisc when it was ours.
    if not state.pin_dir:
        state.created_clsact = not _has_clsact(opts.interface)
    state.pin_dir = str(pin_dir)
    _save_state(state_path, state)

    _apply_sysctls(dsr_sysctls(opts.interface), state, state_path, log)
    _apply_vips(opts.vips, state, state_path, log)
    pin_dir.mkdir(parents=True, exist_ok=True)
    with tc.DecapProgram.load(obj, pin_dir) as prog:
        prog.set_vips(opts.vips)
        prog_id = prog.attach(ifindex, create_hook=not _has_clsact(opts.interface))
    log(f"attached {tc.PROG_NAME} (program id {prog_id}) on {opts.interface} clsact ingress "
        f"(handle {tc.TC_HANDLE:#x}, priority {tc.TC_PRIORITY}); decapsulating GRE for "
        f"{', '.join(map(str, opts.vips))}; maps pinned in {pin_dir}")
    return None


def _apply_sysctls(wanted: list[tuple[str, str]], state: _State, state_path: Path, log: Log) -> None:
    for key, value in wanted:
        try:
            old = _read_sysctl(key)
        except OSError:
            raise BackendSetupError(f"cannot read {key}: does the device exist?") from None
        state.sysctls.setdefault(key, old)
        _save_state(state_path, state)  # before the write: a crash must not lose the old value
        if old != value:
            _write_sysctl(key, value)
            log(f"set {key}={value} (was {old})")
        else:
            log(f"{key} is already {value}")


def _apply_vips(vips: Sequence[IPAddr], state: _State, state_path: Path, log: Log) -> None:
    present = _lo_addresses()
    wanted = {str(v) for v in vips}
    for vip in vips:
        if vip in present:
            log(f"{_prefix(vip)} is already on lo")
        else:
            _run(["ip", "addr", "add", _prefix(vip), "dev", "lo"], f"adding VIP {vip} to lo")
            state.added_vips.append(str(vip))
            log(f"added {_prefix(vip)} to lo")
    # VIPs an earlier setup served that this one no longer lists leave lo (if we added them).
    for old in [v for v in state.vips if v not in wanted]:
        _remove_vip(ipaddress.ip_address(old), state, log)
    state.vips = sorted(wanted)
    _save_state(state_path, state)


def _remove_vip(vip: IPAddr, state: _State, log: Log) -> None:
    if str(vip) in state.added_vips:
        if vip in _lo_addresses():
            _run(["ip", "addr", "del", _prefix(vip), "dev", "lo"], f"removing VIP {vip} from lo")
            log(f"removed {_prefix(vip)} from lo")
    else:
        log(f"left {_prefix(vip)} on lo: it was there before setup")
    if str(vip) in state.added_vips:
        state.added_vips.remove(str(vip))
    if str(vip) in state.vips:
        state.vips.remove(str(vip))


def _state_for(opts: BackendOptions, decap: str) -> tuple[Path, "_State"]:
    """The interface's recorded setup; refuses to mix decap kinds on one interface, since
    teardown could then undo only half of it."""
    state_path = _state_path(opts.state_dir, opts.interface)
    state = _load_state(state_path) or _State(opts.interface, decap)
    if state.decap != decap:
        raise BackendSetupError(
            f"{opts.interface} was set up with --decap {state.decap}; run `maglev backend teardown "
            f"--interface {opts.interface}` first"
        )
    return state_path, state


def _setup_kernel(opts: BackendOptions, log: Log, dry_run: bool) -> None:
    cmds = kernel_gre_commands(opts.interface, opts.vips)
    if dry_run:
        for argv in cmds:
            log(" ".join(argv))
        return None
    state_path, state = _state_for(opts, "kernel")
    # The GRE devices first: on a kernel without GRE this is what fails, and it should fail
    # before anything else on the host has changed.
    for dev, kind in gre_devices_for(opts.vips):
        if dev in state.gre_devices:
            log(f"{dev} ({kind}) already exists")
            continue
        argv = ["ip", "link", "add", dev, "type", kind, "external"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if "Unknown device type" in err or "not supported" in err.lower():
                hint = "this kernel has no GRE support (no ip_gre/ip6_gre module); use --decap bpf"
            elif "exists" in err.lower():
                hint = (f"a device named {dev} (or a collect-metadata {kind} device) already exists; "
                        f"remove it (`ip link del {dev}`) or run `maglev backend teardown` first")
            else:
                hint = f"`maglev backend teardown --interface {opts.interface}` undoes any partial setup"
            raise BackendSetupError(f"`{' '.join(argv)}` failed: {err}: {hint}")
        state.gre_devices.append(dev)
        _save_state(state_path, state)
        log(" ".join(argv))
        _run(["ip", "link", "set", dev, "up"], f"bringing {dev} up")
        log(f"ip link set {dev} up")
    devs = [d for d, _ in gre_devices_for(opts.vips)]
    _apply_sysctls(dsr_sysctls(opts.interface, devs), state, state_path, log)
    _apply_vips(opts.vips, state, state_path, log)
    return None


# ---------------------------------------------------------------------------------------------
# Teardown and status
# ---------------------------------------------------------------------------------------------


def teardown(
    interface: str,
    vips: Sequence[IPAddr] | None = None,
    bpffs: Path = DEFAULT_BPFFS,
    state_dir: Path = DEFAULT_STATE_DIR,
    log: Log = print,
) -> None:
    """Undo setup. With vips, stop serving only those (the rest stays set up); when none is
    left, or without vips, remove everything setup did and restore the sysctls it changed."""
    ifindex = _ifindex(interface)
    state_path = _state_path(state_dir, interface)
    state = _load_state(state_path)
    pin_dir = Path(state.pin_dir) if state and state.pin_dir else _pin_dir(bpffs, interface)
    recorded = state is not None
    if state is None:
        log(f"no setup record in {state_path}: removing what can be found; sysctls stay as they are")
        state = _State(interface, "bpf", pin_dir=str(pin_dir))
    served = _served_vips(state, pin_dir)
    gone = list(vips) if vips else served
    if not recorded:  # nothing says the VIPs predate setup: treat them as setup's
        state.added_vips = [str(v) for v in gone]
    remaining = [v for v in served if v not in gone]
    if vips and remaining:
        _teardown_some(gone, remaining, state, state_path, pin_dir, log)
        return
    if _has_clsact(interface) and tc.detach(ifindex):
        log(f"detached {tc.PROG_NAME} from {interface} clsact ingress")
    if state.created_clsact and _has_clsact(interface) and not _tc_filters_left(interface):
        _run(["tc", "qdisc", "del", "dev", interface, "clsact"], f"removing clsact from {interface}")
        log(f"removed the clsact qdisc setup added to {interface}")
    _unpin(pin_dir, log)
    for dev in list(state.gre_devices):
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
        log(f"deleted {dev}")
    for vip in gone:
        _remove_vip(vip, state, log)
    for key, old in reversed(list(state.sysctls.items())):
        try:
            if _read_sysctl(key) != old:
                _write_sysctl(key, old)
                log(f"restored {key}={old}")
        except OSError:
            pass  # the device is gone (a GRE device we just deleted)
    state_path.unlink(missing_ok=True)


def _served_vips(state: _State, pin_dir: Path) -> list[IPAddr]:
    if state.vips:
        return [ipaddress.ip_address(v) for v in state.vips]
    try:
        with tc.open_pinned_maps(pin_dir) as maps:
            return maps.vips()
    except tc.BpfError:
        return []


def _teardown_some(gone: list[IPAddr], remaining: list[IPAddr], state: _State,
                   state_path: Path, pin_dir: Path, log: Log) -> None:
    if state.decap == "bpf":
        with tc.open_pinned_maps(pin_dir) as maps:
            maps.set_vips(remaining)
        log(f"stopped decapsulating for {', '.join(map(str, gone))}")
    for vip in gone:
        _remove_vip(vip, state, log)
    _save_state(state_path, state)
    log(f"still serving {', '.join(map(str, remaining))}")


def _unpin(pin_dir: Path, log: Log) -> None:
    if not pin_dir.exists():
        return
    for name in (tc.VIPS_MAP, tc.STATS_MAP):
        (pin_dir / name).unlink(missing_ok=True)
    try:
        pin_dir.rmdir()
        log(f"removed pins in {pin_dir}")
    except OSError:
        log(f"left {pin_dir}: it holds files setup did not create")


def status(interface: str, bpffs: Path = DEFAULT_BPFFS) -> tc.DecapStatus:
    """The attached program id (None if not attached), served VIPs and counters."""
    ifindex = _ifindex(interface)
    prog_id = tc.attached_prog_id(ifindex) if _has_clsact(interface) else None
    pin_dir = _pin_dir(bpffs, interface)
    try:
        with tc.open_pinned_maps(pin_dir) as maps:
            return tc.DecapStatus(prog_id, maps.vips(), maps.counters())
    except tc.BpfError:
        return tc.DecapStatus(prog_id, [], {})


def decap_metrics(interface: str, st: tc.DecapStatus) -> str:
    """The decap counters in the Prometheus text format (for node_exporter's textfile collector
    or a scrape through `maglev backend status --metrics`): every outcome of every packet,
    second chance included (sc_local, sc_redirected, sc_accepted, sc_dropped)."""
    lines = []
    for metric, col, what in (("maglev_decap_packets_total", 0, "Packets"),
                              ("maglev_decap_bytes_total", 1, "Bytes")):
        lines.append(f"# HELP {metric} {what} the backend's GRE decap program saw, by outcome")
        lines.append(f"# TYPE {metric} counter")
        for name in tc.DECAP_COUNTERS:
            value = st.counters.get(name, (0, 0))[col]
            lines.append(f'{metric}{{interface="{interface}",outcome="{name}"}} {value}')
    attached = 1 if st.prog_id is not None else 0
    lines += ["# HELP maglev_decap_attached 1 when the decap program is attached to the interface",
              "# TYPE maglev_decap_attached gauge", f'maglev_decap_attached{{interface="{interface}"}} {attached}']
    return "\n".join(lines) + "\n"

