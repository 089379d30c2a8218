"""What the controller hands the forwarder, worked out per VIP so a reconcile costs what changed.

- ``SpecCache``: each VIP's forwarder spec, rebuilt only when that VIP's decision changed
  (its identity, its backends' addresses and data states, or its table's digest). The table
  travels as the builder's compact array of backend indexes, never one object per entry.
- ``SelfTestSample``: the VIPs a self-test covers: those just programmed plus a rotating slice
  of the rest, so every VIP is checked every few rounds without checking all of them each time.

Pure bookkeeping: no I/O, no clock.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from node.reconcile import Desired, VipDecision


def apply_key(d: VipDecision) -> tuple:
    """Everything about a VIP the forwarder's maps hold: its config (the same object until a
    reload changes it; tuple comparison checks identity first), its backends' data states and
    its table's digest."""
    return (d.vip, tuple(b.data_state for b in d.backends), d.table.digest() if d.table else "")


class SpecCache:
    def __init__(self, build: Callable[..., Any]) -> None:
        self.build = build
        # A builder that takes ``previous`` (the VIP's last decision and spec) reuses what did
        # not change (effects.forwarder_spec); a plain one is called with the decision only.
        self._incremental = "previous" in inspect.signature(build).parameters
        self._decided: dict[str, VipDecision] = {}  # vip -> the decision its cached spec is of
        self.applied: dict[str, tuple] = {}  # vip -> apply_key last programmed
        self._applied_specs: dict[str, Any] = {}  # vip -> the spec last programmed
        self._specs: dict[str, tuple[tuple, Any]] = {}
        self._full = True  # look at every VIP next time
        # VIPs whose tables the forwarder changed outside a sync (node.stop_gaps): programmed
        # at the next look whatever was programmed last, which the maps no longer hold.
        self._outside: set[str] = set()

    def changes(self, desired: Desired, names: set[str] | None = None) -> tuple[list[Any], list[str], list[str]]:
        """(every VIP's spec, names whose spec differs from the last programmed, names removed).
        ``names``: only these VIPs were decided again (the others kept their decision object,
        so their spec cannot have changed); None: look at every VIP."""
        if names is None or self._full:
            names = set(desired.vips)
            self._full = False
        force, self._outside = self._outside, set()
        changed = []
        for name in sorted(names | force):
            d = desired.vips.get(name)
            if d is None:
                continue
            key = apply_key(d)
            cached = self._specs.get(name)
            if cached is None or cached[0] != key:
                prior = (self._decided[name], cached[1]) if cached is not None and name in self._decided else None
                spec = self.build(d, previous=prior) if self._incremental else self.build(d)
                self._specs[name] = (key, spec)
            self._decided[name] = d
            if name in force or self.applied.get(name) != key:
                if name not in force and self._applied_specs.get(name) == self._specs[name][1]:
                    # Only what the maps do not hold changed (a health check, say): the
                    # forwarder already has exactly this; nothing to program.
                    self.applied[name] = key
                else:
                    changed.append(name)
        for name in self._specs.keys() - desired.vips.keys():
            del self._specs[name]
            self._decided.pop(name, None)
        removed = sorted(self.applied.keys() - desired.vips.keys())
        specs = [self._specs[n][1] for n in desired.vips]
        return specs, changed, removed

    def programmed(self, desired: Desired, names: list[str], removed: list[str]) -> None:
        for name in names:
            self.applied[name], self._applied_specs[name] = self._specs[name]
        for name in removed:
            self.applied.pop(name, None)
            self._applied_specs.pop(name, None)

    def outside(self, names) -> None:
        """The forwarder changed these VIPs' tables outside a sync (a stop-gap patched at once,
        node.stop_gaps): program them at the next look, even if their decision comes back to
        what was programmed last (a backend up again before the reconcile)."""
        self._outside.update(names)

    def forget(self) -> None:
        """The forwarder's state is unknown (a failed sync): program every VIP next time."""
        self.applied.clear()
        self._applied_specs.clear()
        self._full = True


class SelfTestSample:
    """A rotating window over the VIP names (sorted, so the rotation is stable)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cursor = 0

    def next(self, names: list[str], must: list[str] | None = None) -> list[str]:
        """``must`` plus the next ``size`` names of the rotation (all of them when few)."""
        names = sorted(names)
        if len(names) <= self.size:
            return names
        start = self._cursor % len(names)
        window = (names + names)[start:start + self.size]
        self._cursor = start + self.size
        return sorted(set(window) | set(must or ()))
