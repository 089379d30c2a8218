"""Events for what the operator must hear about decisions: a VIP announced, de-preferred or withdrawn, a
table rebuilt (with its digest and shares). Logged on change only, and summarised when a
burst rebuilds many tables at once (one backend shared by every VIP going down)."""

from __future__ import annotations

from typing import Any

from node.reconcile import Desired, VipDecision

TABLE_EVENTS_MAX = 20  # more tables rebuilt at once: one summary event instead of one each


class DecisionLog:
    def __init__(self, events: Any) -> None:
        self.events = events
        self._vips: dict[str, tuple[str, str]] = {}
        self._tables: dict[str, str] = {}

    def tables(self, desired: Desired, names: list[str], sync_seconds: float) -> None:
        rebuilt = []
        for name in names:
            d = desired.vips[name]
            digest = d.table.digest() if d.table else ""
            if self._tables.get(name) != digest:
                self._tables[name] = digest
                rebuilt.append(name)
        if len(rebuilt) > TABLE_EVENTS_MAX:
            self.events.emit(
                "tables_rebuilt",
                f"{len(rebuilt)} VIPs got new tables in {sync_seconds * 1000:.0f} ms "
                f"(first: {', '.join(rebuilt[:5])}); `maglev vips NAME` shows one",
                count=len(rebuilt),
                sync_ms=round(sync_seconds * 1000, 1),
            )
            return
        for name in rebuilt:
            d = desired.vips[name]
            stop_gap = bool(getattr(d.table, "gone", None))
            self.events.emit(
                "table_rebuilt",
                f"VIP {name}: table {self._tables[name]} over {len(d.serving)} backend(s)"
                + (" (stop-gap while the exact table is built)" if stop_gap else ""),
                vip=name,
                digest=self._tables[name],
                shares=",".join(f"{k}={v:.1%}" for k, v in shares(d).items()) or "none",
            )

    def decisions(self, desired: Desired, touched: set[str] | None = None) -> None:
        names = desired.vips if touched is None else [n for n in touched if n in desired.vips]
        for name in names:
            d = desired.vips[name]
            now = (d.state, d.reason)
            before = self._vips.get(name)
            if before is None or before[0] != now[0]:
                verb = d.state  # announced, depreferred or withdrawn
                self.events.emit(
                    "vip_" + verb,
                    f"VIP {name} ({d.vip.prefix}) {verb}: {d.reason}",
                    level="info" if verb == "announced" else "warning",
                    vip=name,
                    reason=d.policy.code,
                )
            self._vips[name] = now
        for name in self._vips.keys() - desired.vips.keys():
            del self._vips[name]
            self._tables.pop(name, None)


def shares(d: VipDecision) -> dict[str, float]:
    """Each backend's share of the VIP's table entries (empty without a table)."""
    return d.table.shares() if d.table is not None and d.table.backends else {}
