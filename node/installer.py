"""Installing a VIP set into the running node: the reload boundary and what a new set changes.

A reload reads and validates the whole set in a worker thread (node.vip_source: the VIP
directory or etcd), then applies it at once: health targets re-indexed for the VIPs it
touched only (node.health_view.reindex), kept backends handing their verdict over
(node.handover), the touched VIPs marked for the next decision. Any error, expected
(ConfigError) or not, is caught, logged with the file and the reason and kept in
``last_reload``, and the node keeps serving the last good set.

These functions work on the controller's state (``c``) and are called under its reload lock;
they import nothing of the controller.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node import health_path
from node.config import ConfigError, VipConfig, vip_dir_warnings
from node.handover import handover
from node.health_view import reindex
from node.vip_source import read_vips, source_label

log = logging.getLogger("maglev.controller")


@dataclass
class ReloadResult:
    ok: bool
    at: float
    source: str
    problems: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # skipped entries, unsafe file modes


async def reload(c: Any, source: str) -> ReloadResult:
    """Read and validate the whole VIP set in a worker thread, then apply it at once, or keep
    the last good one and say why."""
    try:
        sources = await read_vips(c, c.fixed_table_capacity())
        result = install_vips(c, sources, source)
    except ConfigError as exc:
        return _failed(c, source, [str(p) for p in exc.problems])
    except Exception as exc:
        where = source_label(c)
        log.exception("config reload (%s) of %s failed", source, where)
        return _failed(c, source, [f"{where}: reload failed unexpectedly: {exc!r}"])
    c.mark_dirty()
    return result


def install_vips(c: Any, sources: dict[str, tuple[Path, VipConfig]], source: str) -> ReloadResult:
    """Make ``sources`` (name -> (file, VIP)) the node's VIP set."""
    new = {name: vip for name, (_, vip) in sources.items()}
    old = c.vips
    result = ReloadResult(
        True,
        time.time(),
        source,
        added=sorted(set(new) - set(old)),
        removed=sorted(set(old) - set(new)),
        changed=sorted(n for n in set(new) & set(old) if new[n] is not old[n] and new[n] != old[n]),
        warnings=_dir_warnings(c),
    )
    targets, owners, fresh = reindex(new, old, c.targets, c._owners)
    # Kept backends keep their verdict, whatever changed about their check (node.handover);
    # the VIPs the reload did not touch keep their targets, probed already.
    inherit = handover(c.targets, c._health_view(), fresh, c.health.snapshot())
    if health_path.sync_tunnel(c.tunnel, targets.values(), c.events) and c._forwarder_open:
        # the first tunnel check since start: set the tunnel up (probes fail until it is)
        c.supervisor.spawn("health-tunnel", lambda: health_path.open_tunnel(
            c.tunnel, c.events, c.targets.values()), once=True)
    c.health.update(set(owners), inherit)
    c.vips = new
    c.vip_sources = {name: path for name, (path, _) in sources.items()}
    c.targets = targets
    c._owners = owners  # target -> (vip, backend key)
    c._mark_vips(result.added + result.changed)
    # Backends of VIPs without a health check: a static pool, always UP.
    c._static_pairs = {(v.name, b.key) for v in new.values() if v.health_check is None for b in v.all_backends}
    if c.overrides:
        c.admin.forget_missing({(v.name, b.key) for v in new.values() for b in v.all_backends})
    c.last_reload = result
    c.metrics.reloads[True] = c.metrics.reloads.get(True, 0) + 1
    c._watch_signature = c._dir_signature()
    c.events.emit(
        "config_applied",
        f"config applied ({source}): {len(new)} VIP(s); added {result.added or 'none'}, "
        f"removed {result.removed or 'none'}, changed {result.changed or 'none'}",
    )
    return result


def _dir_warnings(c: Any) -> list[str]:
    """Logged on every load and kept in last_reload: a skipped entry or a file anyone may
    rewrite is not an error, but the operator must hear of it."""
    if c.vip_source is not None:
        return []  # the set comes from etcd, not from that directory
    warnings = [str(w) for w in vip_dir_warnings(c.vip_dir)]
    for w in warnings:
        c.events.emit("config_warning", w, level="warning")
    return warnings


def _failed(c: Any, source: str, problems: list[str]) -> ReloadResult:
    result = ReloadResult(False, time.time(), source, problems, warnings=_dir_warnings(c))
    c.last_reload = result
    c.metrics.reloads[False] = c.metrics.reloads.get(False, 0) + 1
    c.events.emit(
        "config_rejected",
        f"config reload ({source}) rejected, still serving the last good config: " + "; ".join(problems),
        level="error",
    )
    return result
