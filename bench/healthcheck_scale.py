"""Health-check scale: 10,000 TCP and 5,000 HTTP backends probed every second by one checker.

A responder process serves the backends on loopback (N/10 addresses in 127.77.0.0/16, 10 ports
each) with a minimal epoll loop that accepts, answers one HTTP/1.1 request and closes (polling
every 2 ms rather than sleeping in epoll_wait, see respond); the
checker (this process) runs a real HealthMonitor over them: tcp checks, then http checks. Every
probe is a new connection. Figures per check type, over a window that starts after the first
interval (when every target's spread-out first probe has run):

- share of the schedule reached: conclusive probes of the slots inside the window / N x window /
  interval (slots skipped because the checker fell behind count as missed);
- lateness of each probe's start against its slot: p50, p99, max;
- spurious failures: failed probes (every backend is healthy, so each failure is spurious), and
  backends that went DOWN; "stalled" probes (timeouts that fired late because this process was
  starved; the monitor does not count them) are shown apart and are not in the share;
- CPU cores used by the checker: its CPU time (user + system) / wall time of the window; the
  checker is one process, no workers. The responder's cores are printed apart. On loopback the
  kernel runs both ends of each handshake inside the checker's connect(), so the checker's
  system time includes work a remote backend's kernel would do; its share is printed.

Baseline in the same run: 1000 http backends through the lean path against the same 1000 through
the path it replaced (a task per target, aiohttp): CPU per 1000 probes and their ratio.

With --gc-freeze, tcp and http also run with gc.freeze() after setup ("frz" rows): the checker's
remaining lateness is mostly the cyclic collector's full passes over every long-lived object
(tens to 100+ ms each); freezing what exists after a config load shows what that would buy. The
goal lines judge the plain rows, which are what the node does.

Rounds are interleaved (tcp, http, [frz rows,] baseline pair) and figures are medians over rounds; the goals
(issue 12: >= 99 % of schedule, p99 lateness <= 100 ms, no spurious failure, <= 1 core) are judged
on the medians. Other work on the machine competes for the CPUs: the load average is printed.
Not a test. `python bench/healthcheck_scale.py [--tcp 10000 --http 5000 --rounds 3]`
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import ipaddress
import logging
import math
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from pydantic import TypeAdapter

PORTS_PER_ADDRESS = 10
BASE_PORT = 18080
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
RESPONDER_NAP = 0.002  # seconds between the responder's polls
GOAL_SHARE, GOAL_P99, GOAL_CORES = 0.99, 0.100, 1.0


def backends(n: int) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        a = i // PORTS_PER_ADDRESS
        out.append((f"127.77.{a // 250}.{a % 250 + 1}", BASE_PORT + i % PORTS_PER_ADDRESS))
    return out


# ------------------------------------------------------------------------------- responder


def respond(n: int) -> None:
    """Accept, read one request, answer, close: an epoll loop, so the responder's own cost per
    connection stays small next to the checker's (they share the machine's two cores)."""
    ep = select.epoll()
    listeners: dict[int, socket.socket] = {}
    for host, port in backends(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(4096)
        s.setblocking(False)
        listeners[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLIN)
    conns: dict[int, list[Any]] = {}
    stdin = sys.stdin.fileno()
    ep.register(stdin, select.EPOLLIN | select.EPOLLHUP)
    print("ready", flush=True)
    while True:
        # Poll, then sleep: a responder blocked in epoll_wait would be woken by every new
        # connection, and on loopback that wake-up is paid inside the checker's connect() call,
        # a cost a real backend on another machine would never put on the checker.
        time.sleep(RESPONDER_NAP)
        for fd, _ in ep.poll(0):
            if fd == stdin:
                return  # the checker closed our stdin
            lst = listeners.get(fd)
            if lst is not None:
                _accept_all(lst, ep, conns)
            elif fd in conns:
                _serve(fd, ep, conns)


def _accept_all(lst: socket.socket, ep: select.epoll, conns: dict[int, list[Any]]) -> None:
    while True:
        try:
            conn, _ = lst.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                print(f"responder: {exc}", file=sys.stderr)
                return
            continue
        conn.setblocking(False)
        conns[conn.fileno()] = [conn, b""]
        if _serve(conn.fileno(), None, conns):
            ep.register(conn.fileno(), select.EPOLLIN)


def _serve(fd: int, ep: select.epoll | None, conns: dict[int, list[Any]]) -> bool:
    """Read what is there; True while the request is incomplete."""
    entry = conns[fd]
    conn = entry[0]
    try:
        data = conn.recv(4096)
    except BlockingIOError:
        return True
    except OSError:
        data = b""  # a tcp probe resets right after connecting
    if data:
        entry[1] += data
        if b"\r\n\r\n" not in entry[1]:
            return True
        try:
            conn.send(RESPONSE)
        except OSError:
            pass
    del conns[fd]
    conn.close()
    return False


# ------------------------------------------------------------------------------- checker


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def make_targets(kind: str, n: int, interval: float) -> list[Any]:
    from healthcheck import Target
    from node.config import HealthCheck

    spec: dict[str, Any] = {"type": kind, "interval": interval, "timeout": min(1.0, interval / 2)}
    if kind == "http":
        spec["path"] = "/"
    check = TypeAdapter(HealthCheck).validate_python(spec)
    return [Target(ipaddress.ip_address(h), p, check) for h, p in backends(n)]


class Window:
    """Collects what the on_probe hook sees inside the measured window."""

    def __init__(self) -> None:
        self.start = self.end = math.inf
        self.late: list[float] = []
        self.probes = self.failed = self.stalled = 0
        self.reasons: dict[str, int] = {}

    def on_probe(self, target: Any, scheduled: float, started: float, result: Any) -> None:
        # By slot, not by start: a window of k intervals holds exactly k slots of every target.
        if not self.start <= scheduled < self.end:
            return
        self.late.append(started - scheduled)
        if result.inconclusive:
            self.stalled += 1  # timed out only because this process was stalled
            return
        self.probes += 1
        if not result.ok:
            self.failed += 1
            self.reasons[result.reason] = self.reasons.get(result.reason, 0) + 1


async def measure(kind: str, n: int, interval: float, duration: float, generic: bool = False,
                  freeze: bool = False) -> dict[str, float]:
    from healthcheck import HealthMonitor, State

    targets = make_targets(kind, n, interval)
    loop = asyncio.get_running_loop()
    win = Window()
    downs = 0

    def on_transition(t: Any) -> None:
        nonlocal downs
        downs += t.new is State.DOWN

    stop_generic = None
    if generic:
        stop_generic = await _start_generic(targets, win)
    else:
        mon = HealthMonitor(on_transition, on_probe=win.on_probe)
        mon.update(targets)
        await mon.start()
    if freeze:
        gc.freeze()  # what exists now (config, targets, modules) leaves the collector's view
    begin = loop.time()
    win.start, win.end = begin + interval, begin + interval + duration
    await asyncio.sleep(interval)
    t0, wall0 = os.times(), loop.time()
    await asyncio.sleep(duration)
    t1, wall = os.times(), loop.time() - wall0
    user, system = t1.user - t0.user, t1.system - t0.system
    cpu = user + system
    await asyncio.sleep(min(1.0, interval / 2) + 0.1)  # the window's last probes finish
    if stop_generic is not None:
        await stop_generic()
    else:
        await mon.stop()
    gc.unfreeze()
    if win.reasons:
        print(f"  {kind}: failures: {dict(sorted(win.reasons.items(), key=lambda kv: -kv[1])[:3])}")
    return {
        "share": win.probes / (n * duration / interval),
        "cores": cpu / wall,
        "cpu_per_1000": cpu / max(win.probes + win.stalled, 1) * 1000,
        "sys_share": system / cpu if cpu else float("nan"),
        "p50": percentile(win.late, 0.50),
        "p99": percentile(win.late, 0.99),
        "max": max(win.late) if win.late else float("nan"),
        "failed": win.failed,
        "downs": downs,
        "stalled": win.stalled,
    }


async def _start_generic(targets: list[Any], win: Window):
    """The path the lean one replaced: a sleeping task per target, every probe through aiohttp."""
    from healthcheck import Prober
    from healthcheck.monitor import first_offset

    prober = Prober()
    loop = asyncio.get_running_loop()

    async def run(target: Any) -> None:
        interval = target.check.interval
        next_at = loop.time() + first_offset(target)
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            started = loop.time()
            win.on_probe(target, next_at, started, await prober.probe_generic(target))
            next_at += interval
            if next_at < loop.time():
                next_at += math.ceil((loop.time() - next_at) / interval) * interval

    tasks = [loop.create_task(run(t)) for t in targets]

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await prober.close()

    return stop


def child_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(name: str, kind: str, n: int, args: argparse.Namespace, responder: subprocess.Popen,
            generic: bool = False, freeze: bool = False) -> dict[str, float]:
    resp0, t0 = child_cpu(responder.pid), time.monotonic()
    r = asyncio.run(measure(kind, n, args.interval, args.duration, generic, freeze))
    r["responder_cores"] = (child_cpu(responder.pid) - resp0) / (time.monotonic() - t0)
    r["load"] = os.getloadavg()[0]
    print(f"  {name:<15} {r['share']:>6.1%}  p99 {r['p99'] * 1000:6.1f} ms  failed {r['failed']:.0f}  "
          f"down {r['downs']:.0f}  stalled {r['stalled']:.0f}  cores {r['cores']:.2f}  "
          f"CPU/1000 {r['cpu_per_1000']:.3f} s ({r['sys_share']:.0%} system)  responder {r['responder_cores']:.2f}  load {r['load']:.1f}",
          flush=True)
    return r


def median_of(rounds: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tcp", type=int, default=10000, help="tcp backends (0: skip)")
    ap.add_argument("--http", type=int, default=5000, help="http backends (0: skip)")
    ap.add_argument("--baseline", type=int, default=1000, help="http backends of the lean/aiohttp pair (0: skip)")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gc-freeze", action="store_true",
                    help="also run tcp and http with gc.freeze() after setup (not what the node does)")
    ap.add_argument("--responder", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n_max = max(args.tcp, args.http, args.baseline)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The responder holds a listening socket per backend plus the connections being served; the
    # checker only the probes in flight.
    if hard < n_max + 2048:
        print(f"RLIMIT_NOFILE hard limit {hard} is below the {n_max + 2048} descriptors needed",
              file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * n_max + 2048), hard))
    if args.responder:
        respond(args.responder)
        return 0

    responder = subprocess.Popen([sys.executable, __file__, "--responder", str(n_max)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    plan = [(f"tcp {args.tcp}", "tcp", args.tcp, False, False),
            (f"http {args.http}", "http", args.http, False, False)]
    if args.gc_freeze:
        plan += [(f"tcp {args.tcp} frz", "tcp", args.tcp, False, True),
                 (f"http {args.http} frz", "http", args.http, False, True)]
    plan += [(f"lean {args.baseline}", "http", args.baseline, False, False),
             (f"aiohttp {args.baseline}", "http", args.baseline, True, False)]
    plan = [p for p in plan if p[2] > 0]
    results: dict[str, list[dict[str, float]]] = {p[0]: [] for p in plan}
    try:
        if responder.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            print("responder failed to start", file=sys.stderr)
            return 1
        print(f"interval {args.interval:g} s, {args.duration:g} s measured per run, {args.rounds} rounds, "
              f"{os.cpu_count()} CPUs shared with other work, load average {os.getloadavg()[0]:.2f}")
        for i in range(args.rounds):
            print(f"round {i + 1}")
            for name, kind, n, generic, freeze in plan:
                results[name].append(run_one(name, kind, n, args, responder, generic, freeze))
    finally:
        responder.stdin.close()  # type: ignore[union-attr]
        try:
            responder.wait(10)
        except subprocess.TimeoutExpired:
            responder.kill()
            responder.wait()
    return report(results, args)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> int:
    print(f"\nmedians over {args.rounds} rounds")
    print(f"{'run':<15} {'of sched':>9} {'late p50':>9} {'p99':>8} {'max':>8} {'failed':>7} {'down':>5} "
          f"{'stalled':>8} {'cores':>6} {'CPU s/1000':>11} {'responder':>10}")
    for name, rounds in results.items():
        m = {k: median_of(rounds, k) for k in rounds[0]}
        print(f"{name:<15} {m['share']:>8.1%} {m['p50'] * 1000:>7.1f}ms {m['p99'] * 1000:>6.1f}ms "
              f"{m['max'] * 1000:>6.1f}ms {m['failed']:>7.0f} {m['downs']:>5.0f} {m['stalled']:>8.0f} "
              f"{m['cores']:>6.2f} {m['cpu_per_1000']:>11.3f} {m['responder_cores']:>10.2f}")
    lean, old = f"lean {args.baseline}", f"aiohttp {args.baseline}"
    if lean in results and old in results:
        ratios = [o["cpu_per_1000"] / l["cpu_per_1000"] for l, o in zip(results[lean], results[old])]
        print(f"http CPU per probe, aiohttp path / lean path: {statistics.median(ratios):.1f}x "
              f"(median of per-round ratios {', '.join(f'{r:.1f}' for r in ratios)})")
    for name in (f"tcp {args.tcp}", f"http {args.http}"):
        if name not in results:
            continue
        rounds = results[name]
        share, p99 = median_of(rounds, "share"), median_of(rounds, "p99")
        cores = median_of(rounds, "cores")
        spurious = sum(r["failed"] + r["downs"] for r in rounds)
        met = share >= GOAL_SHARE and p99 <= GOAL_P99 and spurious == 0 and cores <= GOAL_CORES
        print(f"goal {name} at {args.interval:g} s (>= 99 % of schedule, p99 <= 100 ms, no spurious "
              f"failure in any round, <= 1 core): {'met' if met else 'NOT met'} "
              f"({share:.1%}, {p99 * 1000:.0f} ms, {spurious:.0f} spurious, {cores:.2f} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
