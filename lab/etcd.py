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
            "--initial-cluster-token", f"maglev-{self.data_dir.parent.name}",
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
                               base / f"m{i}.log") for i in range(size)])

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
