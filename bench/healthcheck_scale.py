"""Health-check scale: N backends probed every second, CPU and punctuality of the checker.

A responder process serves N loopback backends (N/10 addresses in 127.77.0.0/16, 10 ports each)
with a minimal asyncio HTTP/1.1 answer; the checker (this process) runs a HealthMonitor over them,
first with tcp checks, then with http checks. Only the checker's CPU is counted; the responder's
is printed apart. Figures per check type, measured over a window that starts after the first
interval (when every target's spread-out first probe has run):

- checks/s achieved against the N/interval scheduled;
- CPU seconds per 1000 checks and the share of one core;
- lateness of each probe's start against its schedule: p50, p99, max;
- failed probes, and "stalled" ones: timeouts that fired late because this process was starved
  (the monitor does not count those against backends);
- the http/tcp CPU ratio, tcp being this run's baseline.

Aim (issue 3): 2000 HTTP backends at 1 s on well under one core, no probe more than 100 ms late.
Not a test: it prints figures. `python bench/healthcheck_scale.py [--backends 2000 --duration 10]`
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import resource
import subprocess
import sys
import time

from pydantic import TypeAdapter

PORTS_PER_ADDRESS = 10
BASE_PORT = 18080
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def backends(n: int) -> list[tuple[str, int]]:
    out = []
    for i in range(n):
        a = i // PORTS_PER_ADDRESS
        out.append((f"127.77.{a // 250}.{a % 250 + 1}", BASE_PORT + i % PORTS_PER_ADDRESS))
    return out


# ------------------------------------------------------------------------------- responder


class _Http(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.transport.write(RESPONSE)
            self.transport.close()


async def respond(n: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_Http, host, port, backlog=512) for host, port in backends(n)]
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the checker closes our stdin
    for s in servers:
        s.close()


# ------------------------------------------------------------------------------- checker


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(kind: str, n: int, interval: float, duration: float) -> dict[str, float]:
    from healthcheck import HealthMonitor, Target
    from node.config import HealthCheck

    check = TypeAdapter(HealthCheck).validate_python(
        {"type": kind, "interval": interval, "timeout": min(1.0, interval / 2), "path": "/"}
        if kind == "http"
        else {"type": kind, "interval": interval, "timeout": min(1.0, interval / 2)}
    )
    targets = [Target(ipaddress.ip_address(h), p, check) for h, p in backends(n)]
    loop = asyncio.get_running_loop()
    window: list[float] = []  # [start, end] of the measured window in loop time
    late: list[float] = []
    counts = {"probes": 0, "failed": 0, "stalled": 0}
    reasons: dict[str, int] = {}

    def on_probe(target: Target, scheduled: float, started: float, result) -> None:
        if window and window[0] <= started < window[1]:
            late.append(started - scheduled)
            counts["probes"] += 1
            if result.inconclusive:
                counts["stalled"] += 1  # timed out only because this process was stalled
            elif not result.ok:
                counts["failed"] += 1
                reasons[result.reason] = reasons.get(result.reason, 0) + 1

    mon = HealthMonitor(on_probe=on_probe)
    mon.update(targets)
    await mon.start()
    begin = loop.time()
    window.extend([begin + interval, begin + interval + duration])
    await asyncio.sleep(interval)
    cpu0 = time.process_time()
    await asyncio.sleep(duration)
    cpu = time.process_time() - cpu0
    await mon.stop()
    if reasons:
        print(f"  {kind}: failures: {dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:3])}")
    return {
        "rate": counts["probes"] / duration,
        "cpu": cpu,
        "cpu_per_1000": cpu / max(counts["probes"], 1) * 1000,
        "core": cpu / duration,
        "p50": percentile(late, 0.50),
        "p99": percentile(late, 0.99),
        "max": max(late) if late else float("nan"),
        "failed": counts["failed"],
        "stalled": counts["stalled"],
        "probes": counts["probes"],
    }


def child_cpu(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", type=int, default=2000)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per check type")
    ap.add_argument("--types", default="tcp,http", help="check types to run, in order (default tcp,http)")
    ap.add_argument("--responder", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.backends * 3 + 1024)), hard))
    if args.responder:
        asyncio.run(respond(args.backends))
        return 0

    responder = subprocess.Popen(
        [sys.executable, __file__, "--responder", "--backends", str(args.backends)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        if responder.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            print("responder failed to start", file=sys.stderr)
            return 1
        print(f"{args.backends} backends on loopback, interval {args.interval:g} s, "
              f"{args.duration:g} s measured per type, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f} (other work competes for the CPUs)")
        runs: list[tuple[str, dict[str, float]]] = []
        for kind in args.types.split(","):
            resp0 = child_cpu(responder.pid)
            r = asyncio.run(measure(kind, args.backends, args.interval, args.duration))
            r["responder_core"] = (child_cpu(responder.pid) - resp0) / (args.duration + 2 * args.interval)
            runs.append((kind, r))
    finally:
        responder.stdin.close()  # type: ignore[union-attr]
        try:
            responder.wait(10)
        except subprocess.TimeoutExpired:
            responder.kill()
            responder.wait()

    scheduled = args.backends / args.interval
    print(f"{'type':<5} {'checks/s':>9} {'of sched':>9} {'failed':>7} {'stalled':>8} {'CPU s/1000':>11} {'cores':>6} "
          f"{'late p50':>9} {'p99':>8} {'max':>8} {'responder cores':>16}")
    for kind, r in runs:
        print(f"{kind:<5} {r['rate']:>9.0f} {r['rate'] / scheduled:>8.0%} {r['failed']:>7.0f} {r['stalled']:>8.0f} "
              f"{r['cpu_per_1000']:>11.3f} {r['core']:>6.2f} {r['p50'] * 1000:>7.1f}ms "
              f"{r['p99'] * 1000:>6.1f}ms {r['max'] * 1000:>6.1f}ms {r['responder_core']:>16.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    results = dict(runs)  # the last run of each type
    if "http" not in results:
        return 0
    if "tcp" in results:
        ratio = results["http"]["cpu_per_1000"] / results["tcp"]["cpu_per_1000"]
        print(f"http/tcp CPU per check: {ratio:.1f}x (tcp is this run's baseline)")
    h = results["http"]
    aim = h["core"] < 0.5 and h["max"] < 0.1 and h["failed"] == 0
    print(f"aim (http: < 0.5 core, max lateness < 100 ms, no failures): {'met' if aim else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
