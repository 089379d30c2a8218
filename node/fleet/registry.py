"""The node registry: each node's record under a lease, and a monitor that compares them.

A node publishes what the fleet view needs to tell why two nodes disagree: the config revision
it applied, each VIP's table digest and announce state, and each backend's health verdict and
operator override. The record lives under a lease of ``lease_ttl`` seconds kept alive every
third of it, so a node that dies (or loses etcd for good) leaves the registry by itself.

The record is rewritten only when its content changes; keep-alives carry no data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from node.fleet import layout, view
from node.fleet.etcd import EtcdClient, EtcdError

log = logging.getLogger("maglev.fleet")

SNAPSHOT_INTERVAL = 0.2
MONITOR_INTERVAL = 1.0


def node_record(controller: Any, source: Any) -> dict[str, Any]:
    """What this node tells the fleet (no timestamps: an unchanged node writes nothing)."""
    desired = controller.desired
    vips: dict[str, Any] = {}
    for name, d in (desired.vips.items() if desired else ()):
        vips[name] = {
            "digest": d.table.digest() if d.table else None,
            "announced": bool(d.announce),
            "reason": d.reason,
            "backends": {
                b.key: {"health": b.health.value, "admin": b.admin, "serving": bool(b.serving),
                        "override": controller.overrides.get((name, b.key))}
                for b in d.backends
            },
        }
    api = controller.config.api
    return {
        "node_id": controller.config.node_id,
        "revision": source.applied_revision,
        "stale": source.stale,
        "drained": controller.node_drained,
        "api": f"http://{api.listen}:{api.port}",
        "vips": vips,
    }


class NodeRegistry:
    def __init__(self, client: EtcdClient, prefix: str, node_id: str, ttl: int,
                 record: Callable[[], dict[str, Any]], events: Any) -> None:
        self.client = client
        self.key = layout.node_key(prefix, node_id)
        self.ttl = ttl
        self.record = record
        self.events = events
        self.lease = 0
        self.published: dict[str, Any] | None = None
        self.publishes = 0
        self.registered = False

    async def run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                await self._leave()
                raise
            except EtcdError as exc:
                if self.registered:
                    self.events.emit("registry_lost", f"lost the fleet registry lease ({exc}); "
                                     "registering again when etcd answers", level="warning")
                self.registered = False
            except Exception as exc:
                self.events.emit("registry_failed", f"registry loop failed: {exc!r}; retrying", level="error")
                self.registered = False
            await asyncio.sleep(1.0)

    async def _session(self) -> None:
        self.lease = await self.client.lease_grant(self.ttl)
        self.published = None
        next_keepalive = time.monotonic() + self.ttl / 3
        while True:
            record = self.record()
            if record != self.published:
                await self.client.put(self.key, json.dumps(record, sort_keys=True), lease=self.lease)
                self.published = record
                self.publishes += 1
                if not self.registered:
                    self.registered = True
                    self.events.emit("registry_joined", f"registered in the fleet as {self.key} "
                                     f"(lease {self.lease:x}, {self.ttl} s)")
            if time.monotonic() >= next_keepalive:
                if await self.client.lease_keepalive(self.lease) <= 0:
                    raise EtcdError(f"lease {self.lease:x} expired")
                next_keepalive = time.monotonic() + self.ttl / 3
            await asyncio.sleep(SNAPSHOT_INTERVAL)

    async def _leave(self) -> None:
        """On a graceful stop the node leaves at once rather than after its lease's TTL."""
        if self.lease:
            try:
                await asyncio.wait_for(self.client.lease_revoke(self.lease), 1.0)
            except (EtcdError, asyncio.TimeoutError, asyncio.CancelledError):
                pass


async def read_records(client: EtcdClient, prefix: str) -> list[dict[str, Any]]:
    """Every node's record. A key under the nodes prefix that is not a record (written by hand
    or by another tool) is skipped: it must not break the view of the nodes that are there."""
    _, kvs = await client.get_prefix(layout.nodes_prefix(prefix))
    out = []
    for kv in kvs:
        try:
            record = json.loads(kv.value)
        except ValueError:
            continue
        if _is_record(record):
            out.append(record)
    return out


def _is_record(record: Any) -> bool:
    """The shape node_record writes, as far as the fleet view reads it."""
    if not isinstance(record, dict) or not isinstance(record.get("node_id"), str):
        return False
    vips = record.get("vips", {})
    return isinstance(vips, dict) and all(
        isinstance(v, dict) and isinstance(v.get("backends", {}), dict)
        and all(isinstance(b, dict) for b in v.get("backends", {}).values())
        for v in vips.values())


class FleetMonitor:
    """Reads every node's record each MONITOR_INTERVAL, for this node's fleet metrics: a VIP's
    mismatch is exported with how long it has lasted, and the alert rule's `for:` is the grace."""

    def __init__(self, client: EtcdClient, prefix: str, clock: Callable[[], float] = time.time,
                 events: Any = None) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self.events = events
        self.last: dict[str, Any] | None = None
        self.mismatch_since: dict[str, float] = {}

    async def run(self) -> None:
        failed = ""
        while True:
            try:
                self.observe(view.compare(await read_records(self.client, self.prefix)))
                failed = ""
            except EtcdError:
                pass  # the source reports etcd being away; the last view stays as it was
            except Exception as exc:  # noqa: BLE001 - a bug here must not restart the etcd source
                if repr(exc) != failed:  # once per distinct failure, not every second
                    failed = repr(exc)
                    log.exception("fleet monitor: comparing the node records failed")
                    if self.events is not None:
                        self.events.emit("fleet_monitor_failed", f"comparing the fleet's node records "
                                         f"failed: {exc!r}; the fleet metrics keep the last view",
                                         level="error")
            await asyncio.sleep(MONITOR_INTERVAL)

    def observe(self, fleet: dict[str, Any]) -> None:
        now = self.clock()
        self.last = fleet
        differing = set(fleet["differing"])
        for name in differing:
            self.mismatch_since.setdefault(name, now)
        for name in list(self.mismatch_since):
            if name not in differing:
                del self.mismatch_since[name]

    def metrics(self) -> list[tuple[str, str, str, list]]:
        fleet = self.last or {"nodes": [], "vips": {}}
        now = self.clock()
        return [
            ("maglev_fleet_nodes", "gauge", "Live nodes in the fleet registry", [({}, len(fleet["nodes"]))]),
            ("maglev_fleet_vip_digest_mismatch", "gauge",
             "1 while the VIP's table digest differs between live nodes (see `maglev fleet status`)",
             [({"vip": n}, int(n in self.mismatch_since)) for n in sorted(fleet["vips"])]),
            ("maglev_fleet_vip_digest_mismatch_seconds", "gauge",
             "How long the VIP's digests have differed, as seen by this node",
             [({"vip": n}, round(now - t, 1)) for n, t in sorted(self.mismatch_since.items())]),
        ]
