"""Where a node's VIP set comes from: its VIP directory (the default) or etcd (a fleet).

The controller holds ``vip_source`` (None for the directory, a ``node.fleet.member.FleetMember``
for etcd) and knows nothing else about it: this module picks the source from the node file,
reads the candidate set for a reload, names the task that follows the source and reports it.
Both sources go through the same path: the candidate set is parsed and validated in the
VipReader's worker thread (never on the event loop) with every check a reload runs
(``node.config.validate_vip_set``), then the controller installs it whole or keeps the last
good set. The etcd source's own loop (node/fleet/source.py) turns each etcd revision into one
``await controller.reload(...)`` and persists what was applied.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable

from node.config import ConfigError, Deadline, NodeConfig, VipConfig, validate_vip_set

Sources = dict[str, tuple[Path, VipConfig]]


def make_source(config: NodeConfig, state_dir: Path, base_dir: Path, events: Any) -> Any:
    """The node file's config_source: None for ``directory``, the fleet membership for ``etcd``."""
    if config.config_source != "etcd":
        return None
    from node.fleet.member import FleetMember  # a directory node never loads the fleet code

    return FleetMember(config, state_dir, base_dir, events)


async def initial_vips(controller: Any) -> Sources:
    """The set the node starts on (ConfigError: it cannot start). etcd: one read first, so a
    node that reaches etcd starts on the current revision (its warm-up then covers those VIPs);
    if etcd is away, or holds a set this node refuses, the persisted last good set."""
    src = controller.vip_source
    if src is not None:
        await src.prime()
    try:
        return await read_vips(controller)
    except ConfigError as exc:
        if src is None or not src.fall_back([str(p) for p in exc.problems]):
            raise
    return await read_vips(controller)


async def read_vips(controller: Any, capacity: int | None = None) -> Sources:
    """The candidate VIP set, validated exactly as a reload needs it (ConfigError otherwise)."""
    src = controller.vip_source
    if src is None:
        return await controller.reader.read(controller.vip_dir, controller.config, capacity)
    revision, objects = src.candidate()  # a copy: the watcher may move on while the worker parses
    return await controller.reader.run(
        src.label, f"etcd revision {revision}", "shrink the fleet's VIP objects",
        load_fleet_vips, src.prefix, objects, f"revision {revision}", controller.config, src.label,
        capacity=capacity)


def load_fleet_vips(prefix: str, objects: dict[str, bytes], where: str, node: NodeConfig,
                    label: str, deadline: Deadline | None = None, capacity: int | None = None) -> Sources:
    """An etcd revision's objects -> the VIP set, with a directory's checks (runs in the worker)."""
    from node.fleet import layout

    found, problems = layout.parse_found(prefix, objects, where, deadline)
    if not problems:
        problems = validate_vip_set(found, node, label, capacity)
    if problems:
        raise ConfigError(problems)
    return layout.sources(prefix, found)


def watcher(controller: Any) -> tuple[str, Callable[[], Awaitable[None]]]:
    """The supervised task that follows the source: the directory's poller, or etcd's watch
    (with the node's registry record and the fleet monitor)."""
    src = controller.vip_source
    if src is None:
        return "vip-dir-watch", controller._watch_loop

    async def follow() -> None:
        # The directory watcher's loop also serves SIGHUP (`systemctl reload`): on an etcd node
        # it re-applies the current revision, as POST /api/v1/reload does, instead of nothing.
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(src.run(controller), name="etcd")
                group.create_task(controller._watch_loop(), name="sighup")
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the supervisor reports and counts it

    return "vip-source", follow


def source_label(controller: Any) -> str:
    src = controller.vip_source
    return str(controller.vip_dir) if src is None else src.label


def source_status(controller: Any) -> dict[str, Any]:
    src = controller.vip_source
    return {"type": "directory", "dir": str(controller.vip_dir)} if src is None else src.status()
