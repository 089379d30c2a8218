"""BgpSpeaker: ExaBGP as a supervised child, driven by the reconciler over the helper channel.

Lifetimes, because a route announced by nobody blackholes a share of every flow:
- ExaBGP is started in its own process group with PR_SET_PDEATHSIG=SIGKILL, so the kernel kills
  it when the controller dies (even by SIGKILL); its TCP sessions close and routers drop the
  routes within a fraction of a second. (PDEATHSIG follows the *thread* that forked: run the
  speaker on a loop whose thread lives as long as the controller, normally the main thread.)
- The helper ExaBGP runs connects to a UNIX socket of ours; when that channel closes the helper
  terminates ExaBGP, and when the channel closes on our side we restart ExaBGP as a whole.
- ExaBGP that dies is restarted with exponential back-off; after ``MAX_FAILURES`` quick deaths
  in a row the speaker reports itself unhealthy (and keeps trying at the longest back-off).
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from bgp import exabgp
from bgp.bfd import BfdDaemon
from bgp.graceful import EndOfRib
from bgp.reconciler import Command, Reconciler
from bgp.routes import GRACEFUL_SHUTDOWN, Route
from bgp.supervise import MAX_FAILURES, STABLE_AFTER, Supervised
from node.config import BgpConfig
from node.logs import ChildOutput, event

log = logging.getLogger("maglev.bgp")

PR_SET_PDEATHSIG = 1
ACK_TIMEOUT = 10.0
CONNECT_TIMEOUT = 15.0
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes

SessionState = Literal["idle", "connecting", "established"]


class BgpError(RuntimeError):
    pass


@dataclass
class SessionInfo:
    peer: str
    state: SessionState
    since: float  # wall-clock time of the last state change
    last_error: str | None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGKILL this child when the forking thread dies; bail out if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(111)
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os._exit(112)

    return setup


def _ancestors(pid: int, limit: int = 8) -> list[int]:
    out = []
    for _ in range(limit):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
        if pid <= 1:
            break
    return out


class BgpSpeaker(Supervised):
    """Announce a desired set of VIP routes through a supervised ExaBGP.

    Call its methods from the event loop it was started on (not thread-safe). ``announced()``
    and ``status()`` name prefixes as 'ADDRESS/32' or 'ADDRESS/128'; ``SessionInfo.since`` is
    wall-clock time. AS-path prepends (de-preferred VIPs) are sent only when no peer is iBGP.
    """

    def __init__(
        self,
        config: BgpConfig,
        run_dir: Path,
        *,
        on_change: Callable[[], None] | None = None,
        exabgp_argv: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        bfd_dir: Path | None = None,
        bfdd_wrapper: Sequence[str] = (),
        log_dir: Path | None = None,
    ):
        self.config = config
        self.run_dir = Path(run_dir)
        self.on_change = on_change
        # The config path is appended; a wrapper (e.g. `ip netns exec NS`) must exec, not fork.
        self.exabgp_argv = list(exabgp_argv) if exabgp_argv else [sys.executable, "-m", "exabgp", "server"]
        self.clock = clock
        ibgp = any(p.peer_as == config.local_as for p in config.peers)
        self.reconciler = Reconciler(
            clock=clock, next_hop=config.next_hop, min_change_interval=config.min_change_interval,
            local_as=None if ibgp else config.local_as,
        )
        self.graceful = EndOfRib(config, clock)
        now = time.time()
        self._sessions = {str(p.address): SessionInfo(str(p.address), "idle", now, None) for p in config.peers}
        self.socket_path = self.run_dir / "api.sock"
        self.config_path = self.run_dir / "exabgp.conf"
        # ExaBGP's own output, drained by us into a size-bounded rotated file (log_dir: the
        # node's logs directory; default the run directory).
        self.output = ChildOutput(Path(log_dir or run_dir) / "exabgp.log", "ExaBGP")
        self.log_path = self.output.path
        self._drain: asyncio.Task | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.session_transitions: dict[tuple[str, str], int] = {}  # (peer, new state) -> count
        self.last_error: str | None = None
        self._failures = 0
        self._closing = False
        self._server: asyncio.base_events.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ack: asyncio.Future | None = None
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._last_announced = 0  # the reconciler's announced_version last told
        self._started_at = 0.0
        # Optional BFD next to ExaBGP (bgp.bfd.enabled): routers drop a dead node in
        # interval x multiplier instead of the hold time. bfdd_wrapper: like exabgp_argv's prefix.
        self.bfd = (BfdDaemon(config, Path(bfd_dir) if bfd_dir else self.run_dir / "bfd", wrapper=bfdd_wrapper,
                              log_dir=log_dir)
                    if config.bfd.enabled else None)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Write the ExaBGP config, start ExaBGP supervised, wait (bounded) for its channel."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path)) > SOCKET_PATH_MAX:
            raise BgpError(f"run directory {self.run_dir} is too long for a UNIX socket path "
                           f"(max {SOCKET_PATH_MAX} characters); use a shorter one")
        self.config_path.write_text(exabgp.render_config(self.config, self.socket_path))
        if self.bfd is not None:
            # First, so BFD is up by the time the BGP sessions are (raises BfdError).
            await self.bfd.start()
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_client, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        await self._spawn()  # the first start raises if ExaBGP cannot even be executed
        self._tasks = [asyncio.create_task(self._supervise(), name="bgp-supervisor"),
                       asyncio.create_task(self._drive(), name="bgp-reconciler")]
        try:
            await asyncio.wait_for(self._connected.wait(), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("ExaBGP's API helper did not connect within %.0f s; see %s", CONNECT_TIMEOUT, self.log_path)

    async def stop(self, graceful: bool = True, keep_routes: bool = False) -> None:
        """graceful: GRACEFUL_SHUTDOWN phase (if configured), withdraw all, wait, stop ExaBGP.

        keep_routes (a planned restart, bgp.graceful_restart enabled): no withdraw; ExaBGP,
        stopped with SIGTERM, closes its sessions without a NOTIFICATION, so routers helping the
        restart keep the routes for restart_time while the forwarder keeps forwarding.
        """
        if keep_routes and not self.config.graceful_restart.enabled:
            log.warning("BGP stop: keeping routes needs bgp.graceful_restart.enabled; withdrawing instead")
            keep_routes = False
        if keep_routes:
            log.info("BGP stop for a restart: routes kept (graceful restart, routers keep them for %d s)",
                     self.config.graceful_restart.restart_time,
                     extra=event("bgp_graceful_restart_stop", restart_time=self.config.graceful_restart.restart_time,
                                 announced=sorted(self.reconciler.announced())))
        elif graceful and self._writer is not None and self.proc is not None:
            if self.config.graceful_shutdown > 0 and self.reconciler.announced():
                self.reconciler.set_extra_communities((GRACEFUL_SHUTDOWN,))
                self._wake.set()
                await self._wait_converged(5.0)
                await asyncio.sleep(self.config.graceful_shutdown)
            self.reconciler.withdraw_all()
            self._wake.set()
            if not await self._wait_converged(5.0):
                log.warning("BGP stop: withdraws not all acknowledged: %s", self.reconciler.pending())
            # `done` means accepted, not sent: give routers time to reconverge before the
            # sessions close.
            await asyncio.sleep(self.config.withdraw_delay)
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._terminate(graceful)
        await self._drained()
        if self.bfd is not None:
            # After ExaBGP: the sessions are closed, so BFD going away changes nothing at the router.
            # For graceful restart this order is essential: FRR flushes a peer's routes when BFD
            # goes down while its session is up, and keeps them when the session closed first.
            await self.bfd.stop()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._server is not None:
            self._server.close()
            self._server = None
        self.socket_path.unlink(missing_ok=True)
        now = time.time()
        for s in self._sessions.values():
            if s.state != "idle":
                s.state, s.since = "idle", now
        self._notify(force=True)

    async def _wait_converged(self, timeout: float) -> bool:
        deadline = self.clock() + timeout
        while not self.reconciler.converged():
            if self.clock() > deadline or self._writer is None:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _terminate(self, graceful: bool) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 3.0)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        except ProcessLookupError:
            pass

    # -- supervision ---------------------------------------------------------------------------

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.exabgp_argv, str(self.config_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=exabgp.environment(self.run_dir), cwd=str(self.run_dir),
            start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
        )
        self._drain = self.output.drain(self.proc.stdout)
        self._started_at = self.clock()
        log.info("ExaBGP started (pid %d, config %s, log %s)", self.proc.pid, self.config_path, self.log_path)

    def _exited(self, rc: int, ran: float) -> None:
        self.last_error = f"ExaBGP exited with status {rc} after {ran:.1f} s; last log lines: {self._log_tail()}"
        log.error("%s; restarting", self.last_error)
        self._lost_exabgp("ExaBGP exited")

    def _spawn_failed(self, exc: OSError) -> None:
        self.last_error = f"cannot start ExaBGP ({' '.join(self.exabgp_argv)}): {exc}"
        log.error(self.last_error)

    def _lost_exabgp(self, reason: str) -> None:
        now = time.time()
        for s in self._sessions.values():
            self.graceful.session_down(s.peer)
            if s.state != "idle":
                s.state, s.since, s.last_error = "idle", now, reason
        self._notify(force=True)

    def _log_tail(self, lines: int = 3) -> str:
        return self.output.tail(lines)

    async def _drained(self) -> None:
        """Wait (bounded) until ExaBGP's output is all written: its last lines say why it stopped."""
        if self._drain is not None:
            await asyncio.wait([self._drain], timeout=2.0)

    # -- the channel ---------------------------------------------------------------------------

    def _is_current(self, pid: int) -> bool:
        proc = self.proc
        return proc is not None and proc.returncode is None and (pid == proc.pid or proc.pid in _ancestors(pid))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = json.loads((await asyncio.wait_for(reader.readline(), 5.0)) or b"{}")
            pid = int(hello.get("hello", -1))
        except (asyncio.TimeoutError, ValueError, TypeError, AttributeError, ConnectionError):
            pid = -1
        if self._closing or not self._is_current(pid):
            log.warning("ignoring an API helper connection from pid %s (not the current ExaBGP)", pid)
            writer.close()
            return
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        self.reconciler.channel_reset()  # a fresh ExaBGP knows no routes: send them all
        self._connected.set()
        self._wake.set()
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                self._on_line(line.decode(errors="replace").strip())
        except ConnectionError:
            pass
        finally:
            if self._writer is writer:
                self._writer = None
                self._connected.clear()
                self._resolve_ack(False, "the channel to ExaBGP closed")
                if not self._closing and self.proc is not None and self.proc.returncode is None:
                    # Without its helper ExaBGP would keep announcing unsupervised.
                    log.error("the API helper of ExaBGP pid %d went away; restarting ExaBGP", self.proc.pid)
                    try:
                        self.proc.kill()
                    except ProcessLookupError:
                        pass
            writer.close()

    def _on_line(self, line: str) -> None:
        if line in ("done", "error"):
            self._resolve_ack(line == "done", None if line == "done" else "ExaBGP answered error")
            return
        if not line.startswith("{"):
            log.debug("ExaBGP API: %s", line)
            return
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("ExaBGP sent an unparsable API line: %.200s", line)
            return
        if msg.get("type") == "state":
            self._on_state(msg.get("neighbor") or {})
        elif msg.get("type") == "open":
            self._on_open(msg.get("neighbor") or {})

    def _on_open(self, nb: dict[str, Any]) -> None:
        """The router's OPEN (sent with graceful restart only): does it offer the capability?"""
        try:
            peer = str(ipaddress.ip_address(nb["address"]["peer"]))
            capabilities = nb["open"]["capabilities"]
        except (KeyError, TypeError, ValueError):
            return
        if nb.get("direction") != "receive" or peer not in self._sessions or not isinstance(capabilities, dict):
            return
        offered = next((c for c in capabilities.values()
                        if isinstance(c, dict) and c.get("name") == "graceful restart"), None)
        self.graceful.router_open(peer, offered)

    def _on_state(self, nb: dict[str, Any]) -> None:
        try:
            peer = str(ipaddress.ip_address(nb["address"]["peer"]))
        except (KeyError, TypeError, ValueError):
            return
        state = {"up": "established", "connected": "connecting", "down": "idle"}.get(nb.get("state"))
        if state is None or peer not in self._sessions:
            return
        s = self._sessions[peer]
        if state == "idle":
            self.graceful.session_down(peer)
            s.last_error = str(nb.get("reason") or "session down")
            log.warning("BGP session with %s down: %s", peer, s.last_error,
                        extra=event("bgp_session_down", peer=peer, reason=s.last_error))
        if state == "established":
            log.info("BGP session with %s established", peer, extra=event("bgp_session_up", peer=peer))
            self.reconciler.resend_all()
            self.graceful.session_up(peer)
            self._wake.set()
        if s.state != state:
            s.state, s.since = state, time.time()
            key = (peer, state)  # counted here, where it happens: a scrape would miss a quick flap
            self.session_transitions[key] = self.session_transitions.get(key, 0) + 1
            self._notify(force=True)

    def _resolve_ack(self, ok: bool, error: str | None) -> None:
        fut, self._ack = self._ack, None
        if fut is not None and not fut.done():
            fut.set_result((ok, error))

    async def _send(self, cmd: Command) -> tuple[bool, str | None]:
        writer = self._writer
        if writer is None:
            return False, "no channel to ExaBGP"
        self._ack = asyncio.get_running_loop().create_future()
        fut = self._ack
        try:
            writer.write((cmd.text + "\n").encode("ascii"))
            await writer.drain()
            ok, error = await asyncio.wait_for(fut, ACK_TIMEOUT)
            if not ok:
                log.warning("ExaBGP refused %r: %s (will retry with back-off)", cmd.text, error)
            return ok, error
        except (ConnectionError, OSError) as e:
            return False, f"channel error: {e}"
        except asyncio.TimeoutError:
            log.error("ExaBGP did not answer %r within %.0f s; restarting it", cmd.text, ACK_TIMEOUT)
            if self.proc is not None and self.proc.returncode is None:
                self.proc.kill()
            return False, "no answer from ExaBGP"

    async def _drive(self) -> None:
        rec = self.reconciler
        while not self._closing:
            cmd = await rec.step(self._send) if self._writer is not None else None
            if cmd is None and self._writer is not None and await self._send_end_of_rib():
                continue
            if cmd is None:
                wake_at = _earliest(rec.next_wakeup(), self.graceful.next_wakeup()) if self._writer is not None else None
                timeout = None if wake_at is None else max(0.0, wake_at - self.clock()) + 0.001
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
                continue
            self._notify()

    async def _send_end_of_rib(self) -> bool:
        """Every route is handed to ExaBGP: send an End-of-RIB a session still owes (True if sent).
        ExaBGP sends a neighbor's pending routes before a queued End-of-RIB."""
        eor = self.graceful.next_command()
        if eor is None:
            return False
        ok, error = await self._send(eor)  # type: ignore[arg-type]  # only .text is sent
        self.graceful.on_result(eor, ok)
        if ok:
            log.info("End-of-RIB sent to %s: the router drops any stale route of ours now", eor.peer,
                     extra=event("bgp_end_of_rib", peer=eor.peer))
        return ok

    def routes_ready(self) -> None:
        """The controller's first decision after warm-up is in set_desired: End-of-RIB may follow
        (graceful restart; a no-op without it)."""
        if not self.graceful.ready:
            self.graceful.routes_ready()
            self._wake.set()

    def _notify(self, force: bool = False) -> None:
        """Tell the owner when sessions or the acknowledged announcements changed."""
        version = self.reconciler.announced_version  # not the set: O(1) per command
        changed = force or version != self._last_announced
        self._last_announced = version
        if self.on_change is not None and changed:
            try:
                self.on_change()
            except Exception:  # the callback's bug must not stop BGP
                log.exception("BGP on_change callback failed")

    # -- public views --------------------------------------------------------------------------

    def set_desired(self, routes: Iterable[Route]) -> None:
        """The routes this node should announce; converges asynchronously."""
        self.reconciler.set_desired(routes)
        self._wake.set()

    def sessions(self) -> dict[str, SessionInfo]:
        return {k: SessionInfo(**asdict(v)) for k, v in self._sessions.items()}

    def announced(self) -> set[str]:
        return self.reconciler.announced()

    @property
    def healthy(self) -> bool:
        """False once ExaBGP died MAX_FAILURES times in a row without staying up; true again
        when a later start has run for STABLE_AFTER seconds with its channel connected."""
        if self._closing:
            return False
        if self._failures < MAX_FAILURES:
            return True
        proc = self.proc
        return (proc is not None and proc.returncode is None and self._writer is not None
                and self.clock() - self._started_at >= STABLE_AFTER)

    def status(self) -> dict:
        proc = self.proc
        return {
            "healthy": self.healthy,
            "exabgp_pid": proc.pid if proc is not None and proc.returncode is None else None,
            "channel": self._writer is not None,
            "sessions": {k: asdict(v) for k, v in self._sessions.items()},
            "announced": sorted(self.reconciler.announced()),
            "pending": self.reconciler.pending(),
            "restarts": self.restarts,
            "last_error": self.last_error or self.reconciler.last_error,
            "bfd": self.bfd.status() if self.bfd is not None else {"enabled": False},
            "graceful_restart": self.graceful.status(),
        }


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None
