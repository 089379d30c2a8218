"""The node's maintenance switch: a file whose existence de-prefers (or withdraws) every VIP.

An operator flips it with ``touch``/``rm`` (or a config-management tool) without the API, the
way ExaBGP healthcheck's ``--disable`` works. It is polled, not watched with inotify: the
run directory may be a tmpfs, a bind mount or recreated, and one ``stat`` a second is nothing.

A path that cannot be examined (permission denied, a parent that is not a directory) counts as
*absent*: the switch is an operator's request, and a broken path must not take VIPs out of
service on its own; the error is kept for status and logged once.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class SwitchState:
    active: bool
    since: float | None  # wall-clock time the file appeared (its mtime), None when absent
    error: str | None = None


class DisableSwitch:
    def __init__(self, path: Path, action: Literal["deprefer", "withdraw"]) -> None:
        self.path = Path(path)
        self.action = action
        self.state = SwitchState(False, None)

    def read(self) -> SwitchState:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return SwitchState(False, None)
        except OSError as exc:
            return SwitchState(False, None, f"cannot examine {self.path}: {exc.strerror or exc}; "
                               "treated as absent (VIPs stay as the pool decides)")
        return SwitchState(True, st.st_mtime)

    def poll(self) -> bool:
        """Read the file's state; True when it changed since the last poll."""
        new = self.read()
        changed = (new.active, new.error) != (self.state.active, self.state.error)
        self.state = new
        return changed

    async def watch(self, events: Any, on_change: Callable[[], None]) -> None:
        """Poll forever (a supervised task of the controller); a change is an event and
        re-decides every VIP."""
        while True:
            if self.poll():
                self._report(events)
                on_change()
            await asyncio.sleep(POLL_INTERVAL)

    def _report(self, events: Any) -> None:
        st = self.state
        if st.error:
            events.emit("disable_file_error", st.error, level="error")
        elif st.active:
            what = "de-preferred" if self.action == "deprefer" else "withdrawn"
            events.emit("node_disabled", f"disable file {self.path} present: every VIP {what}; "
                        "remove it to announce again", level="warning", path=str(self.path))
        else:
            events.emit("node_enabled", f"disable file {self.path} gone: VIPs announced as their "
                        "pools allow", path=str(self.path))

    def status(self) -> dict:
        s = self.state
        return {
            "active": s.active,
            "path": str(self.path),
            "action": self.action,
            "since": s.since,
            "age": round(time.time() - s.since, 1) if s.since is not None else None,
            "error": s.error,
        }
