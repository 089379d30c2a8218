"""How the controller reads backend health: one verdict per distinct health-check target,
looked up per (VIP, backend key).

Many VIPs share backends, and the monitor probes each distinct target once; this module is the
mapping between the two views, kept apart from the controller so the decision function and
the reload's hand-over can use it without knowing the controller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node.config import VipConfig
from node.reconcile import Health


class HealthView(Mapping):
    """(vip, backend key) -> Health, read through the targets: static pools are UP, a target
    without a verdict yet is UNKNOWN."""

    def __init__(self, verdict: dict, targets: dict, static: set | list) -> None:
        self.verdicts, self._targets, self._static = verdict, targets, static

    def __getitem__(self, pair: tuple[str, str]) -> Health:
        target = self._targets.get(pair)
        if target is None:
            if pair in self._static:
                return Health.UP
            raise KeyError(pair)
        return self.verdicts.get(target, Health.UNKNOWN)

    def __iter__(self):
        yield from self._targets
        yield from self._static

    def __len__(self) -> int:
        return len(self._targets) + len(self._static)


def health_of(state: Any) -> Health:
    """The monitor's state (an enum or its name) as the decision's Health."""
    name = getattr(state, "name", str(state)).upper()
    return {"UP": Health.UP, "DOWN": Health.DOWN}.get(name, Health.UNKNOWN)


def health_targets(vips: dict[str, VipConfig]) -> dict[tuple[str, str], Any]:
    """(vip, backend key) -> health Target. Identical targets of several VIPs compare equal, so
    the monitor probes each once."""
    from healthcheck import Target

    out = {}
    for vip in vips.values():
        if vip.health_check is None:
            continue
        for b in vip.backends:
            out[(vip.name, b.key)] = Target(b.address, vip.backend_port(b), vip.health_check)
    return out


def owners_of(targets: dict[tuple[str, str], Any]) -> dict[Any, list[tuple[str, str]]]:
    """target -> every (vip, backend key) probed through it: a transition marks them all."""
    owners: dict[Any, list[tuple[str, str]]] = {}
    for pair, target in targets.items():
        owners.setdefault(target, []).append(pair)
    return owners
