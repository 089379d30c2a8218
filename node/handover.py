"""Health verdicts across a reload: what each newly probed target takes over.

A backend that a reload keeps (same VIP, same backend key) keeps its verdict whatever changed
about its check: a new interval, path, port or rise makes a new health target, and before this
each new target started UNKNOWN, so one edit withdrew the VIP on every node at once. Now the
new target takes over the old target's verdict (or the implicit UP of a backend that had no
check) and its own rise/fall runs confirm or overturn it. Only a backend the old config did
not have starts UNKNOWN.

Several VIPs may share one target (same address, port and check); when their old verdicts
disagree, the new shared target starts from the most cautious one that exists: DOWN, then UP,
then UNKNOWN. Pure, so the rule is tested on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from healthcheck import State
from node.reconcile import Health

Key = tuple[str, str]  # (VIP name, backend key)

_CAUTION = {State.DOWN: 0, State.UP: 1, State.UNKNOWN: 2}
_STATE_OF = {Health.UP: State.UP, Health.DOWN: State.DOWN, Health.UNKNOWN: State.UNKNOWN}


def handover(
    old_targets: Mapping[Key, Any],
    old_health: Mapping[Key, Health],
    new_targets: Mapping[Key, Any],
    probed: Mapping[Any, Any],
) -> dict[Any, Any]:
    """new target -> the probed target it takes over, or a bare State (the backend had no
    check). ``probed`` is the monitor's snapshot (target -> status with a ``state``). Targets
    probed already keep their own verdict and are left out."""
    candidates: dict[Any, list[tuple[int, Key, Any]]] = {}
    for key, target in sorted(new_targets.items(), key=lambda kv: kv[0]):
        if target in probed:
            continue
        old = old_targets.get(key)
        if old is not None and old in probed:
            state, source = probed[old].state, old
        elif old is None and key in old_health:
            state = _STATE_OF[old_health[key]]
            source = state
        else:
            continue  # a new backend: UNKNOWN until its own probes decide
        candidates.setdefault(target, []).append((_CAUTION.get(state, 2), key, source))
    return {target: min(found, key=lambda c: (c[0], c[1]))[2] for target, found in candidates.items()}
