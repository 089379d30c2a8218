"""Read-only HTTP routes for operators: ``/metrics``, the status page at ``/`` and its assets,
the event timeline and the conntrack listing.

``register(app, controller)`` adds them to the node's API app. None of them writes anything,
so the token middleware lets them through like every GET. Work that grows with the pool
(reading the forwarder's maps, rendering the exposition) runs in worker threads; only taking
a snapshot of the controller runs on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from node import metrics, status_page
from node.api_server import GUARD

API = "/api/v1"
CONNTRACK_LIMIT_MAX = 100_000


class Observer:
    def __init__(self, controller: Any) -> None:
        self.c = controller
        self.conntrack = metrics.ConntrackCounter()
        self._sample: tuple[float, list[dict[str, Any]]] | None = None
        self._rates: dict[str, Any] = {}

    async def counters(self) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(self.c.forwarder.counters)
        except Exception as exc:  # best effort: the rest of the view still helps
            self.c.events.emit("counters_failed", f"reading forwarder counters failed: {exc}", level="warning")
            return {}

    def page_rates(self, vips: list[dict[str, Any]]) -> dict[str, Any]:
        """Rates for the page since the previous view at least a second old (every viewer
        shares the samples; the rate is right whoever asked last)."""
        now = time.monotonic()
        if self._sample is None:
            self._sample = (now, vips)
        elif now - self._sample[0] >= 1.0:
            self._rates = metrics.counter_rates(self._sample[1], vips, now - self._sample[0])
            self._sample = (now, vips)
        return self._rates

    async def snapshot(self) -> metrics.Snapshot:
        counters = await self.counters()
        fill = await asyncio.to_thread(self.conntrack.read, self.c.forwarder)
        return metrics.snapshot(self.c, counters, fill)


OBSERVER = web.AppKey("observer", Observer)


def register(app: web.Application, controller: Any) -> None:
    app[OBSERVER] = Observer(controller)
    app.add_routes([
        web.get("/metrics", get_metrics),
        web.get("/", get_page),
        web.get("/status.css", get_asset),
        web.get(f"{API}/events", get_events),
        web.get(f"{API}/conntrack", get_conntrack),
        web.get(f"{API}/page", get_page_data),
    ])


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def get_metrics(request: web.Request) -> web.Response:
    obs = request.app[OBSERVER]
    snap = await obs.snapshot()
    guard = request.app.get(GUARD)
    if guard is not None:
        st = guard.stats
        snap.api = {"open": st.open, "limit": guard.max_connections, "at_limit": st.at_limit,
                    "accept_errors": st.accept_errors, "timed_out": st.timed_out}
    body, headers = await asyncio.to_thread(
        metrics.exposition, snap, obs.c.metrics, request.headers.get("Accept", ""),
        request.headers.get("Accept-Encoding", ""), request.query.getall("name[]", []))
    return web.Response(body=body, headers=headers)


async def get_page(request: web.Request) -> web.Response:
    """The status page, rendered on the server: it reads without JavaScript (a small script
    only refreshes it in place)."""
    obs = request.app[OBSERVER]
    try:
        refresh = int(request.query.get("refresh", status_page.DEFAULT_REFRESH))
    except ValueError:
        return _error(400, f"refresh={request.query['refresh']!r} is not a whole number of seconds")
    data = await page_data(obs)
    rates = obs.page_rates(data["vips"])
    html = await asyncio.to_thread(status_page.render, data, max(0, refresh), rates)
    return web.Response(text=html, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


async def get_asset(request: web.Request) -> web.Response:
    name = request.path.lstrip("/")
    text, kind = status_page.asset(name)
    return web.Response(text=text, content_type=kind, charset="utf-8",
                        headers={"Cache-Control": "max-age=60", "X-Content-Type-Options": "nosniff"})


async def page_data(obs: Observer) -> dict[str, Any]:
    c = obs.c
    counters = await obs.counters()
    fill = await asyncio.to_thread(obs.conntrack.read, c.forwarder)
    status = c.status()
    status["recent_events"] = list(c.events.recent)[-status_page.EVENTS_SHOWN:]
    return {
        "status": status,
        "vips": [c.vip_view(n, counters) for n in sorted(c.vips)],
        "conntrack": {"entries": fill[0], "capacity": fill[1]} if fill else None,
        "conntrack_design": str(getattr(c.config.forwarder, "conntrack", "")),
    }


async def get_page_data(request: web.Request) -> web.Response:
    """What the page shows, as JSON (``maglev top`` reads this too: one request per refresh)."""
    data = await page_data(request.app[OBSERVER])
    for v in data["vips"]:
        v.pop("config", None)
    return web.json_response(data, dumps=_dumps)


async def get_events(request: web.Request) -> web.Response:
    """The event timeline; ``?since=TS`` returns the events from TS on (inclusive: two events
    can share a millisecond; ``maglev events --follow`` skips those it printed)."""
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        return _error(400, f"since={request.query['since']!r} is not a UNIX timestamp")
    events = [e for e in list(request.app[OBSERVER].c.events.recent) if e["ts"] >= since]
    return web.json_response({"events": events}, dumps=_dumps)


async def get_conntrack(request: web.Request) -> web.Response:
    obs = request.app[OBSERVER]
    vip = request.query.get("vip") or None
    if vip is not None and vip not in obs.c.vips:
        return _error(404, f"no VIP named {vip!r} (known: {', '.join(sorted(obs.c.vips)) or 'none'})")
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        return _error(400, f"limit={request.query['limit']!r} is not a whole number")
    if not 1 <= limit <= CONNTRACK_LIMIT_MAX:
        return _error(400, f"limit must be between 1 and {CONNTRACK_LIMIT_MAX}, got {limit}")
    try:
        flows = await asyncio.to_thread(obs.c.forwarder.conntrack_flows, vip, limit)
    except Exception as exc:
        return _error(503, f"cannot read the conntrack map: {exc}")
    return web.json_response({"design": str(getattr(obs.c.config.forwarder, "conntrack", "")),
                              "capacity": getattr(obs.c.forwarder, "ct_entries", None),
                              "flows": flows, "limit": limit}, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)
