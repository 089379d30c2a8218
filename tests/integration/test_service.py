"""`maglev node` as configs/maglev-node.service runs it, without systemd as PID 1.

The unit is read, not copied: its capability bounding set (setpriv), NoNewPrivileges, file and
memlock limits (prlimit), the directories systemd would create and pass ($STATE_DIRECTORY,
$CACHE_DIRECTORY, $LOGS_DIRECTORY, $RUNTIME_DIRECTORY), and ProtectSystem=strict /
ProtectHome=read-only (a private mount namespace where every file system is read-only but those
directories and ReadWritePaths=). systemd's notify socket is a datagram socket this test
listens on, with a watchdog interval. Against a real FRR router with BFD (the router set-up of
test_node.py), the node must: start and say READY=1, ping the watchdog, announce, see BFD up
(node and router agree), listen on nothing but its API, keep a node drain across a restart
whose run directory is wiped (as RuntimeDirectory= does), log only JSON lines, keep ExaBGP's
and bfdd's output in the logs directory, and stop with exit 0 leaving no child behind.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration.test_node import NODE, ROUTER, VIP, NodeLab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "configs" / "maglev-node.service"
WATCHDOG_USEC = 2_000_000
# Kernel capability numbers (linux/capability.h) of the names a unit may list.
CAP_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5, "CAP_SETGID": 6,
               "CAP_SETUID": 7, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
               "CAP_IPC_LOCK": 14, "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24,
               "CAP_PERFMON": 38, "CAP_BPF": 39}
# The part of the tree ProtectSystem=strict makes read-only (the API file systems are exempt).
READ_ONLY_TREES = ("/", "/etc", "/usr", "/var", "/opt", "/srv", "/home", "/root", "/run", "/tmp", "/work", "/boot")

# Runs inside `unshare -m` (a private mount namespace, as root): the unit's mounts, then exec.
SANDBOX = r"""
import json, os, subprocess, sys
spec = json.loads(sys.argv[1])
def mount(*args):
    subprocess.run(["mount", *args], check=True)
for d in spec["rw"]:
    mount("--bind", d, d)
rw = set(spec["rw"])
for line in open("/proc/self/mountinfo"):
    target = line.split()[4].replace("\\040", " ")
    if target in rw or not any(target == t or target.startswith(t.rstrip("/") + "/") for t in spec["ro_trees"]):
        continue
    subprocess.run(["mount", "-o", "remount,bind,ro", target], capture_output=True)
for d in spec["tmpfs"]:
    mount("-t", "tmpfs", "tmpfs", d)
