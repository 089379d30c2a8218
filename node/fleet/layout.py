"""Where things live under the fleet's key prefix, and how a VIP object is encoded there.

    <prefix>config/vips/<name>   one VIP object (JSON, the same fields as a VIP file's entry)
    <prefix>config/stamp         rewritten by every `maglev fleet` write, in the same transaction
    <prefix>nodes/<node_id>      each live node's record, under its lease

The stamp makes the config revision well defined: it is the revision of the last write
transaction under config/, which a node gets the same way from a full read (the largest
mod_revision) as from a watch (the batch's revision). Without it a deletion would leave no trace
in a full read, and two nodes could name the same VIP set by different revisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from node.config import (
    ConfigError,
    ConfigProblem,
    Deadline,
    VipConfig,
    parse_vip_object,
)


def config_prefix(prefix: str) -> str:
    return prefix + "config/"


def vips_prefix(prefix: str) -> str:
    return prefix + "config/vips/"


def stamp_key(prefix: str) -> str:
    return prefix + "config/stamp"


def vip_key(prefix: str, name: str) -> str:
    return vips_prefix(prefix) + name


def nodes_prefix(prefix: str) -> str:
    return prefix + "nodes/"


def node_key(prefix: str, node_id: str) -> str:
    return nodes_prefix(prefix) + node_id


def encode_vip(vip: VipConfig) -> str:
    """Canonical JSON: the same VIP always encodes to the same bytes, so `fleet diff` and the
    transaction's 'unchanged' check compare content, not formatting."""
    return json.dumps(vip.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":"))


def parse_found(prefix: str, objects: dict[str, bytes], where: str,
                deadline: Deadline | None = None) -> tuple[list[tuple[str, VipConfig]], list[ConfigProblem]]:
    """(source, VIP) of every object under vips/, and every object's problems (as
    node.config reads a directory's files: one bad object is named, the others still checked)."""
    problems: list[ConfigProblem] = []
    found: list[tuple[str, VipConfig]] = []
    base = vips_prefix(prefix)
    for key in sorted(objects):
        if not key.startswith(base):
            continue
        source = f"etcd {key} ({where})"
        if deadline is not None:
            deadline.check(source)
        try:
            data = json.loads(objects[key])
        except ValueError as exc:
            problems.append(ConfigProblem(source, None, None, f"not JSON: {exc}"))
            continue
        name = key[len(base):]
        try:
            vip = parse_vip_object(data, source)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if vip.name != name:
            problems.append(ConfigProblem(source, vip.name, "name", f"the key names VIP {name!r} but the object says {vip.name!r}"))
            continue
        found.append((source, vip))
    return found, problems


def sources(prefix: str, found: list[tuple[str, VipConfig]]) -> dict[str, tuple[Path, VipConfig]]:
    """{name: (where it came from, VIP)}, as node.config.load_node_vips returns a directory's."""
    return {vip.name: (Path(f"etcd:{vips_prefix(prefix)}{vip.name}"), vip) for _, vip in found}


def config_revision(kvs: list[Any]) -> int:
    """The revision a full read of config/ stands for (see the module docstring)."""
    return max((kv.mod_revision for kv in kvs), default=0)
