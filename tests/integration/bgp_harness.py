"""What the BGP tests against a real FRR router share (test_bgp_frr.py,
test_announce_policy_frr.py): node namespaces wired point-to-point to the router's, the speakers'
long-lived event loop, a node's BGP settings, and a teardown that leaves nothing behind.

Node i (AS 65100+i) is 10.77.i.2 / fd77:i::2; the router's side of its link is 10.77.i.1 /
fd77:i::1."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import pytest

from lab.netns import Netns, cleanup_prefix, point_to_point, quiet_ipv6
from node.config import BgpConfig

ROUTER_AS = 65000
HOLD = 3
EXABGP = [sys.executable, "-m", "exabgp", "server"]


def wait_for(cond: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll cond until true; return the seconds it took, fail with `what` on timeout."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


class LoopThread:
    """One asyncio loop on a thread that lives as long as the lab.

    ExaBGP's PR_SET_PDEATHSIG follows the thread that forked it, so the speakers' loop must
    outlive the tests that use them; a module-lifetime thread gives exactly that.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        async def _call():
            return fn(*args)
        return self.run(_call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def node_config(i: int, **overrides) -> BgpConfig:
    data = {
        "local_as": 65100 + i,
        "router_id": f"10.77.{i}.2",
        "local_address": f"10.77.{i}.2",
        "local_address_v6": f"fd77:{i}::2",
        "hold_time": HOLD,
        "peers": [{"address": f"10.77.{i}.1", "peer_as": ROUTER_AS},
                  {"address": f"fd77:{i}::1", "peer_as": ROUTER_AS}],
        "withdraw_delay": 0.5,
        "min_change_interval": 0.2,
        "flap_hold_down": 0,
    }
    data.update(overrides)
    return BgpConfig.model_validate(data)


def node_namespaces(prefix: str, router: Netns, indices: Iterable[int]) -> dict[int, Netns]:
    """A namespace per node, each on its own link to the router's namespace."""
    nodes = {}
    for i in indices:
        ns = Netns.create(f"{prefix}-n{i}")
        quiet_ipv6(ns, keep_addr_on_down=True)
        point_to_point(router, f"{prefix}r{i}", ns, f"{prefix}n{i}", f"10.77.{i}", f"fd77:{i}")
        nodes[i] = ns
    return nodes


def teardown(prefix: str, loop: LoopThread | None, speakers: Iterable, routers: Iterable,
             run_dirs: Iterable[Path]) -> None:
    """Stop the speakers (ExaBGP, and bfdd where they run it) and their loop, then the FRR
    routers; remove every namespace with the prefix and the run directories."""
    if loop is not None:
        for sp in speakers:
            try:
                loop.run(sp.stop(graceful=False), timeout=10)
            except Exception:  # noqa: BLE001 - the rest must still be cleaned up
                pass
        loop.close()
    for router in routers:
        if router is not None:
            router.stop()
    cleanup_prefix(prefix)
    for path in run_dirs:
        shutil.rmtree(path, ignore_errors=True)
