"""Event-loop stalls while the node reads a fleet-scale VIP directory (issue 11).

Three ways to read the same directory (default 4096 VIPs x 16 backends, one file): on the event
loop (what reload did before), in a worker thread with the collector running, and the node's
VipReader (worker thread, collector paused). A 10 ms ticker on the loop records how late it
wakes; the figure is the worst lateness per read, as a median over interleaved rounds, and the
ratio to the on-loop read measured in this same run. The node limits of this machine's
forwarder may refuse the set at the very end (all the work is done by then), which is fine
for the measurement. Not a test: run `python bench/config_reload.py [--vips N --backends M]`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from node import vip_reader
from node.config import ConfigError, load_node_vips, parse_node_object

REPO = Path(__file__).resolve().parents[1]


def write_dir(d: Path, vips: int, backends: int) -> None:
    data = {"vips": [{
        "name": f"v{i}", "address": f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}", "port": 80,
        "table_size": 251, "health_check": {"type": "tcp", "interval": 2, "timeout": 1},
        "backends": [{"address": f"10.200.{i % 256}.{j + 1}"} for j in range(backends)],
    } for i in range(vips)]}
    (d / "all.yaml").write_text(yaml.safe_dump(data))


async def measure(read) -> tuple[float, float]:
    """(seconds the read took, worst ticker lateness in seconds)."""
    loop = asyncio.get_running_loop()
    late: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            t = loop.time()
            await asyncio.sleep(0.01)
            late.append(loop.time() - t - 0.01)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    try:
        await read()
    except ConfigError:
        pass
    took = time.perf_counter() - started
    done = True
    await task
    return took, max(late)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vips", type=int, default=4096)
    ap.add_argument("--backends", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d = Path(tempfile.mkdtemp(prefix="mlb-bench-"))
    write_dir(d, args.vips, args.backends)
    node = parse_node_object(yaml.safe_load((REPO / "configs/node.yaml").read_text()), "node.yaml")
    reader = vip_reader.VipReader()

    async def on_loop() -> None:
        load_node_vips(d, node)

    async def thread_with_gc() -> None:
        await asyncio.to_thread(load_node_vips, d, node)

    async def node_reader() -> None:
        await reader.read(d, node)

    modes = {"on the loop": on_loop, "thread, collector on": thread_with_gc, "VipReader": node_reader}
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, read in modes.items():
            gc.collect()
            results[name].append(await measure(read))
    size = (d / "all.yaml").stat().st_size
    print(f"{args.vips} VIPs x {args.backends} backends ({size / 1e6:.1f} MB), median of {args.rounds} interleaved rounds:")
    base = statistics.median(r[1] for r in results["on the loop"])
    for name, rs in results.items():
        took = statistics.median(r[0] for r in rs)
        worst = statistics.median(r[1] for r in rs)
        print(f"  {name:22} read {took:6.2f} s   worst loop stall {worst * 1000:7.0f} ms   ({worst / base:.3f} of on-loop)")
    reader.close()
    (d / "all.yaml").unlink()
    d.rmdir()


if __name__ == "__main__":
    asyncio.run(main())
