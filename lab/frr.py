"""An FRR router (zebra + bgpd, optionally bfdd) run by hand inside a network namespace.

The tests and the lab need a real router that spreads a VIP over the nodes by ECMP. FRR from the
Debian package is started without systemd: every daemon gets its own config, pid file, zebra API
socket and vty socket directory (owned by user ``frr``, which the daemons drop to), so several
routers can run on one machine without touching /etc/frr. The router is queried through
``vtysh --vty_socket DIR`` with JSON output, and stopped by the PIDs it wrote.

Public API:
- ``render_config(...) -> str`` (bgpd config: AS, router id, neighbors or listen ranges,
  maximum-paths, multipath-relax, timers, optional BFD per neighbor)
- ``render_bfd_config(peers) -> str`` (bfdd: the router's profile, or a node's peers; from bgp.bfd,
  shared with the node's own bfdd)
- ``FrrRouter(ns, config, workdir=None)`` with ``start()``, ``stop()``, ``vtysh()``, ``vtysh_json()``,
  ``routes(prefix)``, ``nexthops(prefix)``, ``neighbors()``, ``kernel_nexthops(prefix)``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bgp.bfd import (BFD_PROFILE, FRR_DIR, VTYSH, frr_daemon_argv, parse_bfd_peers, prepare_frr_dir,
                     render_bfd_config, vtysh_argv)
from lab.netns import Netns, NetnsError

# Re-exported: the tests and the lab's plan render bfdd configs through lab.frr.
__all__ = ["BFD_PROFILE", "FRR_DIR", "FrrRouter", "Neighbor", "render_bfd_config", "render_config",
           "parse_route_nexthops", "frr_available"]


@dataclass(frozen=True)
class Neighbor:
    """A static BGP neighbor of the router (use with BFD: listen ranges re-create BFD per flap)."""

    address: str
    remote_as: int | str = "external"  # an ASN, or "external"/"internal"
    bfd: bool = False  # uses the BFD profile BFD_PROFILE (see render_bfd_config)


def _af(version: int) -> str:
    return "ipv4" if version == 4 else "ipv6"


def render_config(
    *,
    asn: int,
    router_id: str,
    neighbors: Sequence[Neighbor] = (),
    listen_ranges: Sequence[str] = (),
    listen_remote_as: int | str = "external",
    maximum_paths: int = 8,
    multipath_relax: bool = True,
    timers: tuple[int, int] = (1, 3),
    hostname: str = "router",
    stalepath_time: int | None = None,
) -> str:
    """The bgpd configuration of a router that installs every node's path (ECMP).

    - ``maximum-paths`` in both address families: without it FRR installs one best path only.
    - ``bgp bestpath as-path multipath-relax``: nodes with different ASNs are still multipath.
    - ``no bgp ebgp-requires-policy``: FRR 8 otherwise ignores eBGP routes without a route-map.
    - ``timers 1 3``: 3 s hold time, the smallest both FRR and ExaBGP accept.
    - listen ranges accept any node in the range (one peer group per family).
    - graceful restart: FRR is a helper by default (it keeps a restarting node's routes for the
      restart time the node's OPEN asks for). ``stalepath_time`` bounds how long they stay
      after the node's new session came up without its End-of-RIB (FRR's default is 360 s).
    """
    ipaddress.IPv4Address(router_id)
    keep, hold = timers
    lines = [
        f"hostname {hostname}",
        "log timestamp precision 3",
        f"router bgp {int(asn)}",
        f" bgp router-id {router_id}",
        " no bgp ebgp-requires-policy",
        " no bgp default ipv4-unicast",
        " bgp log-neighbor-changes",
    ]
    if multipath_relax:
        lines.append(" bgp bestpath as-path multipath-relax")
    if stalepath_time is not None:
        lines.append(f" bgp graceful-restart stalepath-time {int(stalepath_time)}")
    groups: dict[int, str] = {}
    for cidr in listen_ranges:
        net = ipaddress.ip_network(cidr)
        group = f"NODES{net.version}"
        if net.version not in groups:
            groups[net.version] = group
            lines += [f" neighbor {group} peer-group", f" neighbor {group} remote-as {listen_remote_as}",
                      f" neighbor {group} timers {keep} {hold}",
                      f" neighbor {group} timers connect 1"]
        lines.append(f" bgp listen range {net} peer-group {group}")
    for n in neighbors:
        addr = ipaddress.ip_address(n.address)
        lines += [f" neighbor {addr} remote-as {n.remote_as}", f" neighbor {addr} timers {keep} {hold}",
                  f" neighbor {addr} timers connect 1"]
        if n.bfd:
            lines.append(f" neighbor {addr} bfd profile {BFD_PROFILE}")
    for version in (4, 6):
        members = [groups[version]] if version in groups else []
        members += [str(n.address) for n in neighbors if ipaddress.ip_address(n.address).version == version]
        if not members:
            continue
        lines.append(f" address-family {_af(version)} unicast")
        lines.append(f"  maximum-paths {int(maximum_paths)}")
        lines += [f"  neighbor {m} activate" for m in members]
        lines.append(" exit-address-family")
    lines.append("exit")
    return "\n".join(lines) + "\n"


class FrrRouter:
    """zebra + bgpd (+ bfdd) of one router namespace, with private files under ``workdir``."""

    def __init__(self, ns: Netns, config: str, workdir: Path | None = None, *, bfd: bool = False,
                 bfd_config: str | None = None, bgp: bool = True):
        """config: bgpd's; bfd: also run bfdd (with bfd_config, default: the profile only);
        bgp=False with bfd=True runs bfdd alone, as on a node whose BGP speaker is ExaBGP."""
        self.ns = ns
        # The daemons run as user frr, so every parent of the directory must be searchable by
        # it; pytest's tmp_path is not (0700), hence a private directory under /tmp by default.
        self._own_dir = workdir is None
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"{ns.name}-frr-", dir="/tmp"))
        self.config = config
        self.bfd_config = bfd_config if bfd_config is not None else render_bfd_config()
        self.daemons = (["zebra", "bgpd"] if bgp else []) + (["bfdd"] if bfd else [])
        if not self.daemons:
            raise ValueError("FrrRouter needs bgp=True or bfd=True")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "zebra.conf").write_text("hostname zebra\n")
        (self.dir / "bgpd.conf").write_text(self.config)
        (self.dir / "bfdd.conf").write_text(self.bfd_config)
        # The daemons drop to user frr and must write their pid files and sockets here.
        prepare_frr_dir(self.dir)
        for daemon in self.daemons:
            self._start_daemon(daemon)
        self._wait_ready(timeout)

    def _start_daemon(self, daemon: str) -> None:
        proc = self.ns.run(*frr_daemon_argv(daemon, self.dir), check=False, timeout=20)
        if proc.returncode != 0:
            raise NetnsError(f"FRR {daemon} in {self.ns.name} failed to start ({proc.returncode}): "
                             f"{proc.stderr.strip() or proc.stdout.strip()}; see {self.dir / daemon}.log")
        # zebra must be listening before bgpd connects, or bgpd retries on a slow timer.
        if daemon == "zebra":
            self._wait_path(self.dir / "zserv.api", 5.0)

    def _wait_path(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise NetnsError(f"{path} did not appear within {timeout} s")
            time.sleep(0.02)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = "show bgp summary json" if "bgpd" in self.daemons else "show bfd peers json"
        while True:
            proc = self._vtysh_proc(probe)
            if proc.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise NetnsError(f"FRR in {self.ns.name} did not answer vtysh: {proc.stderr.strip()}")
            time.sleep(0.05)

    def pids(self) -> dict[str, int]:
        out = {}
        for daemon in self.daemons:
            try:
                out[daemon] = int((self.dir / f"{daemon}.pid").read_text().strip())
            except (OSError, ValueError):
                pass
        return out

    def stop(self) -> None:
        """Stop the daemons by the PIDs they wrote (bgpd first so it does not reinstall)."""
        for daemon, pid in sorted(self.pids().items(), key=lambda kv: kv[0] != "bgpd"):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- queries -------------------------------------------------------------------------------

    def _vtysh_proc(self, *commands: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(vtysh_argv(self.dir, *commands), capture_output=True, text=True, timeout=15)

    def vtysh(self, *commands: str) -> str:
        proc = self._vtysh_proc(*commands)
        if proc.returncode != 0:
            raise NetnsError(f"vtysh {commands} in {self.ns.name} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def vtysh_json(self, command: str) -> Any:
        out = self.vtysh(command).strip()
        return json.loads(out) if out else {}

    def routes(self, prefix: str) -> list[dict]:
        """zebra's entries for exactly this prefix (``show ip[v6] route PREFIX json``)."""
        net = ipaddress.ip_network(prefix)
        cmd = "show ip route" if net.version == 4 else "show ipv6 route"
        data = self.vtysh_json(f"{cmd} {net} json")
        return data.get(str(net), [])

    def nexthops(self, prefix: str, *, protocol: str = "bgp") -> set[str]:
        """Active, FIB-installed nexthop addresses of the selected route for prefix."""
        hops: set[str] = set()
        for entry in self.routes(prefix):
            if entry.get("protocol") != protocol or not entry.get("selected"):
                continue
            for nh in entry.get("nexthops", []):
                if nh.get("active") and nh.get("fib") and nh.get("ip"):
                    hops.add(nh["ip"])
        return hops

    def bgp_paths(self, prefix: str) -> list[dict]:
        """bgpd's paths for prefix (``show bgp ipv4|ipv6 unicast PREFIX json``)."""
        net = ipaddress.ip_network(prefix)
        data = self.vtysh_json(f"show bgp {_af(net.version)} unicast {net} json")
        return data.get("paths", [])

    def neighbors(self) -> dict[str, dict]:
        """Every BGP neighbor (static or dynamic) -> FRR's neighbor JSON (``bgpState`` etc.)."""
        data = self.vtysh_json("show bgp neighbors json")
        return {k: v for k, v in data.items() if isinstance(v, dict) and "bgpState" in v}

    def graceful_restart(self, peer: str) -> dict:
        """FRR's graceful-restart view of one neighbor (``gracefulRestartInfo``: modes, timers,
        End-of-RIB sent/received per family), empty when it has none."""
        info = self.neighbors().get(str(ipaddress.ip_address(peer)), {})
        return info.get("gracefulRestartInfo") or {}

    def established(self) -> set[str]:
        return {peer for peer, info in self.neighbors().items() if info.get("bgpState") == "Established"}

    def bfd_peers(self) -> dict[str, str]:
        """BFD peer address -> status ('up', 'down', 'init')."""
        return {peer: info["status"] for peer, info in parse_bfd_peers(self.vtysh_json("show bfd peers json")).items()}

    def kernel_nexthops(self, prefix: str) -> set[str]:
        """Nexthops of prefix in the router namespace's kernel FIB (``ip route show``)."""
        net = ipaddress.ip_network(prefix)
        out = self.ns.ip(f"-{net.version}", "route", "show", "exact", str(net)).stdout
        return parse_route_nexthops(out)


def parse_route_nexthops(text: str) -> set[str]:
    """Gateways of ``ip route show`` output: single path (``via X``) or multipath (``nexthop via X``)."""
    words = text.split()
    return {words[i + 1] for i, w in enumerate(words[:-1]) if w == "via" and words[i + 1] not in ("inet", "inet6")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours would look alive; FRR daemons are daemonized (not our children).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def frr_available() -> bool:
    return (FRR_DIR / "bgpd").exists() and shutil.which(VTYSH) is not None
