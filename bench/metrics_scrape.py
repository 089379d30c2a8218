"""How long a /metrics scrape stalls the node's event loop, at 8191 backends.

Two handlers over the same controller (fake components from tests/unit/test_controller.py, one
VIP with 8191 healthy backends, forwarder counters for each): the node's real /metrics route
(snapshot on the loop, exposition in a worker thread) against a baseline that renders the same
exposition on the loop, as the node did before. While a client scrapes, a ticker task on the
loop sleeps 1 ms at a time and records the longest gap between its wake-ups: the time health
probes and BGP would have waited. The scraper is curl, in its own process. Rounds alternate between the two handlers in one run; the
figures are medians over rounds, and the ratio is what counts on a busy machine.

Not a test: it prints figures; run `python bench/metrics_scrape.py`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from healthcheck import State  # noqa: E402
from node import metrics  # noqa: E402
from node.api import CONTROLLER, make_app  # noqa: E402
from tests.unit.test_controller import Env, vip  # noqa: E402

BACKENDS = 8191
TABLE_SIZE = 65537
ROUNDS = 5


def counters(names: list[str]) -> dict:
    stats = {"packets": 123_456_789, "bytes": 98_765_432_100, "new_flows": 4567, "ct_hits": 89_012, "ct_misses": 4567}
    return {"vips": {"big": dict(stats)}, "vip_backends": {"big": {n: dict(stats) for n in names}},
            "backends": {n: dict(stats) for n in names}, "drops": {"no_backend": 3}, "events": {"icmp_steered": 5}}


async def inline_metrics(request: web.Request) -> web.Response:
    """The baseline: the whole exposition rendered on the event loop."""
    c = request.app[CONTROLLER]
    text = metrics.render(c, await asyncio.to_thread(c.forwarder.counters))
    return web.Response(text=text, content_type="text/plain")


async def stall_during(client: TestClient, path: str) -> tuple[float, float, int]:
    """(longest loop stall, scrape wall time, body size) for one scrape."""
    worst = 0.0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    worst = 0.0
    start = time.perf_counter()
    # The scraper is another process (curl), as Prometheus is: the loop only serves.
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", str(client.make_url(path)),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    took = time.perf_counter() - start
    done.set()
    await task
    status, size = out.decode().split()
    assert status == "200" and int(size) > 1_000_000, out
    return worst, took, int(size)


async def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="mlbbench"))
    addrs = [f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(1, BACKENDS + 1)]
    env = Env(tmp, [vip("big", backends=addrs, table_size=TABLE_SIZE)])
    await env.start()
    for t in env.health.targets:
        env.health.states[t] = State.UP
    await env.c.reconcile()
    names = [b.key for b in env.c.desired.vips["big"].backends]
    env.forwarder.counters = lambda: counters(names)
    app = make_app(env.c, "t")
    app.router.add_get("/metrics-inline", inline_metrics)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        results: dict[str, list[tuple[float, float, int]]] = {"/metrics": [], "/metrics-inline": []}
        await stall_during(client, "/metrics")  # warm-up: imports, first-time allocations
        for _ in range(ROUNDS):
            for path in results:
                results[path].append(await stall_during(client, path))
    finally:
        await client.close()
    new = statistics.median(r[0] for r in results["/metrics"])
    old = statistics.median(r[0] for r in results["/metrics-inline"])
    size = results["/metrics"][0][2]
    print(f"{BACKENDS} backends, exposition {size / 1e6:.1f} MB, medians of {ROUNDS} interleaved rounds")
    for path, label in (("/metrics-inline", "rendered on the loop (before)"), ("/metrics", "snapshot on the loop, "
                                                                                           "render in a thread")):
        stalls = [r[0] for r in results[path]]
        walls = [r[1] for r in results[path]]
        print(f"  {label:<42} loop stall {statistics.median(stalls) * 1000:7.1f} ms   "
              f"scrape {statistics.median(walls) * 1000:7.1f} ms")
    print(f"  loop stall ratio before/after: {old / new:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
