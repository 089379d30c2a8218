"""The lab: a whole maglev-lb cluster in network namespaces on this machine.

`Lab` is what `maglev lab ...`, the demo and the end-to-end tests drive: it builds the topology
(lab.topology), runs FRR in the router (lab.frr), a backend server and `maglev backend setup`
in each backend, and `maglev node --config` in each node; it can crash, stop and restart nodes
and backends, report status, and remove everything it made. Its state (sizes and PIDs) lives in
the run directory so every CLI invocation can find the running lab.

Processes are started detached (their own session) so the lab outlives `maglev lab up`; they are
stopped by PID or by deleting their namespace, never by name.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lab import plan as P
from lab import topology
from lab.netns import Netns, NetnsError, list_namespaces

Progress = Callable[[str], None]
STATE_FILE = "lab.json"
REQUIRED_TOOLS = ("ip", "ethtool", "clang", "vtysh", "mount")


class LabError(RuntimeError):
    """A lab operation failed; the message says what and what to do."""


def _alive(pid: int) -> bool:
    """True if pid runs (a zombie child counts as dead, and is reaped)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def maglev_subcommands() -> set[str]:
    """The subcommands this installation's `maglev` offers (node, backend, ... as they land)."""
    from node.cli import build_parser

    parser = build_parser()
    for action in parser._subparsers._group_actions:  # argparse has no public accessor
        return set(action.choices)
    return set()


def maglev_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


