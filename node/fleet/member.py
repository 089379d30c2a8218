"""A node's membership in an etcd fleet: its config source, its registry record and its view
of the others, as the one object the controller holds as its ``vip_source``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from node.fleet import view
from node.fleet.etcd import EtcdClient
from node.fleet.registry import FleetMonitor, NodeRegistry, node_record, read_records
from node.fleet.source import EtcdSource


class FleetMember:
    kind = "etcd"

    def __init__(self, config: Any, state_dir: Path, base_dir: Path, events: Any) -> None:
        cfg = config.etcd
        self.prefix = cfg.prefix
        self.client = EtcdClient.from_config(cfg, base_dir)
        cache = cfg.cache_file if cfg.cache_file.is_absolute() else state_dir / cfg.cache_file
        self.source = EtcdSource(self.client, cfg.prefix, cache, events)
        self.registry = NodeRegistry(self.client, cfg.prefix, config.node_id, cfg.lease_ttl,
                                     record=lambda: {}, events=events)
        self.monitor = FleetMonitor(self.client, cfg.prefix, events=events)
        self.label = self.source.label

    async def prime(self) -> None:
        await self.source.prime()

    def candidate(self) -> tuple[int, dict[str, bytes]]:
        return self.source.candidate()

    async def run(self, controller: Any) -> None:
        """Source, registry and monitor loops, as the supervised task "vip-source". Each
        handles its own failures; should one still raise, the task group cancels the other two
        and the supervisor starts all three again (no orphan loop left behind)."""
        self.registry.record = lambda: node_record(controller, self.source)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.source.run(controller), name="etcd-source")
                group.create_task(self.registry.run(), name="fleet-registry")
                group.create_task(self.monitor.run(), name="fleet-monitor")
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the supervisor logs and counts it
        finally:
            await self.client.close()

    async def view(self) -> dict[str, Any]:
        """The fleet as etcd sees it now (raises EtcdError when etcd cannot be read)."""
        return view.compare(await read_records(self.client, self.prefix))

    def status(self) -> dict[str, Any]:
        return {**self.source.status(), "registered": self.registry.registered,
                "node_key": self.registry.key}

    def metrics(self) -> list[tuple[str, str, str, list]]:
        """(name, type, help, [(labels, value)]): revision, staleness, fleet agreement."""
        return [
            *self.source.metrics(),
            ("maglev_fleet_registered", "gauge", "1 while this node's record is in the fleet registry",
             [({}, int(self.registry.registered))]),
            *self.monitor.metrics(),
        ]
