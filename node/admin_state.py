"""The operator's overrides, persisted: backend admin states and the node drain.

They survive a controller restart (a drained backend stays drained), so they live in the
state directory, written atomically. An unreadable file is reported and ignored rather than
fatal: the config's own states are a safe default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.files import atomic_write
from node.reconcile import AdminState

STATES = ("active", "drain", "disabled")


class AdminStore:
    def __init__(self, path: Path, events: Any) -> None:
        self.path = path
        self.events = events
        self.node_drained = False
        self.overrides: dict[tuple[str, str], AdminState] = {}

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self.events.emit("state_unreadable", f"ignoring unreadable {self.path}: {exc}", level="warning")
            return
        overrides = data.get("overrides", {}) if isinstance(data, dict) else None
        if not isinstance(overrides, dict) or not all(isinstance(b, dict) for b in overrides.values()):
            # Valid JSON of another shape (edited by hand, another tool's file) is unreadable too.
            self.events.emit("state_unreadable", f"ignoring {self.path}: not a node state file "
                             '(expected {"node_drained": ..., "overrides": {VIP: {BACKEND: STATE}}})',
                             level="warning")
            return
        self.node_drained = data.get("node_drained", False) is True
        for vip, backends in overrides.items():
            for key, state in backends.items():
                if state in STATES:
                    self.overrides[(vip, key)] = state

    def save(self) -> None:
        overrides: dict[str, dict[str, str]] = {}
        for (vip, key), state in sorted(self.overrides.items()):
            overrides.setdefault(vip, {})[key] = state
        atomic_write(self.path, json.dumps({"node_drained": self.node_drained, "overrides": overrides}, indent=2))

    def forget_missing(self, keys: set[tuple[str, str]]) -> None:
        """Drop overrides of backends no longer configured (saved only when one went)."""
        dropped = [k for k in self.overrides if k not in keys]
        for k in dropped:
            del self.overrides[k]
        if dropped:
            self.save()
