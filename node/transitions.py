"""What the operator reads when a health check flips: the events of one transition.

One backend address is often shared by many VIPs (a fleet's pool). A transition of a backend
that a handful of VIPs share gets one event per VIP, naming it; one shared by more gets ONE
event naming the backend, how many VIPs have it and the first few of them: a thousand
near-identical lines said nothing more, and formatting them cost the event loop about a
quarter of a second before the affected tables could be rebuilt (issue 12). `maglev vips NAME`
and the per-(VIP, backend) transition counters still show every VIP.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Any, NamedTuple

PER_VIP_EVENTS_MAX = 20  # owners of one backend above this: one summary event
NAMED_IN_SUMMARY = 5


class Event(NamedTuple):
    name: str
    message: str
    level: str
    fields: dict[str, Any]


def transition_events(owners: list[tuple[str, str]], health: str, reason: str,
                      dampened: bool = False) -> list[Event]:
    """The events of one target's transition to ``health`` ("up", "down", "unknown"), for
    its owners, the (VIP, backend key) pairs that probe it."""
    level = "warning" if health == "down" else "info"
    note = " (held down: flapping)" if dampened else ""
    by_key: dict[str, list[str]] = {}
    for vip, key in owners:
        by_key.setdefault(key, []).append(vip)
    out = []
    for key, vips in by_key.items():
        if len(vips) <= PER_VIP_EVENTS_MAX:
            out += [Event("backend_" + health, f"backend {key} of VIP {vip} is {health.upper()}: {reason}{note}",
                          level, {"vip": vip, "backend": key, "reason": reason}) for vip in vips]
            continue
        named = sorted(vips)[:NAMED_IN_SUMMARY]
        out.append(Event(
            "backend_" + health,
            f"backend {key} is {health.upper()} in {len(vips)} VIPs ({', '.join(named)} and "
            f"{len(vips) - len(named)} more): {reason}{note}; `maglev vips NAME` shows one",
            level, {"backend": key, "vips": len(vips), "reason": reason}))
    return out
