"""Managing the fleet's VIP objects in etcd (`maglev fleet apply/get/delete/diff`).

Every write is validated first with the same checks a VIP directory gets (each file, duplicates
across files, the resulting whole set, and this node's limits when a node file is given), then
written in one transaction that also rewrites the stamp and succeeds only if nothing under
config/ changed since it was read. So a bad object changes nothing anywhere, and two operators
applying at once cannot interleave: one of them is told to run again.
"""

from __future__ import annotations

import difflib
import getpass
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from node.config import (
    ConfigError,
    ConfigProblem,
    NodeConfig,
    VipConfig,
    check_vip_set,
    check_vips_for_node,
    load_vip_file,
)
from node.fleet import layout
from node.fleet.etcd import EtcdClient, delete_op, put_op, unchanged_since


@dataclass
class Current:
    """The config/ subtree as read at one revision."""

    stamp_revision: int
    vips: dict[str, VipConfig]
    raw: dict[str, str]
    mod: dict[str, int]
    # objects that do not parse (written around `maglev fleet`, e.g. with etcdctl): name ->
    # problems. `apply` of a file that replaces them and `delete` of them are what fix them.
    broken: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Plan:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    diffs: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)


class Refused(Exception):
    """Nothing was written; the message (and problems) say why."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = problems or []
        super().__init__(message)


async def read_current(client: EtcdClient, prefix: str) -> Current:
    """config/ as it is now. An object that does not parse is kept aside in ``broken`` rather
    than refusing everything: the write that replaces or deletes it must go through."""
    _, kvs = await client.get_prefix(layout.config_prefix(prefix))
    base = layout.vips_prefix(prefix)
    found, problems = layout.parse_found(prefix, {kv.key: kv.value for kv in kvs}, "now")
    vips = {v.name: v for _, v in found}
    broken: dict[str, list[str]] = {}
    for kv in kvs:
        name = kv.key[len(base):]
        if kv.key.startswith(base) and name not in vips:
            broken[name] = [str(p) for p in problems if p.file.startswith(f"etcd {kv.key} ")]
    stamp = next((kv.mod_revision for kv in kvs if kv.key == layout.stamp_key(prefix)), 0)
    return Current(
        stamp_revision=stamp,
        vips=vips,
        raw={kv.key[len(base):]: kv.value.decode(errors="replace") for kv in kvs if kv.key.startswith(base)},
        mod={kv.key[len(base):]: kv.mod_revision for kv in kvs if kv.key.startswith(base)},
        broken=broken,
    )


def refuse_broken(current: Current, names: list[str] | None = None) -> None:
    """Refused, naming them and how to fix them, if any of ``names`` (None: any) is broken."""
    bad = sorted(n for n in current.broken if names is None or n in names)
    if bad:
        raise Refused(f"invalid object(s) in etcd: {', '.join(bad)}; replace them with `maglev fleet "
                      f"apply FILE` or remove them with `maglev fleet delete NAME`",
                      [p for n in bad for p in current.broken[n]])


def load_files(files: list[Path]) -> list[tuple[str, VipConfig]]:
    """Every VIP of the files, validated as files are; any problem refuses them all."""
    problems: list[ConfigProblem] = []
    found: list[tuple[str, VipConfig]] = []
    for path in files:
        try:
            found.extend((str(path), v) for v in load_vip_file(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    problems.extend(check_vip_set(found))
    if problems:
        raise Refused("invalid VIP file(s); nothing was written", [str(p) for p in problems])
    return found


def plan(current: Current, new: list[VipConfig], remove: list[str] = ()) -> Plan:
    p = Plan()
    for vip in sorted(new, key=lambda v: v.name):
        encoded = layout.encode_vip(vip)
        old = current.raw.get(vip.name)
        if old is None:
            p.added.append(vip.name)
        elif old == encoded:
            p.unchanged.append(vip.name)
        else:
            p.changed.append(vip.name)
            p.diffs[vip.name] = (_yaml_diff(vip.name, current.vips[vip.name], vip) if vip.name in current.vips
                                 else f"{vip.name}: replaces an invalid object ({'; '.join(current.broken[vip.name])})")
    p.removed = sorted(n for n in remove if n in current.raw)
    return p


def check_result(current: Current, new: list[VipConfig], remove: list[str], node: NodeConfig | None) -> None:
    """The whole set as it would be after the write must be valid, like a VIP directory."""
    replaced = {v.name for v in new} | set(remove)
    refuse_broken(current, [n for n in current.broken if n not in replaced])  # invalid ones that stay
    result = [(f"etcd object {n}", v) for n, v in sorted(current.vips.items()) if n not in replaced]
    result += [("new", v) for v in new]
    problems = check_vip_set(result)
    if node is not None:
        problems += check_vips_for_node({v.name: v for _, v in result}, node, "the fleet's VIP set")
    if problems:
        raise Refused("the VIP set would be invalid; nothing was written", [str(p) for p in problems])


async def write(client: EtcdClient, prefix: str, current: Current, new: list[VipConfig],
                p: Plan, action: str) -> int:
    """One transaction: the changed objects and the stamp, only if config/ is as read."""
    compare = [unchanged_since(layout.stamp_key(prefix), current.stamp_revision)]
    ops = []
    by_name = {v.name: v for v in new}
    for name in p.added + p.changed:
        compare.append(unchanged_since(layout.vip_key(prefix, name), current.mod.get(name, 0)))
        ops.append(put_op(layout.vip_key(prefix, name), layout.encode_vip(by_name[name])))
    for name in p.removed:
        compare.append(unchanged_since(layout.vip_key(prefix, name), current.mod[name]))
        ops.append(delete_op(layout.vip_key(prefix, name)))
    stamp = {"action": action, "by": f"{getpass.getuser()}@{socket.gethostname()}", "at": round(time.time(), 3)}
    ops.append(put_op(layout.stamp_key(prefix), json.dumps(stamp, sort_keys=True)))
    ok, revision = await client.txn(compare, ops)
    if not ok:
        raise Refused("the fleet's config changed while this was being applied; nothing was "
                      "written: look at `maglev fleet diff` and run again")
    return revision


async def apply(client: EtcdClient, prefix: str, files: list[Path], node: NodeConfig | None = None,
                dry_run: bool = False) -> tuple[Plan, int | None]:
    new = [v for _, v in load_files(files)]
    current = await read_current(client, prefix)
    check_result(current, new, [], node)
    p = plan(current, new)
    if dry_run or p.empty:
        return p, None
    return p, await write(client, prefix, current, new, p, "apply " + " ".join(str(f) for f in files))


async def delete(client: EtcdClient, prefix: str, names: list[str]) -> tuple[Plan, int]:
    current = await read_current(client, prefix)
    unknown = [n for n in names if n not in current.raw]
    if unknown:
        raise Refused(f"no VIP named {', '.join(unknown)} in etcd (known: {', '.join(sorted(current.raw)) or 'none'})")
    p = plan(current, [], names)
    return p, await write(client, prefix, current, [], p, "delete " + " ".join(names))


def vips_yaml(vips: list[VipConfig]) -> str:
    """A VIP file holding these VIPs: `fleet get > f.yaml` then `fleet apply f.yaml` is a no-op."""
    return yaml.safe_dump({"vips": [v.model_dump(mode="json", exclude_none=True) for v in vips]}, sort_keys=False)


def _yaml_diff(name: str, old: VipConfig, new: VipConfig) -> str:
    a = vips_yaml([old]).splitlines(keepends=True)
    b = vips_yaml([new]).splitlines(keepends=True)
    return "".join(difflib.unified_diff(a, b, f"etcd/{name}", f"file/{name}"))


def describe(p: Plan) -> str:
    lines = []
    for label, names in (("add", p.added), ("change", p.changed), ("delete", p.removed), ("unchanged", p.unchanged)):
        for n in names:
            lines.append(f"{label:<9} {n}")
    for n in p.changed:
        lines.append(p.diffs[n].rstrip("\n"))
    return "\n".join(lines) if lines else "nothing to do"
