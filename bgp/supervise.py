"""Keeping a child process running: the restart loop ExaBGP and bfdd share.

A child that dies is started again after an exponential back-off; one that keeps dying soon
after each start makes its owner unhealthy (``MAX_FAILURES`` quick deaths in a row), and one
that stays up for ``STABLE_AFTER`` seconds is forgiven its past failures.
"""

from __future__ import annotations

import asyncio
from typing import Callable

MAX_FAILURES = 5
STABLE_AFTER = 10.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


class Supervised:
    """Mixin for an owner of one child process (``self.proc``). The owner sets ``clock``,
    ``_closing``, ``_started_at`` (on every spawn), ``_failures`` and ``restarts``, and provides
    ``_spawn()``, ``_exited(rc, ran)`` (say why, reset derived state) and
    ``_spawn_failed(exc)``."""

    proc: asyncio.subprocess.Process | None
    clock: Callable[[], float]
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX

    async def _supervise(self) -> None:
        while not self._closing:
            proc = self.proc
            if proc is not None:
                rc = await proc.wait()
                if self._closing:
                    return
                ran = self.clock() - self._started_at
                self._failures = (0 if ran >= STABLE_AFTER else self._failures) + 1
                self.restarts += 1
                self._exited(rc, ran)
            await asyncio.sleep(min(self.backoff_initial * 2 ** max(self._failures - 1, 0), self.backoff_max))
            try:
                await self._spawn()
            except OSError as exc:
                self.proc = None
                self._failures += 1
                self._spawn_failed(exc)
