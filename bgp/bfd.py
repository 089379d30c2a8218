"""BFD next to ExaBGP: FRR's ``bfdd`` as a supervised child of the node, plus FRR helpers shared
with the lab's router (lab/frr.py imports them, so there is one implementation).

Why: ExaBGP has no BFD, so a frozen or dead node is dropped by a router only when the BGP hold
timer expires (3 s at the least). FRR's bfdd runs alone (no zebra or bgpd needed) and keeps one
single-hop session per BGP peer; a router with ``neighbor X bfd`` tears the BGP session down
after interval x multiplier without packets (0.3 s at 100 ms x 3).

Lifetimes, as for ExaBGP: bfdd runs in the foreground (no ``-d``), so the PID we hold is bfdd's,
and it cannot outlive the controller. FRR daemons drop to user ``frr``, and a change of user
clears PR_SET_PDEATHSIG, so bfdd is started already as ``frr`` through ``setpriv`` (util-linux),
which keeps the three capabilities bfdd needs and sets the parent-death signal *after* the user
change. A bfdd that dies is restarted with back-off; stop() ends it by PID.

Public API:
- ``render_bfd_config(peers, interval_ms=, multiplier=) -> str``, ``BFD_PROFILE``
- ``bfd_peers(config: BgpConfig) -> list[(peer, local)]``
- ``prepare_frr_dir(path)``, ``frr_daemon_argv(daemon, dir, foreground=)``, ``parse_bfd_peers(data)``
- ``BfdDaemon(config, run_dir, wrapper=())`` with ``start()``, ``stop()``, ``status()``,
  ``peers()``, ``healthy``, ``pid``.
"""

from __future__ import annotations

import asyncio
import grp
import ipaddress
import json
import logging
import os
import pwd
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Sequence

from bgp.supervise import MAX_FAILURES, STABLE_AFTER, Supervised
from node.config import BgpConfig
from node.logs import ChildOutput, event

log = logging.getLogger("maglev.bfd")

FRR_DIR = Path("/usr/lib/frr")
FRR_USER = "frr"
VTYSH = "vtysh"
BFD_PROFILE = "maglev"
# What bfdd keeps after FRR's privilege drop (lib/privs.c): bind port 3784, raw sockets for
# TTL 255, and namespace access. It must hold them before it starts as user frr.
BFDD_CAPS = "+net_bind_service,+net_raw,+sys_admin"
POLL_INTERVAL = 1.0
VTYSH_TIMEOUT = 5.0
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes


class BfdError(RuntimeError):
    pass


# -- shared with the lab's router ------------------------------------------------------------


def render_bfd_config(peers: Sequence[tuple[str, str]] = (), *, interval_ms: int = 100,
                      multiplier: int = 3) -> str:
    """bfdd configuration: the profile a router's ``neighbor X bfd profile`` names and, for a
    node running bfdd alone, its single-hop peers as (peer address, local address) pairs.

    Addresses go through ``ipaddress`` so nothing but an address reaches the file.
    """
    ms, mult = int(interval_ms), int(multiplier)
    timers = [f"  receive-interval {ms}", f"  transmit-interval {ms}", f"  detect-multiplier {mult}"]
    lines = ["bfd", f" profile {BFD_PROFILE}", *timers, " exit"]
    for peer, local in peers:
        lines += [f" peer {ipaddress.ip_address(peer)} local-address {ipaddress.ip_address(local)}", *timers, " exit"]
    lines.append("exit")
    return "\n".join(lines) + "\n"


def bfd_peers(config: BgpConfig) -> list[tuple[str, str]]:
    """One single-hop BFD session per BGP peer, from the same local address as its session."""
    out = []
    for peer in config.peers:
        local = config.local_for(peer)
        if local is not None:  # validation guarantees one; keep the type checker honest
            out.append((str(peer.address), str(local)))
    return out


