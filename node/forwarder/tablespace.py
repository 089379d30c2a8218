"""Where each VIP's Maglev tables live in the forwarder's one flat `tables` array.

Each VIP keeps ONE live table region; a rebuilt table goes to a fresh region, is published by
the VIP's slot flip (maps.h: vip_meta), and the old region is given back. So the array needs
the sum of the configured table sizes plus room for the tables being rebuilt, not two slots
per VIP (issue 12: memory grows with what is configured).

A region given back right after a flip may still be read by a packet that loaded the old slot
just before it (an XDP run lasts microseconds): it is quarantined for GRACE seconds before it
can be handed out again. When a burst of rebuilds (a backend shared by every VIP going down)
runs out of room, allocation waits for the oldest quarantined region instead of failing.

Allocation: an exact-size free list first (tables mostly share a few sizes), then the space
above the highest region, then a first-fit scan over the gaps. Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Hashable


class NoRoom(Exception):
    """No region of the requested size fits, even after every quarantine expired."""


class TableSpace:
    GRACE = 0.001  # seconds; far above the length of one XDP program run

    def __init__(self, capacity: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.capacity = capacity
        self.clock, self.sleep = clock, sleep
        self.used: dict[Hashable, tuple[int, int]] = {}
        self._free: dict[int, list[int]] = {}  # size -> offsets of free regions of that size
        self._quarantine: deque[tuple[float, int, int]] = deque()
        self._top = 0  # everything at or above is free

    def take(self, owner: Hashable, offset: int, size: int) -> None:
        """Record a region found in use (a restarted controller reading the pinned maps)."""
        self.used[owner] = (offset, size)
        self._top = max(self._top, offset + size)

    def in_use(self) -> int:
        return sum(n for _, n in self.used.values())

    def alloc(self, owner: Hashable, size: int) -> int:
        if owner in self.used:
            self.release(owner, quarantine=False)
        while True:
            self._expire()
            off = self._fit(size)
            if off is not None:
                self.used[owner] = (off, size)
                return off
            if not self._quarantine:
                raise NoRoom(f"no room for a table of {size} entries ({self.in_use()} of "
                             f"{self.capacity} entries in use)")
            self.sleep(max(0.0, self._quarantine[0][0] + self.GRACE - self.clock()))

    def release(self, owner: Hashable, *, quarantine: bool = True) -> None:
        """Give a region back; quarantine=False for a region no packet could have seen (a
        staged table that was never published)."""
        region = self.used.pop(owner, None)
        if region is None:
            return
        if quarantine:
            self._quarantine.append((self.clock(), *region))
        else:
            self._free.setdefault(region[1], []).append(region[0])

    def _expire(self) -> None:
        now = self.clock()
        while self._quarantine and now - self._quarantine[0][0] >= self.GRACE:
            _, off, size = self._quarantine.popleft()
            self._free.setdefault(size, []).append(off)

    def _fit(self, size: int) -> int | None:
        same = self._free.get(size)
        if same:
            return same.pop()
        if self._top + size <= self.capacity:
            off, self._top = self._top, self._top + size
            return off
        return self._scan(size)

    def _scan(self, size: int) -> int | None:
        """First fit over the gaps between busy regions. The free lists are folded back into
        the gaps, so no free-list entry can overlap what this hands out."""
        self._free.clear()
        busy = sorted([*self.used.values(), *((o, n) for _, o, n in self._quarantine)])
        start = 0
        for off, n in busy:
            if off - start >= size:
                return start
            start = max(start, off + n)
        self._top = start
        if self.capacity - start >= size:
            self._top = start + size
            return start
        return None
