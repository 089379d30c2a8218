"""Backends that stop serving leave the live tables at once, before the reconcile (issue 12).

A backend shared by a thousand VIPs going down used to wait for the whole reconcile before
its tables stopped sending it new flows: decide the thousand VIPs, build their specs, sync
them one by one (~0.4 s at 1000 VIPs on two busy CPUs). Yet what every one of those tables
becomes first is already known: the stop-gap (maglev.StopGapTable), the live table with the
lost backend's entries handed to the next entry that remains, a pure function of that table,
so every node computes the same one. Here it is applied as soon as the loss is heard of, in
two steps. First the data path: the lost backends are set to drain (``stop_serving``), and the
data path reads a table entry naming a draining backend as the stop-gap does (the next entry
whose backend is active), so one store per (VIP, backend) takes the backend out of every
table at once: at a thousand VIPs, a few milliseconds where rewriting the tables takes a
hundred. Then the tables themselves: the forwarder patches every affected live table in one
call (``drop_from_tables``). Then the reconcile runs as always (decide, sync, self-test before
anything is announced anew, the exact tables built behind), and finds those tables patched.

Only losses take this path: a backend whose health went DOWN, or that an operator drained
or disabled. Whatever the decision then says, such a backend gets no new flows, so nothing
here can put a backend in service that the decision would keep out, nor take a VIP out of
service (a table whose last backend leaves is left for the reconcile, which withdraws it).
Existing flows are left to the sync: drain keeps them, and the decision's state (down moves
them) is written by the next sync.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

SETTLE_WAIT = 1.0  # seconds a reconcile waits for a batch in flight (a stuck one: it goes on)


class StopGaps:
    """Collects the (VIP, backend key) pairs that stopped serving and has the forwarder patch
    them out of the live tables, a batch at a time, in a worker thread (``run``, supervised
    by the controller). ``on_patched(names)`` is called on the event loop with the VIPs whose
    tables changed, or might have (a failed patch), so the next sync programs them."""

    def __init__(self, forwarder: Any, events: Any, on_patched: Callable[[set[str]], None]) -> None:
        # A forwarder without the in-place patch (a test's fake): the reconcile does it all.
        self._patch = getattr(forwarder, "drop_from_tables", None)
        self._stop = getattr(forwarder, "stop_serving", None)
        self.events = events
        self.on_patched = on_patched
        self._pending: dict[str, set[str]] = {}
        self._since: float | None = None  # when the oldest pending loss was heard of
        self._wanted = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.tables_patched = 0  # tables patched so far (the tests read it)
        self.serving_stopped = 0  # VIPs whose lost backends were set to drain so far (likewise)

    def lost(self, pairs: Iterable[tuple[str, str]]) -> None:
        """These backends stopped serving these VIPs (called on the event loop; cheap)."""
        if self._patch is None:
            return
        for vip, key in pairs:
            self._pending.setdefault(vip, set()).add(key)
        if self._pending:
            if self._since is None:
                self._since = time.perf_counter()
            self._idle.clear()
            self._wanted.set()

    async def settled(self) -> None:
        """Wait for the batch in flight (bounded): the reconcile that follows a loss waits for
        its stop-gaps rather than compete with them for two CPUs and the interpreter lock
        (its sync would wait for the forwarder's lock anyway)."""
        if not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), SETTLE_WAIT)
            except TimeoutError:
                pass

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            todo, self._pending = self._pending, {}
            since, self._since = self._since, None
            try:
                if todo:
                    await self._apply(self._patch, todo, since)
            finally:
                if not self._pending:
                    self._idle.set()

    async def _apply(self, patch: Callable[[dict], list[str]], todo: dict[str, set[str]],
                     since: float | None) -> None:
        started = time.perf_counter()
        since = since or started
        stopped_at, stopped = None, set()
        try:
            if self._stop is not None:
                stopped = set(await asyncio.to_thread(self._stop, todo))
                stopped_at = time.perf_counter()
                self.serving_stopped += len(stopped)
            patched = set(await asyncio.to_thread(patch, todo))
        except Exception as exc:  # the reconcile that follows programs these VIPs afresh
            self.events.emit("stop_gap_failed", f"taking lost backends out of {len(todo)} VIP table(s) "
                             f"failed: {exc!r}; the reconcile programs them instead", level="error")
            self.on_patched(set(todo))
            return
        self.tables_patched += len(patched)
        # a VIP whose backend states or table changed is programmed again at the next sync,
        # whatever its decision then (a backend back up before it gets its state back)
        done = stopped | patched
        if not done:
            return
        now = time.perf_counter()
        keys = sorted({k for vip in done for k in todo[vip]})

        def ms(t: float) -> float:  # since the oldest loss of the batch was heard of
            return round((t - since) * 1000, 1)

        serving = "" if not stopped else f"out of service in {len(stopped)} VIP(s)' data path in {ms(stopped_at):.0f} ms, "
        self.events.emit(
            "tables_stop_gapped",
            f"backend(s) {', '.join(keys[:5])}{' and more' if len(keys) > 5 else ''}: {serving}out of "
            f"{len(patched)} live table(s) in {ms(now):.0f} ms (patch {(now - (stopped_at or started)) * 1000:.0f} ms); "
            "the exact tables follow", tables=len(patched), ms=ms(now),
            serving_ms=None if stopped_at is None else ms(stopped_at),
            patch_ms=round((now - (stopped_at or started)) * 1000, 1))
        self.on_patched(done)