def prepare_frr_dir(path: Path) -> None:
    """Create path for FRR daemons: they run as user frr and write pid files and sockets there."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    uid, gid = pwd.getpwnam(FRR_USER).pw_uid, grp.getgrnam(FRR_USER).gr_gid
    for p in [path, *path.iterdir()]:
        os.chown(p, uid, gid)


def unreachable_parent(path: Path) -> Path | None:
    """The first directory above path that user frr cannot traverse, or None.

    bfdd fails with an unhelpful message when it cannot reach its own directory (e.g. a 0700
    home or pytest's tmp_path), so the node names the culprit instead.
    """
    pw = pwd.getpwnam(FRR_USER)
    groups = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if FRR_USER in g.gr_mem)}
    for p in reversed(Path(path).resolve().parents):
        try:
            st = p.stat()
        except OSError:
            return p
        if st.st_uid == pw.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid in groups:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return p
    return None


def frr_daemon_argv(daemon: str, workdir: Path, *, foreground: bool = False) -> list[str]:
    """argv of an FRR daemon with private config, pid file, zebra socket and vty socket dir.

    foreground=False daemonizes (-d, the lab's router, stopped through its pid file);
    foreground=True keeps the daemon's PID the one its parent spawned (the node's bfdd).
    """
    d = Path(workdir)
    argv = [str(FRR_DIR / daemon), *([] if foreground else ["-d"]), "-f", str(d / f"{daemon}.conf"),
            "-i", str(d / f"{daemon}.pid"), "-z", str(d / "zserv.api"), "--vty_socket", str(d),
            "--log", "stdout" if foreground else f"file:{d / daemon}.log",
            # No vty on TCP (FRR listens on all addresses by default, bfdd on 2617): vtysh
            # reaches the daemon through its UNIX socket in workdir.
            "--vty_port", "0"]
    if daemon == "bfdd":
        argv += ["--bfdctl", str(d / "bfdd.sock")]
    return argv


def vtysh_argv(workdir: Path, *commands: str) -> list[str]:
    argv = [VTYSH, "--vty_socket", str(workdir)]
    for c in commands:
        argv += ["-c", c]
    return argv


def parse_bfd_peers(data: Any) -> dict[str, dict[str, Any]]:
    """``show bfd peers json`` -> {peer address: {"status", "local", "diagnostic"}}."""
    out: dict[str, dict[str, Any]] = {}
    if not isinstance(data, list):
        return out
    for p in data:
        if isinstance(p, dict) and "peer" in p:
            try:
                peer = str(ipaddress.ip_address(p["peer"]))
            except ValueError:
                continue
            out[peer] = {"status": str(p.get("status", "unknown")), "local": p.get("local"),
                         "diagnostic": p.get("diagnostic")}
    return out


# -- the node's bfdd -------------------------------------------------------------------------


def _as_frr_argv() -> list[str]:
    """setpriv: run as user frr with its groups (frrvty). bfdd's vty socket is frr:frrvty 0770,
    and a node without CAP_DAC_OVERRIDE (the systemd unit) may not connect to it as root."""
    return ["setpriv", f"--reuid={FRR_USER}", f"--regid={FRR_USER}", "--init-groups", "--"]


def _die_with_parent_argv() -> list[str]:
    """setpriv: become frr with bfdd's capabilities, then ask for SIGKILL at parent death."""
    return ["setpriv", f"--reuid={FRR_USER}", f"--regid={FRR_USER}", "--init-groups",
            "--inh-caps", BFDD_CAPS, "--ambient-caps", BFDD_CAPS, "--pdeathsig", "SIGKILL", "--"]


class BfdDaemon(Supervised):
    """bfdd with one single-hop session per BGP peer, supervised, polled for session state.

    ``wrapper`` is prepended to the command (e.g. ``ip netns exec NS`` in tests); it must exec,
    not fork, so the PID stays bfdd's. Call from the event loop that started it.
    """

    def __init__(self, config: BgpConfig, run_dir: Path, *, wrapper: Sequence[str] = (),
                 clock=time.monotonic, log_dir: Path | None = None):
        self.config = config
        self.bfd = config.bfd
        self.dir = Path(run_dir)
        self.wrapper = list(wrapper)
        self.clock = clock
        self.config_path = self.dir / "bfdd.conf"
        # bfdd's stdout (--log stdout), drained by us into a size-bounded rotated file.
        self.output = ChildOutput(Path(log_dir or run_dir) / "bfdd.log", "bfdd")
        self.log_path = self.output.path
        self._drain: asyncio.Task | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.session_transitions: dict[tuple[str, str], int] = {}  # (peer, new status) -> count
        self.last_error: str | None = None
        self._failures = 0
        self._started_at = 0.0
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        now = time.time()
        self._peers: dict[str, dict[str, Any]] = {
            peer: {"status": "unknown", "local": local, "diagnostic": None, "since": now}
            for peer, local in bfd_peers(config)
        }

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Write bfdd's config, start it supervised and wait (bounded) until it answers vtysh."""
        missing = [w for w, ok in (("bfdd", (FRR_DIR / "bfdd").exists()), ("setpriv", shutil.which("setpriv")),
                                   (VTYSH, shutil.which(VTYSH))) if not ok]
        if missing:
            raise BfdError(f"bgp.bfd.enabled needs {', '.join(missing)} (FRR's bfdd in {FRR_DIR}, vtysh: "
                           "apt-get install frr; setpriv: util-linux); install them or disable bgp.bfd")
        longest = max(str(self.dir / n) for n in ("bfdd.vty", "bfdd.sock", "zserv.api"))
        if len(longest) > SOCKET_PATH_MAX:
            raise BfdError(f"run directory {self.dir} is too long for bfdd's UNIX sockets "
                           f"(max {SOCKET_PATH_MAX} characters); use a shorter run_dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        if (bad := unreachable_parent(self.dir)) is not None:
            raise BfdError(f"bfdd runs as user {FRR_USER} and cannot reach {self.dir}: {bad} is not "
                           f"searchable by it; put run_dir under /run or make {bad} world-searchable")
        self._closing = False
        self.config_path.write_text(render_bfd_config(
            bfd_peers(self.config), interval_ms=self.bfd.interval_ms, multiplier=self.bfd.multiplier))
        self._prepare_dir()
        await self._spawn()  # raises if bfdd cannot even be executed
        self._tasks = [asyncio.create_task(self._supervise(), name="bfd-supervisor"),
                       asyncio.create_task(self._poll_loop(), name="bfd-poll")]
        deadline = self.clock() + 10.0
        while await self._poll() is None:
            if self.clock() > deadline:
                log.warning("bfdd did not answer vtysh within 10 s; see %s", self.log_path)
                break
            await asyncio.sleep(0.05)

    def _prepare_dir(self) -> None:
        """The directory stays ours (root's), group frr, 0775: bfdd (user frr) writes its pid
        file and sockets there, and the node rewrites its config on every start without needing
        CAP_DAC_OVERRIDE. Stale files of an earlier bfdd go first."""
        for name in ("bfdd.pid", "bfdd.vty", "bfdd.sock"):
            (self.dir / name).unlink(missing_ok=True)
        try:
            os.chown(self.dir, -1, grp.getgrnam(FRR_USER).gr_gid)
            self.dir.chmod(0o775)
            self.config_path.chmod(0o644)
        except OSError as e:
            raise BfdError(f"cannot give group {FRR_USER} the BFD directory {self.dir} ({e}): with bgp.bfd "
                           "enabled the node needs CAP_CHOWN, CAP_SETUID and CAP_SETGID "
                           "(systemd: add them to CapabilityBoundingSet)") from None

    async def stop(self) -> None:
        """Stop bfdd by PID (SIGTERM, then SIGKILL after 3 s)."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 3.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
            except ProcessLookupError:
                pass
            except PermissionError:
                # bfdd runs as user frr: signalling it needs CAP_KILL. It still dies with us
                # (parent-death signal), but say what the unit lacks instead of a traceback.
                log.error("cannot stop bfdd (pid %d, user %s): no CAP_KILL; it will be killed when the node "
                          "exits (systemd: add CAP_KILL to CapabilityBoundingSet)", proc.pid, FRR_USER,
                          extra=event("bfdd_stop_refused", pid=proc.pid))
        if self._drain is not None:
            await asyncio.wait([self._drain], timeout=2.0)
        self._set_all("unknown")

    async def _spawn(self) -> None:
        argv = [*self.wrapper, *_die_with_parent_argv(), *frr_daemon_argv("bfdd", self.dir, foreground=True)]
        # Its own session: a terminal's Ctrl-C reaches the controller, which stops bfdd in order.
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
        self._drain = self.output.drain(self.proc.stdout)
        self._started_at = self.clock()
        log.info("bfdd started (pid %d, %d peer(s), %d ms x %d, config %s, log %s)", self.proc.pid,
                 len(self._peers), self.bfd.interval_ms, self.bfd.multiplier, self.config_path, self.log_path)

    def _exited(self, rc: int, ran: float) -> None:
        self.last_error = (f"bfdd exited with status {rc} after {ran:.1f} s; last lines: {self.output.tail()} "
                           f"(see {self.log_path})")
        log.error("%s; restarting (routers with BFD drop this node's BGP sessions meanwhile)", self.last_error)
        self._set_all("unknown")

    def _spawn_failed(self, exc: OSError) -> None:
        self.last_error = f"cannot start bfdd: {exc}"
        log.error(self.last_error)

    # -- session state -------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(POLL_INTERVAL)
            if self.pid is not None:
                await self._poll()

    async def _poll(self) -> dict[str, dict[str, Any]] | None:
        """Ask bfdd for its sessions; None when it does not answer (yet)."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *_as_frr_argv(), *vtysh_argv(self.dir, "show bfd peers json"), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            self.last_error = f"cannot run {VTYSH}: {e}"
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), VTYSH_TIMEOUT)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return None
        if proc.returncode != 0:
            return None
        try:
            seen = parse_bfd_peers(json.loads(out or b"[]"))
        except ValueError:
            return None
        self._update(seen)
        return seen

    def _update(self, seen: dict[str, dict[str, Any]]) -> None:
        now = time.time()
        for peer, info in self._peers.items():
            new = seen.get(peer, {"status": "unknown", "diagnostic": None})
            if new["status"] != info["status"]:
                if info["status"] != "unknown" or new["status"] == "up":
                    log.log(logging.INFO if new["status"] == "up" else logging.WARNING,
                            "BFD session with %s %s (was %s, diagnostic %s)", peer, new["status"],
                            info["status"], new.get("diagnostic"),
                            extra=event(f"bfd_session_{new['status']}", peer=peer, was=info["status"],
                                        diagnostic=new.get("diagnostic")))
                info["since"] = now
                key = (peer, new["status"])
                self.session_transitions[key] = self.session_transitions.get(key, 0) + 1
            info["status"], info["diagnostic"] = new["status"], new.get("diagnostic")

    def _set_all(self, status: str) -> None:
        now = time.time()
        for info in self._peers.values():
            if info["status"] != status:
                info["status"], info["since"] = status, now

    # -- public views --------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False once bfdd died MAX_FAILURES times in a row without staying up."""
        if self._closing:
            return False
        if self._failures < MAX_FAILURES:
            return True
        return self.pid is not None and self.clock() - self._started_at >= STABLE_AFTER

    def peers(self) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in self._peers.items()}

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "healthy": self.healthy,
            "bfdd_pid": self.pid,
            "interval_ms": self.bfd.interval_ms,
            "multiplier": self.bfd.multiplier,
            "peers": self.peers(),
            "restarts": self.restarts,
            "last_error": self.last_error,
        }
