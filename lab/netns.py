"""Network namespaces and veth links for the lab and the root tests.

A thin layer over `ip netns` and `ip link`: the lab and the tests build hosts (router, nodes,
backends, client) as namespaces wired with veth pairs. Everything created here carries a prefix
so a crashed run can be swept away with `cleanup_prefix()` without touching anything else on the
machine, and processes are always stopped by PID (`ip netns pids`), never by name.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

IFNAMSIZ = 15


class NetnsError(RuntimeError):
    pass


def run(argv: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command, raising an error that shows the command and its stderr."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unique_prefix(base: str = "mlbt") -> str:
    """A short random prefix, e.g. 'mlbt3f9a', leaving room in 15-character interface names."""
    return f"{base}{secrets.token_hex(2)}"


class Netns:
    """One network namespace: a host of the lab."""

    def __init__(self, name: str):
        self.name = name

    @classmethod
    def create(cls, name: str) -> "Netns":
        if name in list_namespaces():
            delete_namespace(name)
        run(["ip", "netns", "add", name])
        ns = cls(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.exec_argv(argv), check=check, timeout=timeout, input=input)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.exec_argv(argv), **kwargs)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.name, *args], check=check)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run("sysctl", "-qw", f"{key}={value}")

    def add_address(self, dev: str, cidr: str, *, nodad: bool = True) -> None:
        extra = ["nodad"] if nodad and ":" in cidr else []
        self.ip("addr", "add", cidr, "dev", dev, *extra)

    def link_up(self, dev: str) -> None:
        self.ip("link", "set", dev, "up")

    def pids(self) -> list[int]:
        out = run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Stop every process still running in the namespace, by PID."""
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def delete(self) -> None:
        delete_namespace(self.name)


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_namespace(name: str) -> None:
    ns = Netns(name)
    ns.kill_all()
    # Processes may need a moment to exit before the namespace can go.
    deadline = time.monotonic() + 3
    while ns.pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    run(["ip", "netns", "del", name], check=False)


def veth(a: Netns | None, a_name: str, b: Netns | None, b_name: str, *, mtu: int | None = None) -> None:
    """Create a veth pair with one end in each namespace (None = the root namespace), both up."""
    for n in (a_name, b_name):
        if len(n) > IFNAMSIZ:
            raise NetnsError(f"interface name {n!r} is longer than {IFNAMSIZ} characters")
    # Created in a's namespace directly so a half-failed setup leaves nothing in the root one.
    base = ["ip"] + (["-n", a.name] if a else [])
    peer = ["peer", "name", b_name] + (["netns", b.name] if b else [])
    run([*base, "link", "add", a_name, *(["mtu", str(mtu)] if mtu else []), "type", "veth", *peer])
    if mtu:
        run(["ip", *(["-n", b.name] if b else []), "link", "set", b_name, "mtu", str(mtu)])
    for ns, name in ((a, a_name), (b, b_name)):
        run(["ip", *(["-n", ns.name] if ns else []), "link", "set", name, "up"])


def quiet_ipv6(ns: Netns, *, keep_addr_on_down: bool = False) -> None:
    """No duplicate address detection (FRR resets IPv6 sessions until addresses settle), and
    optionally keep addresses when a link goes down (a node whose link flaps keeps its peers)."""
    ns.sysctl("net.ipv6.conf.all.accept_dad", 0)
    ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
    if keep_addr_on_down:
        ns.sysctl("net.ipv6.conf.all.keep_addr_on_down", 1)


def point_to_point(a: Netns, a_name: str, b: Netns, b_name: str, v4_net: str, v6_net: str) -> None:
    """A veth link with a dual-stack /24 and /64: a gets .1 / ::1, b gets .2 / ::2.
    v4_net is the first three octets ("10.77.1"), v6_net the prefix ("fd77:1")."""
    veth(a, a_name, b, b_name)
    a.add_address(a_name, f"{v4_net}.1/24")
    a.add_address(a_name, f"{v6_net}::1/64")
    b.add_address(b_name, f"{v4_net}.2/24")
    b.add_address(b_name, f"{v6_net}::2/64")


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace (and root-namespace link) whose name starts with prefix."""
    removed = []
    for name in list_namespaces():
        if name.startswith(prefix):
            delete_namespace(name)
            removed.append(name)
    out = run(["ip", "-o", "link", "show"], check=False).stdout
    for line in out.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            dev = parts[1].strip().split("@")[0]
            if dev.startswith(prefix):
                run(["ip", "link", "del", dev], check=False)
    return removed


def mount_bpffs(path: str | Path) -> Path:
    """Mount a private bpffs (namespaces hide /sys/fs/bpf); idempotent."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    mounts = Path("/proc/mounts").read_text()
    if not any(line.split()[1] == str(p) and line.split()[2] == "bpf" for line in mounts.splitlines()):
        run(["mount", "-t", "bpf", "bpf", str(p)])
    return p


def umount(path: str | Path) -> None:
    run(["umount", "-l", str(path)], check=False)
