"""Reads and validates the VIP set (the directory, or an etcd revision) off the event loop,
within a time budget.

A 20 MB file or 50,000 backends used to be parsed on the event loop, freezing the API, the
health checks and the self-tests for tens of seconds while ExaBGP kept announcing. Here the
whole read (files, YAML, validation, node checks: ``node.config.load_node_vips``) runs in one
worker thread. The parser validates one VIP at a time and checks a ``Deadline``, so the loop
keeps being scheduled beside it and a read that runs out of budget stops itself with a
ConfigError; the reload is then refused and the last good config keeps serving.

Files whose bytes did not change since the last read are not parsed or validated again
(``node.config.ParsedFiles``): a reload that changes one backend costs that file, plus the
checks over the whole set, not a thousand VIPs' worth of YAML and pydantic.

One read at a time: a reload that arrives while a read is running waits for it (``reload``
holds a lock); if a read is still running past its budget, the next one is refused instead of
piling threads up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
from pathlib import Path
from typing import Any, Callable

from node.config import ConfigError, ConfigProblem, Deadline, NodeConfig, ParsedFiles, VipConfig, load_node_vips

Sources = dict[str, tuple[Path, VipConfig]]

READ_BUDGET = 60.0  # seconds; a fleet-scale directory (4096 VIPs, 65536 backends) takes 5-15 here


def _paused_gc(load: Callable[..., Sources], *args: Any) -> Sources:
    """``load`` with the cyclic collector paused: a big read allocates millions of
    objects, and the collector's full passes over them hold the interpreter lock, which
    stalled the event loop for up to 1.4 s (bench/config_reload.py). Reference counting still
    frees everything the read drops; the collector runs again as soon as the read ends."""
    paused = gc.isenabled()
    if paused:
        gc.disable()
    try:
        return load(*args)
    finally:
        if paused:
            gc.enable()


def _load_dir(vip_dir: Path, node: NodeConfig, files: ParsedFiles, deadline: Deadline,
              capacity: int | None = None) -> Sources:
    return load_node_vips(vip_dir, node, deadline, capacity, files)


class VipReader:
    def __init__(self, budget: float = READ_BUDGET) -> None:
        self.budget = budget
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="maglev-config")
        self._running: concurrent.futures.Future | None = None
        # What each file parsed to: a reload parses again only the files whose bytes changed.
        # Touched by the one worker thread only (one read at a time).
        self.files = ParsedFiles()

    async def read(self, vip_dir: Path, node: NodeConfig,
                   capacity: int | None = None) -> dict[str, tuple[Path, VipConfig]]:
        """The VIP directory, validated exactly as a reload needs it; ConfigError otherwise."""
        return await self.run(str(vip_dir), "the VIP directory", "split or shrink the files",
                              _load_dir, vip_dir, node, self.files, capacity=capacity)

    async def run(self, where: str, what: str, hint: str, load: Callable[..., Sources],
                  *args: Any, capacity: int | None = None) -> Sources:
        """``load(*args, deadline, capacity)`` in the worker thread, within the budget: any VIP
        source (the directory, an etcd revision) is parsed off the event loop the same way."""
        if self._running is not None and not self._running.done():
            raise ConfigError([ConfigProblem(
                where, None, None,
                f"the previous read of {what} is still running past its budget of "
                f"{self.budget:g} s; nothing was applied ({hint})")])
        deadline = Deadline(self.budget)
        future = self._pool.submit(_paused_gc, load, *args, deadline, capacity)
        self._running = future
        try:
            # The grace covers the worker's last step after the deadline passed (one VIP).
            return await asyncio.wait_for(asyncio.wrap_future(future), self.budget + 5.0)
        except TimeoutError:
            raise ConfigError([ConfigProblem(
                where, None, None,
                f"reading and validating {what} took longer than the budget of {self.budget:g} s; "
                f"nothing was applied ({hint})")]) from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