os.execvp(spec["argv"][0], spec["argv"])
"""


def read_unit(path: Path) -> dict[str, list[str]]:
    """[Service] of a unit file: key -> values (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def unit_caps(unit: dict[str, list[str]]) -> list[str]:
    return " ".join(unit["CapabilityBoundingSet"]).split()


def setpriv_caps(caps: list[str]) -> str:
    return "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps)


def rlimit(unit: dict[str, list[str]], key: str, which: int) -> str:
    """The unit's Limit...=, or this test's own hard limit if lower: raising it needs
    CAP_SYS_RESOURCE, which root may lack in a container (systemd, as PID 1, has it)."""
    value = unit[key][0]
    hard = resource.getrlimit(which)[1]
    wanted = resource.RLIM_INFINITY if value == "infinity" else int(value)
    if hard != resource.RLIM_INFINITY and (wanted == resource.RLIM_INFINITY or wanted > hard):
        wanted = hard
    return "unlimited" if wanted == resource.RLIM_INFINITY else str(wanted)


def our_bounding_set() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapBnd in /proc/self/status")


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket, its messages as they arrive."""

    def __init__(self, path: Path):
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def count(self, key: str) -> int:
        return sum(1 for m in list(self.messages) if key in m.split("\n"))

    def first(self, prefix: str) -> str | None:
        return next((m for m in list(self.messages) if m.startswith(prefix)), None)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class ServiceLab(NodeLab):
    """NodeLab with BFD, its node run under the unit's sandbox."""

    bfd = True

    def __init__(self) -> None:
        super().__init__()
        self.dir.chmod(0o755)  # bfdd (user frr) must reach its directory under the run dir
        self.unit = read_unit(UNIT)
        # What systemd creates from RuntimeDirectory=, StateDirectory=, CacheDirectory=, LogsDirectory=.
        self.dirs = {key: self.dir / key.removesuffix("Directory").lower()
                     for key in ("RuntimeDirectory", "StateDirectory", "CacheDirectory", "LogsDirectory")}
        self.home = self.dir / "home"  # stands in for /root: read-only, as ProtectHome=read-only
        self.notify: NotifySocket | None = None
        self.starts = 0

    def node_settings(self) -> dict:
        settings = super().node_settings()
        settings["run_dir"] = str(self.dirs["RuntimeDirectory"])
        settings["bgp"]["bfd"] = {"enabled": True, "interval_ms": 100, "multiplier": 3}
        return settings

    def node_argv(self) -> list[str]:
        exec_start = self.unit["ExecStart"][0].split()
        assert exec_start[1:] == ["node", "--config", "/etc/maglev/node.yaml"], exec_start
        maglev = str(Path(sys.executable).parent / "maglev")  # the unit's /opt/maglev-lb/bin/maglev
        node = [maglev, "node", "--config", str(self.node_file), "--log-format", "json"]
        have = our_bounding_set()  # setpriv cannot grant what the test's root lacks
        caps = setpriv_caps([c for c in unit_caps(self.unit) if have >> CAP_NUMBERS[c] & 1])
        assert self.unit["NoNewPrivileges"] == ["yes"]
        inner = ["prlimit", f"--nofile={rlimit(self.unit, 'LimitNOFILE', resource.RLIMIT_NOFILE)}",
                 f"--memlock={rlimit(self.unit, 'LimitMEMLOCK', resource.RLIMIT_MEMLOCK)}", "--",
                 "setpriv", "--bounding-set", caps, "--inh-caps", caps, "--ambient-caps", caps,
                 "--no-new-privs", "--", *node]
        rw = [str(p) for p in self.dirs.values()] + [str(self.vip_dir), str(self.bpffs)]
        spec = {"rw": rw, "ro_trees": READ_ONLY_TREES, "tmpfs": ["/var/tmp"], "argv": inner}
        return ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", SANDBOX, json.dumps(spec)]

    def node_env(self) -> dict[str, str]:
        # systemd's environment for a system service: no test variables (no MAGLEV_BPF_CACHE).
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(self.home),
            "RUNTIME_DIRECTORY": str(self.dirs["RuntimeDirectory"]),
            "STATE_DIRECTORY": str(self.dirs["StateDirectory"]),
            "CACHE_DIRECTORY": str(self.dirs["CacheDirectory"]),
            "LOGS_DIRECTORY": str(self.dirs["LogsDirectory"]),
            "NOTIFY_SOCKET": str(self.notify.path),
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
        }

    def node_preexec(self):
        return None  # the unit's LimitNOFILE= is applied by prlimit in node_argv()

    def start_node(self) -> None:
        for d in self.dirs.values():
            d.mkdir(mode=0o755, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        if self.notify is not None:
            self.notify.close()
        self.notify = NotifySocket(self.dir / "notify")
        self.starts += 1
        super().start_node()

    def stop_node(self) -> int:
        self.node_proc.send_signal(signal.SIGTERM)
        rc = self.node_proc.wait(timeout=30)
        # What RuntimeDirectory= does at every stop.
        shutil.rmtree(self.dirs["RuntimeDirectory"])
        return rc

    def status(self) -> dict:
        return self.client().get("/api/v1/status")

    def bfd_up(self) -> bool:
        try:
            node_side = self.status()["bgp"]["bfd"]["peers"][ROUTER]["status"]
        except Exception:
            return False
        return node_side == "up" and self.router.bfd_peers().get(NODE) == "up"

    def children(self) -> set[int]:
        backends = {p.pid for p in self.backends.values()}
        return set(self.n.pids()) - backends

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log_text().splitlines()]  # raises on a non-JSON line

    def teardown(self) -> None:
        super().teardown()
        if self.notify is not None:
            self.notify.close()


def started(lab: ServiceLab) -> None:
    """READY=1 arrived, the API answers, the VIP reached the router."""
    def ready() -> bool:
        if lab.node_proc.poll() is not None:
            pytest.fail(f"the node exited with {lab.node_proc.returncode}:\n{lab.log_text()[-3000:]}")
        return lab.notify.first("READY=1") is not None
    wait_for(ready, 60, "READY=1 on the notify socket")
    wait_for(lambda: VIP in lab.routes() or lab.status()["node_drained"], 30, "the VIP at the router")


