"""Keeps the node's background tasks running.

Every long-lived task of the controller (the reconcile loop, the self-test loop, the VIP
directory watcher...) runs under ``Supervisor.spawn``. A task that raises, or returns although
it should run until the node stops, is reported (an error event naming the task and why, and
``maglev_task_restarts_total{task=...}``) and started again after a back-off that doubles up to
``backoff_max`` and resets once the task has run for a while. Before this, an exception in the
watcher ended it silently: every later config change was ignored while status looked fine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("maglev.supervisor")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
STABLE_AFTER = 60.0  # a task that ran this long before failing starts again at the initial back-off


@dataclass
class TaskInfo:
    name: str
    once: bool
    restarts: int = 0
    running: bool = False
    last_error: str | None = None


class Supervisor:
    def __init__(self, events: Any, *, backoff_initial: float = BACKOFF_INITIAL,
                 backoff_max: float = BACKOFF_MAX, clock: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.clock = clock
        self.tasks: dict[str, TaskInfo] = {}
        self._handles: list[asyncio.Task[None]] = []

    def spawn(self, name: str, run: Callable[[], Awaitable[None]], *, once: bool = False) -> None:
        """Run ``run()`` as task ``name``, restarted whenever it raises; also when it returns,
        unless ``once`` (a task whose job ends, like the warm-up timer)."""
        info = self.tasks.setdefault(name, TaskInfo(name, once))
        self._handles.append(asyncio.create_task(self._guard(info, run), name=name))

    async def stop(self) -> None:
        for task in self._handles:
            task.cancel()
        await asyncio.gather(*self._handles, return_exceptions=True)
        self._handles.clear()

    def restarts(self) -> dict[str, int]:
        return {name: info.restarts for name, info in sorted(self.tasks.items())}

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: {"running": info.running, "restarts": info.restarts, "last_error": info.last_error}
                for name, info in sorted(self.tasks.items())}

    async def _guard(self, info: TaskInfo, run: Callable[[], Awaitable[None]]) -> None:
        delay = self.backoff_initial
        while True:
            started = self.clock()
            info.running = True
            try:
                await run()
                if info.once:
                    return
                why = "returned, but it should run until the node stops"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("task %s crashed", info.name, exc_info=exc)
                why = f"crashed: {exc!r}"
            finally:
                info.running = False
            if self.clock() - started >= STABLE_AFTER:
                delay = self.backoff_initial
            info.restarts += 1
            info.last_error = why
            self.events.emit(
                "task_restarted",
                f"background task {info.name} {why}; restarting it in {delay:g} s "
                f"(restart {info.restarts}); if this repeats, report it with the log above",
                level="error", task=info.name,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
