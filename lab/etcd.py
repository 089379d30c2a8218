"""Real etcd members for the lab and the tests: started by hand (no systemd unit), each with its
own data directory, stopped by PID.

A member can run on the host (loopback, for the integration tests) or inside a network
namespace (the lab's etcd cluster). ``EtcdCluster`` starts N members that form one cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

ETCD = "etcd"


class EtcdStartError(RuntimeError):
    pass


def free_port() -> int:
    """A port the kernel has just given out on loopback (the tests' members each need two)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EtcdMember:
    name: str
    address: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    netns: str | None = None
    # Every member of one cluster must share it (etcd refuses peers with another cluster ID).
    cluster_token: str = "maglev"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def client_url(self) -> str:
        return f"http://{_host(self.address)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{_host(self.address)}:{self.peer_port}"

    def argv(self, initial_cluster: str, state: str = "new") -> list[str]:
        argv = [
            ETCD, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster, "--initial-cluster-state", state,
            "--initial-cluster-token", self.cluster_token,
            # Lab-sized timings: a lost leader is replaced within a second, not five.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--log-level", "warn",
        ]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def start(self, initial_cluster: str, state: str = "new") -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # Its own session: a Ctrl-C in the terminal that ran `lab up` does not reach it.
            self.proc = subprocess.Popen(self.argv(initial_cluster, state), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self.proc.pid

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with _opener(self.netns)(self.client_url + "/health", timeout=timeout) as resp:
                return b'"true"' in resp.read()
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop by PID (SIGTERM, then SIGKILL); with ip netns exec the PID is etcd's own, since
        ip execs into it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _opener(netns: str | None):
    """urllib's urlopen, from inside netns when the member lives there (the health check must
    reach it the way the nodes do)."""
    if netns is None:
        return urllib.request.urlopen
    from lab.nssocket import in_netns

    def open_in(url: str, timeout: float):
        with in_netns(netns):
            return urllib.request.urlopen(url, timeout=timeout)
    return open_in


class EtcdCluster:
    def __init__(self, members: Sequence[EtcdMember]) -> None:
        self.members = list(members)

    @classmethod
    def on_loopback(cls, base: Path, size: int = 1) -> "EtcdCluster":
        return cls([EtcdMember(f"m{i}", "127.0.0.1", free_port(), free_port(), base / f"m{i}",
                               base / f"m{i}.log", cluster_token=f"maglev-test-{os.getpid()}-{base.name}")
                    for i in range(size)])

    @property
    def initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 20.0) -> None:
        for m in self.members:
            m.start(self.initial_cluster)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 20.0, members: Sequence[EtcdMember] | None = None) -> None:
        deadline = time.monotonic() + timeout
        waiting = list(members or self.members)
        while waiting:
            dead = [m for m in waiting if m.proc is not None and m.proc.poll() is not None]
            if dead:
                raise EtcdStartError(f"etcd member {dead[0].name} exited: {_tail(dead[0].log)}")
            waiting = [m for m in waiting if not m.healthy()]
            if waiting and time.monotonic() > deadline:
                raise EtcdStartError(f"etcd member(s) {', '.join(m.name for m in waiting)} not healthy "
                                     f"after {timeout:g} s: {_tail(waiting[0].log)}")
            if waiting:
                time.sleep(0.2)

    def restart(self, member: EtcdMember, timeout: float = 20.0) -> None:
        """Start a stopped member again on its data directory (it rejoins the cluster)."""
        member.start(self.initial_cluster, state="existing")
        self.wait_healthy(timeout, [member])

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def remove_data(self) -> None:
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def etcd_available() -> bool:
    return shutil.which(ETCD) is not None and os.access(shutil.which(ETCD), os.X_OK)


# ---------------------------------------------------------------------------------- the lab


def etcd_ns(k: int) -> str:
    from lab import plan as P

    return f"{P.NS_PREFIX}etcd-{k}"


def lab_members(plan) -> list[EtcdMember]:
    """The lab's members: mlb-etcd-K, data under the lab's run dir (removed by `lab down`)."""
    from lab import plan as P

    return [EtcdMember(f"etcd-{k}", P.etcd_address(k), P.ETCD_CLIENT_PORT, P.ETCD_PEER_PORT,
                       plan.run_dir / f"etcd-{k}" / "data", plan.run_dir / f"etcd-{k}" / "etcd.log",
                       netns=etcd_ns(k), cluster_token="maglev-lab")
            for k in range(1, P.ETCD_MEMBERS + 1)]


def build_control_network(plan) -> None:
    """The control bridge in the router's namespace (no address on it: the router does not
    route between the control network and the fabric), each member's namespace on it, and a
    ctl0 link from every node."""
    from lab import plan as P
    from lab.netns import Netns, quiet_ipv6, veth

    router = Netns(P.ROUTER_NS)
    router.ip("link", "add", P.CONTROL_BRIDGE, "type", "bridge")
    router.ip("link", "set", P.CONTROL_BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    router.link_up(P.CONTROL_BRIDGE)
    for k in range(1, P.ETCD_MEMBERS + 1):
        ns = Netns.create(etcd_ns(k))
        quiet_ipv6(ns)
        veth(router, f"etcd-{k}", ns, "eth0")
        router.ip("link", "set", f"etcd-{k}", "master", P.CONTROL_BRIDGE)
        ns.add_address("eth0", f"{P.etcd_address(k)}/24")
    for h in plan.node_hosts:
        port = f"ctl-{h.name}"
        veth(router, port, Netns(h.ns), "ctl0")
        router.ip("link", "set", port, "master", P.CONTROL_BRIDGE)
        Netns(h.ns).add_address("ctl0", f"{P.node_control_address(h.index)}/24")


def set_control_link(plan, index: int, up: bool) -> None:
    """Cut node I off from etcd (its ctl0 down) or reconnect it; its data path (eth0) is untouched."""
    from lab.netns import Netns

    Netns(plan.node(index).ns).ip("link", "set", "ctl0", "up" if up else "down")


def fleet_argv(plan, action: str, *args: str, node: int = 1) -> list[str]:
    """`maglev fleet ACTION ARGS` as an operator on node I runs it (the members are on the
    control network, which only the nodes reach)."""
    import sys

    from lab import plan as P

    return ["ip", "netns", "exec", plan.node(node).ns, sys.executable, "-m", "node.cli", "fleet", action,
            "--endpoints", ",".join(P.etcd_endpoints()), "--prefix", P.ETCD_PREFIX, *args]


def fleet(plan, *args: str, node: int = 1, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(fleet_argv(plan, *args, node=node), capture_output=True, text=True, timeout=timeout)