@pytest.fixture(scope="module")
def lab():
    for tool in ("unshare", "setpriv", "prlimit", "vtysh"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (util-linux, frr: see the Makefile's APT_PACKAGES)")
    lab = ServiceLab()
    try:
        lab.build()
        started(lab)
        yield lab
    except BaseException:
        if lab.node_proc is not None:
            print(lab.log_text()[-6000:])
        raise
    finally:
        lab.teardown()


def test_the_unit_verifies():
    """systemd-analyze verify, with the unit's binary where this checkout installed it; no
    warning at all (an unknown key is only a warning, and would be silently ignored)."""
    text = UNIT.read_text().replace("/opt/maglev-lb/bin/maglev", str(Path(sys.executable).parent / "maglev"))
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"maglev-unit-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        (work / "maglev-node.service").write_text(text)
        proc = subprocess.run(["systemd-analyze", "verify", str(work / "maglev-node.service")],
                              capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(work)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
    unit = read_unit(UNIT)
    assert unit["Type"] == ["notify"] and unit["RestartPreventExitStatus"] == ["2"]
    assert int(unit["WatchdogSec"][0]) > 0 and int(unit["LimitNOFILE"][0]) >= 65536
    assert "RuntimeDirectory" in unit and "StateDirectory" in unit and "CacheDirectory" in unit


def test_ready_after_reconcile_then_watchdog_pings(lab):
    ready = lab.notify.first("READY=1")
    assert "reconciled" in ready, ready
    status = lab.status()
    assert "web" in status["vips"]  # the decision READY waited for
    before = lab.notify.count("WATCHDOG=1")
    wait_for(lambda: lab.notify.count("WATCHDOG=1") >= before + 2, 10, "two more watchdog pings")


def test_the_node_runs_with_exactly_the_units_sandbox(lab):
    pid = lab.node_proc.pid
    assert b"node" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")  # exec'd all the way down
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":\t" in line)
    # The unit's set, less what this test's root has not got to give (a container may withhold
    # some, e.g. CAP_SYS_RESOURCE).
    want = sum(1 << CAP_NUMBERS[c] for c in unit_caps(lab.unit)) & our_bounding_set()
    assert int(fields["CapEff"], 16) == want and int(fields["CapBnd"], 16) == want
    assert fields["NoNewPrivs"].strip() == "1"
    limits = {line[:26].strip(): line[26:].split()[:2] for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]}
    assert limits["Max open files"] == [rlimit(lab.unit, "LimitNOFILE", resource.RLIMIT_NOFILE)] * 2
    memlock = rlimit(lab.unit, "LimitMEMLOCK", resource.RLIMIT_MEMLOCK)
    assert limits["Max locked memory"] == [memlock if memlock == "unlimited" else str(int(memlock))] * 2
    # The home is read-only, so the BPF objects were built into CacheDirectory=.
    assert list((lab.dirs["CacheDirectory"] / "bpf").glob("xdp_lb-*.o"))
    assert not (lab.home / ".cache").exists()


def test_announces_and_bfd_is_up_on_both_sides(lab):
    assert lab.router.nexthops(f"{VIP}/32") == {NODE}
    wait_for(lab.bfd_up, 15, "BFD up at the node (bfdd via vtysh) and at the router")
    bfd = lab.status()["bgp"]["bfd"]
    assert bfd["healthy"] and bfd["bfdd_pid"] and bfd["last_error"] is None, bfd


def test_nothing_listens_on_tcp_but_the_api(lab):
    """bfdd's vty (TCP 2617 on every address by default) is off: vtysh uses its UNIX socket."""
    ours = lab.children()  # the node, ExaBGP and its helper, bfdd (not the test's backends)
    assert lab.status()["bgp"]["bfd"]["bfdd_pid"] in ours
    out = lab.n.run("ss", "-Hltnp").stdout
    listeners = {line.split()[3] for line in out.splitlines()
                 if any(f"pid={pid}," in line for pid in ours)}
    assert listeners == {"127.0.0.1:9180"}, out


def test_a_node_drain_survives_a_restart(lab):
    lab.client().post("/api/v1/node/drain")
    wait_for(lambda: VIP not in lab.routes(), 10, "the VIP to be withdrawn by the drain")
    assert json.loads((lab.dirs["StateDirectory"] / "state.json").read_text())["node_drained"] is True
    children = lab.children() - {lab.node_proc.pid}
    assert len(children) >= 2  # ExaBGP (+ its helper) and bfdd
    assert lab.stop_node() == 0
    assert lab.notify.count("STOPPING=1") == 1
    assert not lab.children(), lab.children()

    lab.start_node()
    started(lab)
    wait_for(lambda: lab.status()["bgp"]["sessions"][ROUTER]["state"] == "established", 30,
             "the BGP session after the restart")
    wait_for(lab.bfd_up, 15, "BFD up after the restart")
    status = lab.status()
    assert status["node_drained"] is True and not status["vips"]["web"]["announced"], status
    assert VIP not in lab.routes()
    lab.client().post("/api/v1/node/undrain")
    wait_for(lambda: VIP in lab.routes(), 15, "the VIP back after undrain")


def test_logs_are_json_lines_and_the_childrens_output_is_in_the_logs_dir(lab):
    records = lab.log_records()
    events = {r["event"] for r in records}
    assert {"node_started", "systemd_ready", "bgp_session_up", "bfd_session_up", "node_drain",
            "node_undrain", "node_stopped"} <= events, sorted(events)
    up = next(r for r in records if r["event"] == "bfd_session_up")
    assert up["peer"] == ROUTER and up["level"] == "info"
    logs = lab.dirs["LogsDirectory"]
    assert (logs / "exabgp.log").stat().st_size > 0 and (logs / "bfdd.log").exists()
    assert not list(lab.dirs["RuntimeDirectory"].rglob("*.log"))


def test_stops_gracefully_with_exit_0_and_no_child_left(lab):
    assert lab.stop_node() == 0
    assert not lab.children(), lab.children()
    assert VIP not in lab.routes()
    assert lab.log_records()[-1]["event"] == "node_stopped"
