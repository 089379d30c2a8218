"""The etcd config source: a node's VIP set, one etcd revision at a time.

Each revision becomes one ``controller.reload(...)``: the reload takes the candidate set from
``candidate()`` (through node.vip_source.read_vips) exactly as it reads a directory, so a
revision goes through the same validation (object checks, duplicates, this node's limits) and is
applied whole: all of it, or none of it and the last good set kept.

etcd is kept out of the data path's failure domain:
- the last applied set is persisted (``cache_file``) and served at start when etcd is away;
- losing etcd only marks the source stale (status, metric, event); nothing is withdrawn;
- on return the source re-reads the whole prefix (which also covers a compacted history) and
  watches again from there.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable

from node.files import atomic_write
from node.fleet import layout
from node.fleet.etcd import EtcdClient, EtcdCompacted, EtcdError

HEARTBEAT_INTERVAL = 0.5
# etcd electing a new leader (a member died) fails reads for about an election timeout: that is
# not "lost etcd". Stale is declared once no member has answered for this long.
STALE_AFTER = 2.0
BACKOFF_START, BACKOFF_MAX = 0.2, 5.0


class EtcdSource:
    kind = "etcd"

    def __init__(self, client: EtcdClient, prefix: str, cache_file: Path, events: Any,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.cache_file = cache_file
        self.events = events
        self.clock = clock
        self.label = f"etcd {layout.vips_prefix(prefix)}"
        self.objects: dict[str, bytes] = {}
        self.candidate_revision = 0
        self.applied_revision = 0
        self.applied_objects: dict[str, bytes] = {}
        self.rejected: dict[str, Any] | None = None
        self.stale = True
        self.stale_since: float | None = self.clock()
        self.stale_reason = "not read from etcd yet"
        self.stale_events = 0
        self.full_reads = 0
        self.last_contact = 0.0
        self.last_read: tuple[int, dict[str, bytes]] | None = None
        self.cached: tuple[int, dict[str, bytes]] | None = None  # the persisted last good set
        self.following = False  # run() has taken over from the set the controller started on
        self.from_cache = self._load_cache()
        self.on_cache = self.from_cache  # serving the persisted set, not one read from etcd
        if self.from_cache:  # what the controller serves at start (or it does not start)
            self.applied_revision = self.candidate_revision
            self.applied_objects = dict(self.objects)

    # ------------------------------------------------------------------ the controller's side

    def candidate(self) -> tuple[int, dict[str, bytes]]:
        """The revision to apply and a copy of its objects, for node.vip_source.read_vips: the
        controller parses and validates them in its reader's thread and installs the set, or
        keeps the last good one. The copy read last is what an install that succeeds applied."""
        self.last_read = (self.candidate_revision, dict(self.objects))
        return self.last_read

    async def prime(self) -> None:
        """One read before the controller starts, so a node that can reach etcd starts with the
        current set (its warm-up then covers those VIPs); otherwise it starts on its cache."""
        try:
            kvs = (await self.client.get_prefix(layout.config_prefix(self.prefix)))[1]
        except EtcdError as exc:
            what = f"its cached revision {self.candidate_revision}" if self.from_cache else "no VIPs"
            self.events.emit("config_source_stale", f"etcd unreachable at start ({exc}); starting with "
                             f"{what}, following etcd once it answers", level="warning")
            self.stale_reason = str(exc)
            return
        self.objects = {kv.key: kv.value for kv in kvs}
        self.candidate_revision = layout.config_revision(kvs)
        self.full_reads += 1
        self._go_fresh()

    def fall_back(self, problems: list[str]) -> bool:
        """The set read from etcd at start is refused by this node: start on the persisted last
        good set instead (False when there is none: the node cannot start). The refused revision
        stays reported until etcd holds one this node accepts."""
        if self.cached is None:
            return False
        refused = self.candidate_revision
        self.rejected = {"revision": refused, "problems": problems}
        self.candidate_revision, self.objects = self.cached[0], dict(self.cached[1])
        self.on_cache = True
        self.events.emit("config_rejected", f"etcd revision {refused} is refused by this node ("
                         + "; ".join(problems) + f"); starting on the last good revision {self.cached[0]} "
                         f"from {self.cache_file}: fix the objects with `maglev fleet apply`",
                         level="error", revision=refused)
        return True

    async def run(self, controller: Any) -> None:
        """Follow etcd forever (the controller supervises this task): read, watch, and on any
        failure go stale, back off and read again."""
        if not self.following:  # the first run: the controller started on what it read last
            self.following = True
            if self.last_read is not None:
                rejected = self.rejected  # a revision refused at start stays reported
                self._applied(*self.last_read)
                self.rejected = rejected
        backoff = BACKOFF_START
        while True:
            try:
                await self._follow(controller)
            except asyncio.CancelledError:
                raise
            except EtcdCompacted as exc:
                self.events.emit("etcd_compacted", f"etcd compacted the history past revision "
                                 f"{exc.compact_revision}: reading the whole config again")
                continue
            except EtcdError as exc:
                self._failed(str(exc))
            except Exception as exc:  # a bug must not end the task; report it and retry
                self._failed(f"unexpected {exc!r}")
            if not self.stale:
                backoff = BACKOFF_START
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _failed(self, reason: str) -> None:
        self.stale_reason = reason
        if self.clock() - self.last_contact >= STALE_AFTER:
            self._go_stale(reason)

    async def _follow(self, controller: Any) -> None:
        store_revision, kvs = await self.client.get_prefix(layout.config_prefix(self.prefix))
        self.full_reads += 1
        revision = layout.config_revision(kvs)
        self.objects = {kv.key: kv.value for kv in kvs}
        self._go_fresh()
        await self._offer(controller, revision)
        # From the store's revision at the read, not the config's: the registry's writes move
        # the store on every second, and etcd's compaction (auto-compaction included) soon
        # passes the config's last write; a watch from there would be refused on every try.
        watch_from = store_revision + 1
        endpoint = self.client.endpoint
        watch = asyncio.create_task(self._watch(controller, watch_from), name="etcd-watch")
        beat = asyncio.create_task(self._heartbeat(endpoint), name="etcd-heartbeat")
        try:
            done, _ = await asyncio.wait({watch, beat}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
            raise EtcdError("watch ended")
        finally:
            for task in (watch, beat):
                task.cancel()
            await asyncio.gather(watch, beat, return_exceptions=True)

    async def _watch(self, controller: Any, start: int) -> None:
        async for revision, events in self.client.watch(layout.config_prefix(self.prefix), start):
            for event in events:
                if event.type == "DELETE":
                    self.objects.pop(event.kv.key, None)
                else:
                    self.objects[event.kv.key] = event.kv.value
            self._go_fresh()
            await self._offer(controller, revision)

    async def _heartbeat(self, watch_endpoint: str) -> None:
        """A watch over a dead link can hang without an error: a quorum read every
        HEARTBEAT_INTERVAL proves etcd answers, and a move to another member restarts the
        watch there (the old stream may be stuck on a member that can no longer reach a quorum)."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            await self.client.revision(layout.config_prefix(self.prefix))
            self.last_contact = self.clock()
            if self.client.endpoint != watch_endpoint:
                raise EtcdError(f"moved from {watch_endpoint} to {self.client.endpoint}")

    async def _offer(self, controller: Any, revision: int) -> None:
        """One etcd revision -> one reload of the controller (all of it or nothing, parsed off
        the event loop); the watch waits for it, so revisions are applied in order."""
        if revision == self.applied_revision and self.objects == self.applied_objects:
            return  # a re-read after a reconnect that found nothing new
        self.candidate_revision = revision
        result = await controller.reload(f"etcd revision {revision}")
        if result.ok and self.last_read is not None:
            self._applied(*self.last_read)
        elif not result.ok:
            self.rejected = {"revision": revision, "problems": result.problems}

    def _applied(self, revision: int, objects: dict[str, bytes]) -> None:
        """The controller serves this revision now: it is the last good config, persisted."""
        changed = (revision, objects) != (self.applied_revision, self.applied_objects)
        self.applied_revision, self.applied_objects = revision, objects
        self.rejected = None
        self.on_cache = self.on_cache and (revision, objects) == self.cached
        if changed or not self.cache_file.exists():
            self._save_cache()

    # ------------------------------------------------------------------ staleness

    def _go_stale(self, reason: str) -> None:
        if not self.stale:
            self.stale, self.stale_since = True, self.clock()
            self.stale_events += 1
            self.events.emit(
                "config_source_stale",
                f"lost etcd ({reason}); still serving revision {self.applied_revision}, nothing "
                "is withdrawn for this; retrying",
                level="warning", revision=self.applied_revision)
        self.stale_reason = reason

    def _go_fresh(self) -> None:
        self.last_contact = self.clock()
        if self.stale:
            was = self.stale_since
            self.stale, self.stale_since, self.stale_reason = False, None, ""
            self.events.emit("config_source_fresh",
                             f"etcd reachable at {self.client.endpoint}"
                             + (f" again after {self.clock() - was:.1f} s" if self.stale_events else ""))

    # ------------------------------------------------------------------ the local copy

    def _save_cache(self) -> None:
        data = {"revision": self.applied_revision,
                "objects": {k: v.decode() for k, v in sorted(self.applied_objects.items())}}
        try:
            atomic_write(self.cache_file, json.dumps(data, indent=1))
            self.cached = (self.applied_revision, dict(self.applied_objects))
        except OSError as exc:
            self.events.emit("config_cache_failed", f"cannot persist the last good config to "
                             f"{self.cache_file}: {exc}; a restart without etcd would start empty",
                             level="error")

    def _load_cache(self) -> bool:
        try:
            data = json.loads(self.cache_file.read_text())
            objects = {str(k): str(v).encode() for k, v in data["objects"].items()}
            revision = int(data["revision"])
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.events.emit("config_cache_unreadable", f"ignoring unreadable {self.cache_file}: {exc}",
                             level="warning")
            return False
        self.objects, self.candidate_revision = objects, revision
        self.cached = (revision, dict(objects))
        return True

    # ------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        return {
            "type": "etcd",
            "endpoints": self.client.endpoints,
            "endpoint": self.client.endpoint,
            "prefix": self.prefix,
            "revision": self.applied_revision,
            "stale": self.stale,
            "stale_for": round(self.clock() - self.stale_since, 1) if self.stale_since else 0.0,
            "stale_reason": (self.stale_reason or None) if self.stale else None,
            "rejected": self.rejected,
            "served_from_cache": self.on_cache,
        }

    def metrics(self) -> list[tuple[str, str, str, list]]:
        """(name, type, help, [(labels, value)]) for the node's exposition."""
        return [
            ("maglev_config_revision", "gauge", "etcd revision of the VIP config this node applied",
             [({}, self.applied_revision)]),
            ("maglev_config_source_stale", "gauge",
             "1 while the node cannot reach etcd (it keeps serving its last good config)",
             [({}, int(self.stale))]),
            ("maglev_config_source_lost_total", "counter", "Times the node lost etcd",
             [({}, self.stale_events)]),
            ("maglev_config_revision_rejected", "gauge",
             "etcd revision this node refused (0: none); see status.config_source.rejected",
             [({}, (self.rejected or {}).get("revision", 0))]),
        ]