@dataclass
class Lab:
    plan: P.LabPlan
    progress: Progress = print

    # ------------------------------------------------------------------ state

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir

    @classmethod
    def load(cls, run_dir: Path = P.RUN_DIR, progress: Progress = print) -> "Lab":
        """The running lab, from its state file."""
        try:
            state = json.loads((run_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            raise LabError("no lab is up (start one with `maglev lab up`)") from None
        return cls(P.LabPlan(nodes=state["nodes"], backends=state["backends"], run_dir=run_dir,
                             config_source=state.get("config_source", "directory")), progress)

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return {"nodes": self.plan.nodes, "backends": self.plan.backends, "pids": {}}

    def _save_pid(self, name: str, pid: int | None) -> None:
        state = self._state()
        if pid is None:
            state["pids"].pop(name, None)
        else:
            state["pids"][name] = pid
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.run_dir / STATE_FILE)

    def pid(self, name: str) -> int | None:
        pid = self._state()["pids"].get(name)
        return pid if pid and _alive(pid) else None

    # ------------------------------------------------------------------ up / down

    def preflight(self) -> None:
        """Fail fast, naming what is missing."""
        if os.geteuid() != 0:
            raise LabError("maglev lab needs root (network namespaces, BPF, FRR): run it with sudo")
        missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
        from lab.frr import FRR_DIR, frr_available

        if not frr_available():
            missing.append(f"frr ({FRR_DIR}/bgpd and vtysh)")
        if missing:
            raise LabError(f"missing tools: {', '.join(missing)} (install them: `make deps`, or apt-get "
                           "install clang ethtool frr iproute2)")
        subs = maglev_subcommands()
        absent = [c for c in ("node", "backend") if c not in subs]
        if absent:
            raise LabError(f"this maglev has no {' or '.join(absent)} subcommand yet "
                           f"(`maglev {absent[0]} --help`): the lab needs `maglev node` and "
                           "`maglev backend setup`")

    def up(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Build the whole lab; on any failure remove what was made and raise LabError."""
        self.preflight()
        leftovers = topology.lab_namespaces() or topology.lab_mounts(self.run_dir) or self.run_dir.exists()
        if leftovers:
            self.progress("removing the leftovers of an earlier lab")
            self.down(quiet=True)
        try:
            self._up(wait=wait, timeout=timeout)
        except BaseException as exc:
            self.progress(f"lab up failed: {exc}")
            self.progress("cleaning up what was started")
            self.down(quiet=True)
            if isinstance(exc, (LabError, NetnsError)):
                raise LabError(str(exc)) from None
            raise

    def _up(self, *, wait: bool, timeout: float) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_state()
        topology.build(self.plan, self.progress)
        self._write_token()
        self.progress("router: starting FRR (zebra + bgpd + bfdd), ECMP over the nodes, BFD with each")
        self.router().start()
        if self.plan.config_source == "etcd":
            self.start_etcd_cluster()
        for h in self.plan.backend_hosts:
            self.progress(f"{h.name}: maglev backend setup (decap, VIPs on lo, DSR sysctls) + HTTP server")
            self.setup_backend(h.index)
            self.start_backend(h.index)
        for h in self.plan.node_hosts:
            self.progress(f"{h.name}: maglev node --config {self.plan.node_dir(h.index) / 'node.yaml'}")
            self.write_node_files(h.index)
            self.start_node(h.index, wait=False)
        if wait:
            self.wait_ready(timeout)
        self.progress("lab is up:\n" + self.plan.wiring())

    def _write_state(self) -> None:
        state = {"nodes": self.plan.nodes, "backends": self.plan.backends, "pids": {},
                 "config_source": self.plan.config_source,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=1))

    def _write_token(self) -> None:
        tok = self.plan.token_file
        tok.write_text(secrets.token_hex(16) + "\n")
        tok.chmod(0o600)

    @property
    def token(self) -> str:
        return self.plan.token_file.read_text().strip()

    def wait_ready(self, timeout: float) -> None:
        """Wait until every node's API answers and the router has every node as a nexthop for
        every VIP (warm-up, health rise and BGP included)."""
        deadline = time.monotonic() + timeout
        for h in self.plan.node_hosts:
            self.progress(f"waiting for {h.name}'s API on 127.0.0.1:{P.API_PORT}")
            pid = self._state()["pids"].get(h.name, 0)
            self._wait(lambda: self._node_answers(h.index, pid), deadline, f"{h.name}'s API",
                       self.plan.node_dir(h.index) / "node.log")
        for vip in (P.VIP_V4, P.VIP_V6):
            self.progress(f"waiting for the router to install {vip} via all {self.plan.nodes} nodes")
            self._wait(lambda: len(self.router_nexthops(vip)) == self.plan.nodes, deadline,
                       f"{self.plan.nodes} nexthops for {vip} on the router", None,
                       diagnose=lambda: self._missing_nexthops(vip))
        # Without BFD up a crash would be noticed by the hold timer only (seconds, not 0.3 s).
        self.progress("waiting for BFD between the router and every node")
        self._wait(lambda: self._bfd_down() == [], deadline, "BFD sessions with every node", None,
                   diagnose=lambda: f"BFD not up with: {', '.join(self._bfd_down())}")

    def _bfd_down(self) -> list[str]:
        """Node addresses whose BFD session at the router is not up."""
        up = {peer for peer, status in self.router().bfd_peers().items() if status == "up"}
        return [a for h in self.plan.node_hosts for a in (h.v4, h.v6) if a not in up]

    def _missing_nexthops(self, vip: str) -> str:
        """Why a node is not a nexthop for the VIP: its own view of the VIP and of BGP."""
        try:
            have = self.router_nexthops(vip)
        except (OSError, NetnsError):
            have = set()
        lines = []
        for h in self.plan.node_hosts:
            if h.v4 in have or h.v6 in have:
                continue
            status = self.node_api(h.index, "/api/v1/status") or {}
            vips = {n: f"{'announced' if v['announced'] else 'withdrawn'} ({v['reason']})"
                    for n, v in status.get("vips", {}).items()}
            sessions = {p: i.get("state") for p, i in (status.get("bgp") or {}).get("sessions", {}).items()}
            lines.append(f"{h.name}: VIPs {vips or 'unknown (API not answering)'}; BGP {sessions or 'no sessions'}; "
                         f"forwarder {(status.get('forwarder') or {}).get('last_self_test')}")
            lines.append(f"  last lines of its log:\n{_tail(self.plan.node_dir(h.index) / 'node.log', 8)}")
        return "\n".join(lines)

    def _wait(self, cond: Callable[[], bool], deadline: float, what: str, log: Path | None,
              diagnose: Callable[[], str] | None = None) -> None:
        """Poll cond until true; a LabError from cond (a process died) ends the wait at once."""
        while True:
            try:
                if cond():
                    return
            except (OSError, NetnsError, ValueError):
                pass
            if time.monotonic() > deadline:
                msg = f"timed out waiting for {what}"
                if log:
                    msg += f"; last lines of {log}:\n{_tail(log)}"
                if diagnose:
                    msg += "\n" + diagnose()
                raise LabError(msg)
            time.sleep(0.25)

    def down(self, *, quiet: bool = False) -> list[str]:
        """Stop every process and remove every namespace, mount and file of the lab.
        Idempotent: a second call finds nothing and says so."""
        say = (lambda m: None) if quiet else self.progress
        removed = []
        # Processes recorded by PID first (a namespace may already be gone), then FRR.
        for name, pid in self._state().get("pids", {}).items():
            if pid and _alive(pid) and _signal(pid, signal.SIGKILL):
                _wait_gone(pid, 2)
                removed.append(f"process {name} (pid {pid})")
        router_dir = self.plan.router_dir
        if router_dir.exists():
            try:
                self.router().stop()
            except (OSError, NetnsError):
                pass
        removed += topology.teardown(self.run_dir, say)
        for r in removed:
            say(f"removed {r}")
        if not removed:
            say("nothing to remove: no lab is up")
        return removed

    # ------------------------------------------------------------------ router

    def router(self):
        from lab.frr import FrrRouter

        return FrrRouter(Netns(P.ROUTER_NS), self.plan.frr_config(), workdir=self.plan.router_dir,
                         bfd=True, bfd_config=self.plan.bfd_config())

    def router_nexthops(self, vip: str) -> set[str]:
        """The router's kernel FIB nexthops for the VIP's host route."""
        return self.router().kernel_nexthops(P.vip_network(vip))

    def node_for_address(self, addr: str) -> str:
        for h in self.plan.node_hosts:
            if addr in (h.v4, h.v6):
                return h.name
        return addr

    # ------------------------------------------------------------------ processes

    def _spawn(self, ns: str, name: str, argv: Sequence[str], log: Path) -> int:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=str(self.run_dir),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        # `ip netns exec` execs the command, so this PID is the command's own.
        self._save_pid(name, proc.pid)
        return proc.pid

    # -- etcd (--config-source etcd; lab/etcd.py)

    def start_etcd_cluster(self) -> None:
        from lab import etcd

        self.progress(f"etcd: control network (bridge {P.CONTROL_BRIDGE}), {P.ETCD_MEMBERS} members "
                      f"mlb-etcd-1..{P.ETCD_MEMBERS}, nodes' ctl0")
        etcd.build_control_network(self.plan)
        cluster = etcd.EtcdCluster(etcd.lab_members(self.plan))
        for m in cluster.members:
            self._save_pid(m.name, m.start(cluster.initial_cluster))
        cluster.wait_healthy(30)
        vip_file = self.run_dir / "fleet-vips.yaml"
        vip_file.write_text(P.dump_yaml(self.plan.vip_file(), "# the lab's VIPs, applied to etcd by lab up"))
        self.progress(f"etcd: maglev fleet apply {vip_file}")
        out = etcd.fleet(self.plan, "apply", str(vip_file))
        if out.returncode != 0:
            raise LabError(f"maglev fleet apply of the lab's VIPs failed: {out.stderr.strip()}")

    def etcd_member(self, k: int):
        from lab import etcd

        members = etcd.lab_members(self.plan)
        if not 1 <= k <= len(members):
            raise LabError(f"etcd member {k} does not exist (the lab has members 1-{len(members)})")
        return members[k - 1]

    def kill_etcd(self, k: int) -> int | None:
        """SIGKILL etcd member K (by its recorded PID)."""
        m = self.etcd_member(k)
        pid = self.pid(m.name)
        if pid and _signal(pid, signal.SIGKILL):
            _wait_gone(pid, 5)
        self._save_pid(m.name, None)
        return pid

    def start_etcd(self, k: int, timeout: float = 30) -> int:
        """Start member K again on its data directory: it rejoins and catches up."""
        from lab import etcd

        m = self.etcd_member(k)
        if self.pid(m.name):
            return self.pid(m.name)
        cluster = etcd.EtcdCluster(etcd.lab_members(self.plan))
        pid = m.start(cluster.initial_cluster, state="existing")
        self._save_pid(m.name, pid)
        cluster.wait_healthy(timeout, [m])
        return pid

    def set_etcd_link(self, index: int, up: bool) -> None:
        """Node I's links to etcd down (up): its data path stays as it is."""
        from lab import etcd

        etcd.set_control_link(self.plan, index, up)

    # -- nodes

    def write_node_files(self, index: int) -> Path:
        d = self.plan.node_dir(index)
        (d / "vips.d").mkdir(parents=True, exist_ok=True)
        (d / "run").mkdir(parents=True, exist_ok=True)
        node_yaml = d / "node.yaml"
        node_yaml.write_text(P.dump_yaml(self.plan.node_file(index), "# written by maglev lab up"))
        vips = d / "vips.d" / "lab.yaml"
        if not vips.exists() and self.plan.config_source == "directory":  # etcd: `fleet apply`
            vips.write_text(P.dump_yaml(self.plan.vip_file(), "# written by maglev lab up"))
        return node_yaml

    def start_node(self, index: int, *, wait: bool = True, timeout: float = 30.0) -> int:
        h = self.plan.node(index)
        if self.pid(h.name):
            raise LabError(f"{h.name} is already running (pid {self.pid(h.name)})")
        topology.set_node_links(self.plan, index, up=True)
        d = self.plan.node_dir(index)
        pid = self._spawn(h.ns, h.name, maglev_argv("node", "--config", str(d / "node.yaml")), d / "node.log")
        if wait:
            deadline = time.monotonic() + timeout
            self._wait(lambda: self._node_answers(index, pid), deadline, f"{h.name}'s API", d / "node.log")
        return pid

    def _node_answers(self, index: int, pid: int) -> bool:
        if not _alive(pid):
            raise LabError(f"node-{index} (pid {pid}) exited during start; last lines of "
                           f"{self.plan.node_dir(index) / 'node.log'}:\n{_tail(self.plan.node_dir(index) / 'node.log')}")
        return self.node_status(index) is not None

    def stop_node(self, index: int, timeout: float = 20.0) -> float:
        """Graceful stop (SIGTERM: the node withdraws its VIPs, waits, exits). Returns seconds."""
        h = self.plan.node(index)
        pid = self.pid(h.name)
        if not pid:
            raise LabError(f"{h.name} is not running")
        t0 = time.monotonic()
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            _signal(pid, signal.SIGKILL)
            raise LabError(f"{h.name} (pid {pid}) did not exit within {timeout} s of SIGTERM; killed it. "
                           f"See {self.plan.node_dir(index) / 'node.log'}")
        self._save_pid(h.name, None)
        return time.monotonic() - t0

    def kill_node(self, index: int, *, host_alive: bool = False) -> list[int]:
        """A crash: the node's links go down first (no FIN or BGP NOTIFICATION escapes), then
        every process in its namespace gets SIGKILL. The router notices by BFD (~0.3 s), or by
        its hold timer (2-3 s) where BFD is off.

        host_alive: only the processes die (the controller crashed, the host did not): links
        stay up, the kernel closes the BGP sessions, and a router helping graceful restart keeps
        the node's routes for its restart time (the XDP forwarder, still attached, forwards)."""
        h = self.plan.node(index)
        if not host_alive:
            topology.set_node_links(self.plan, index, up=False)
        ns = Netns(h.ns)
        pids = ns.pids()
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for pid in pids:
            _wait_gone(pid, 2)
        self._save_pid(h.name, None)
        return pids

    def node_status(self, index: int) -> dict | None:
        return self.node_api(index, "/api/v1/status")

    def node_api(self, index: int, path: str, timeout: float = 2.0) -> Any:
        """GET a node's API (on 127.0.0.1 inside its namespace); None if it does not answer."""
        from lab.nssocket import get_json

        try:
            return get_json(self.plan.node(index).ns, "127.0.0.1", P.API_PORT, path, timeout=timeout)
        except (OSError, ValueError):
            return None

    # -- backends

    def setup_backend(self, index: int, extra_vips: Sequence[str] = ()) -> None:
        """`maglev backend setup` in backend J: the lab's VIPs (plus extra_vips) on lo, DSR
        sysctls, the GRE decap program. Idempotent; the VIP list replaces the last one."""
        h = self.plan.backend(index)
        d = self.plan.backend_dir(index)
        vips = [a for v in (P.VIP_V4, P.VIP_V6, *extra_vips) for a in ("--vip", v)]
        argv = maglev_argv("backend", "setup", *vips,
                           "--interface", "eth0", "--decap", "bpf", "--bpffs", str(d / "bpffs"),
                           "--state-dir", str(d / "state"))
        proc = Netns(h.ns).run(*argv, check=False, timeout=60)
        log = self.plan.backend_dir(index) / "setup.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise LabError(f"maglev backend setup failed in {h.ns} ({proc.returncode}):\n"
                           f"{(proc.stderr or proc.stdout).strip()}")

    def backend_decap_counters(self, index: int) -> dict[str, int]:
        """Packets per outcome of backend J's decap program (`maglev backend status
        --metrics`, the operator's scrape)."""
        d = self.plan.backend_dir(index)
        argv = maglev_argv("backend", "status", "--metrics", "--interface", "eth0",
                           "--bpffs", str(d / "bpffs"), "--state-dir", str(d / "state"))
        proc = Netns(self.plan.backend(index).ns).run(*argv, check=False, timeout=30)
        if proc.returncode != 0:
            raise LabError(f"maglev backend status failed in backend-{index}: {proc.stderr.strip()}")
        out = {}
        for m in re.finditer(r'^maglev_decap_packets_total\{[^}]*outcome="([a-z0-9_]+)"\} (\d+)$',
                             proc.stdout, re.M):
            out[m.group(1)] = int(m.group(2))
        return out

    def start_backend(self, index: int) -> int:
        h = self.plan.backend(index)
        if self.pid(h.name):
            raise LabError(f"{h.name}'s server is already running (pid {self.pid(h.name)})")
        argv = [sys.executable, "-m", "lab.backend_server", "--name", h.name, "--vip", P.VIP_V4,
                "--vip", P.VIP_V6, "--vip", P.SPARE_VIP_V4, "--port", str(P.VIP_PORT),
                "--health-port", str(P.HEALTH_PORT)]
        pid = self._spawn(h.ns, h.name, argv, self.plan.backend_dir(index) / "server.log")
        deadline = time.monotonic() + 10
        self._wait(lambda: self.backend_healthy(index), deadline, f"{h.name}'s health endpoint",
                   self.plan.backend_dir(index) / "server.log")
        return pid

    def kill_backend(self, index: int) -> int:
        """A backend failure: its server dies (SIGKILL); health checks then fail."""
        h = self.plan.backend(index)
        pid = self.pid(h.name)
        if not pid:
            raise LabError(f"{h.name}'s server is not running")
        _signal(pid, signal.SIGKILL)
        _wait_gone(pid, 2)
        self._save_pid(h.name, None)
        return pid

    def backend_healthy(self, index: int, timeout: float = 1.0) -> bool:
        """Probe a backend's health endpoint from the router, as a health check would."""
        from lab.nssocket import http_get

        h = self.plan.backend(index)
        try:
            status, _ = http_get(P.ROUTER_NS, h.v4, P.HEALTH_PORT, "/healthz", timeout=timeout)
            return status == 200
        except OSError:
            return False

    # ------------------------------------------------------------------ exec

    def exec(self, role: str, argv: Sequence[str]) -> int:
        ns = self.plan.role_namespace(role)
        if ns not in list_namespaces():
            raise LabError(f"namespace {ns} does not exist (is the lab up?)")
        if not argv:
            raise LabError("give a command after --, e.g. `maglev lab exec client -- ip route`")
        return subprocess.run(["ip", "netns", "exec", ns, *argv]).returncode

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Router nexthops per VIP, every node's process/API state, every backend's health."""
        out: dict[str, Any] = {"run_dir": str(self.run_dir), "router": {}, "nodes": [], "backends": []}
        try:
            r = self.router()
            out["router"]["bgp_established"] = sorted(r.established())
            out["router"]["bfd_up"] = sorted(p for p, st in r.bfd_peers().items() if st == "up")
        except (OSError, NetnsError, ValueError) as exc:
            out["router"]["error"] = str(exc)
        out["router"]["nexthops"] = {}
        for vip in (P.VIP_V4, P.VIP_V6):
            try:
                hops = sorted(self.router_nexthops(vip))
            except (OSError, NetnsError) as exc:
                hops = [f"error: {exc}"]
            out["router"]["nexthops"][vip] = [{"address": a, "node": self.node_for_address(a)} for a in hops]
        for h in self.plan.node_hosts:
            entry: dict[str, Any] = {"name": h.name, "namespace": h.ns, "address": h.v4, "pid": self.pid(h.name)}
            status = self.node_status(h.index) if entry["pid"] else None
            entry["api"] = status is not None
            entry["status"] = status
            vips = self.node_api(h.index, "/api/v1/vips") if status is not None else None
            entry["vips"] = vips
            entry["announced"] = announced_vips(vips)
            out["nodes"].append(entry)
        for h in self.plan.backend_hosts:
            out["backends"].append({"name": h.name, "namespace": h.ns, "address": h.v4,
                                    "pid": self.pid(h.name), "healthy": self.backend_healthy(h.index)})
        return out


def announced_vips(vips: Any) -> list[str]:
    """Names of the VIPs a node says it announces, from its /api/v1/vips answer (a list of VIP
    objects, or a mapping name -> object, each with an `announced` flag)."""
    if isinstance(vips, dict) and "vips" in vips:
        vips = vips["vips"]
    items = vips.items() if isinstance(vips, dict) else ((v.get("name"), v) for v in vips or [] if isinstance(v, dict))
    return sorted(str(name) for name, v in items if isinstance(v, dict) and v.get("announced"))


def _node_summary(s: dict[str, Any]) -> str:
    """'forwarder ok (native), BGP 2/2 up, warm-up over' from a node's /api/v1/status."""
    fwd = s.get("forwarder") or {}
    sessions = (s.get("bgp") or {}).get("sessions") or {}
    up = sum(1 for x in sessions.values() if isinstance(x, dict) and x.get("state") == "established")
    parts = [
        f"forwarder {'ok' if fwd.get('ok') else 'FAILING'} ({fwd.get('mode') or '?'})",
        f"BGP {up}/{len(sessions)} up",
    ]
    bfd = (s.get("bgp") or {}).get("bfd") or {}
    if bfd.get("enabled"):
        peers = bfd.get("peers") or {}
        parts.append(f"BFD {sum(1 for p in peers.values() if p.get('status') == 'up')}/{len(peers)} up")
    parts += [
        "warm-up over" if s.get("warmup_over") else "warming up",
    ]
    if s.get("node_drained"):
        parts.append("DRAINED")
    return ", ".join(parts)


def format_status(st: dict[str, Any]) -> str:
    lines = ["router nexthops (kernel FIB):"]
    for vip, hops in st["router"].get("nexthops", {}).items():
        lines.append(f"  {vip:<14} -> {', '.join(h['node'] for h in hops) or 'none (not reachable)'}")
    if "bgp_established" in st["router"]:
        lines.append(f"  BGP established with: {', '.join(st['router']['bgp_established']) or 'nobody'}")
    if "bfd_up" in st["router"]:
        lines.append(f"  BFD up with: {', '.join(st['router']['bfd_up']) or 'nobody'}")
    if "error" in st["router"]:
        lines.append(f"  router error: {st['router']['error']}")
    lines.append("nodes:")
    for n in st["nodes"]:
        if not n["pid"]:
            state = "down (no process)"
        elif not n["api"]:
            state = f"pid {n['pid']}, API not answering"
        else:
            state = f"pid {n['pid']}, {_node_summary(n['status'] or {})}"
        lines.append(f"  {n['name']:<9} {n['address']:<11} {state}; announces: {', '.join(n['announced']) or '-'}")
        views = (n.get("vips") or {}).get("vips") or []
        if views:
            # Table digests: equal on every node means every node sends a flow to the same backend.
            tables = ", ".join(
                f"{v['name']} {v.get('digest') or 'no table'} "
                f"({sum(1 for b in v.get('backends', []) if b.get('serving'))}/{len(v.get('backends', []))} serving)"
                for v in views
            )
            lines.append(f"  {'':<9} tables: {tables}")
    lines.append("backends:")
    for b in st["backends"]:
        health = "healthy" if b["healthy"] else "NOT answering /healthz"
        lines.append(f"  {b['name']:<9} {b['address']:<11} {'pid ' + str(b['pid']) if b['pid'] else 'no server'}, {health}")
    return "\n".join(lines)
