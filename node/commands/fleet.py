"""`maglev fleet ...`: the fleet's VIP objects in etcd, and whether the live nodes agree.

    maglev fleet status            live nodes, their revision, VIPs whose digests differ (exit 3)
    maglev fleet apply FILE...     validate VIP files, write them in one transaction
    maglev fleet diff FILE...      what apply would change
    maglev fleet get [NAME...]     the objects, as a VIP file (re-applying it is a no-op)
    maglev fleet delete NAME...    remove VIPs from every node

These talk to etcd directly (no node needs to be up). etcd's address, prefix, TLS and auth come
from --config NODE.yaml (its etcd section), or --endpoints/--prefix, or $MAGLEV_ETCD_ENDPOINTS
and $MAGLEV_ETCD_PREFIX.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from node.config import ConfigError, EtcdConfig, NodeConfig, load_node_file
from node.fleet import objects, view
from node.fleet.etcd import EtcdClient, EtcdError
from node.fleet.registry import read_records

EXIT_DIFFERING = 3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="the fleet's VIPs in etcd and whether every node agrees",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fs = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)

    s = fs.add_parser("status", help="live nodes, revisions, VIPs whose table digests differ (exit 3)")
    _common(s)
    s.set_defaults(func=_run(cmd_status))

    s = fs.add_parser("apply", help="validate VIP files and write them to etcd in one transaction")
    s.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _common(s)
    s.set_defaults(func=_run(cmd_apply))

    s = fs.add_parser("diff", help="what `fleet apply FILE...` would change")
    s.add_argument("files", nargs="+", type=Path, metavar="FILE")
    _common(s)
    s.set_defaults(func=_run(cmd_diff))

    s = fs.add_parser("get", help="the VIP objects in etcd, as a VIP file")
    s.add_argument("names", nargs="*", metavar="NAME")
    _common(s)
    s.set_defaults(func=_run(cmd_get))

    s = fs.add_parser("delete", help="remove VIPs from the fleet")
    s.add_argument("names", nargs="+", metavar="NAME")
    _common(s)
    s.set_defaults(func=_run(cmd_delete))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, metavar="NODE.yaml",
                   help="a node file with config_source: etcd (endpoints, prefix, TLS, auth; "
                        "apply also checks the set against this node's limits)")
    p.add_argument("--endpoints", help="comma-separated etcd client URLs (default: $MAGLEV_ETCD_ENDPOINTS)")
    p.add_argument("--prefix", help="key prefix (default: $MAGLEV_ETCD_PREFIX or /maglev/)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _endpoint_list(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


def _settings(args: argparse.Namespace) -> tuple[EtcdConfig, NodeConfig | None, Path | None]:
    """etcd's settings: the node file's etcd section, with --endpoints/--prefix over it (checked
    as the node file's are), or --endpoints/$MAGLEV_ETCD_ENDPOINTS alone. ValueError: unusable."""
    node = base = None
    update: dict[str, Any] = {}
    if args.config is not None:
        node = load_node_file(args.config)
        base = args.config.resolve().parent
        if node.etcd is None:
            raise ValueError(f"{args.config} has no etcd section (config_source: etcd)")
        settings = node.etcd.model_dump()
    else:
        endpoints = args.endpoints or os.environ.get("MAGLEV_ETCD_ENDPOINTS")
        if not endpoints:
            raise ValueError("say where etcd is: --config NODE.yaml, --endpoints URL,... "
                             "or $MAGLEV_ETCD_ENDPOINTS")
        settings = {"endpoints": _endpoint_list(endpoints)}
        update["prefix"] = os.environ.get("MAGLEV_ETCD_PREFIX")
    if args.endpoints:
        update["endpoints"] = _endpoint_list(args.endpoints)
    if args.prefix:
        update["prefix"] = args.prefix
    try:
        return EtcdConfig.model_validate({**settings, **{k: v for k, v in update.items() if v}}), node, base
    except ValidationError as exc:
        raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'etcd'}: {e['msg'].removeprefix('Value error, ')}"
                                   for e in exc.errors())) from None


def _fail(message: object, details: list[Any], code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    for d in details:
        print(f"  {d}", file=sys.stderr)
    return code


def _run(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            cfg, node, base = _settings(args)
        except ConfigError as exc:
            return _fail(f"cannot use the node file {args.config}", exc.problems, 2)
        except ValueError as exc:
            return _fail(exc, [], 2)

        try:
            client = EtcdClient.from_config(cfg, base)
        except ValueError as exc:
            return _fail(exc, [], 2)

        async def go() -> int:
            async with client:
                return await fn(client, cfg.prefix, node, args)

        try:
            return asyncio.run(go())
        except objects.Refused as exc:
            return _fail(exc, exc.problems, 2)
        except EtcdError as exc:
            return _fail(exc, [], 1)
    return run


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)


async def cmd_status(client: EtcdClient, prefix: str, node: Any, args: argparse.Namespace) -> int:
    fleet = view.compare(await read_records(client, prefix))
    _print(args, fleet, view.render(fleet))
    return EXIT_DIFFERING if fleet["differing"] else 0


async def cmd_apply(client: EtcdClient, prefix: str, node: Any, args: argparse.Namespace) -> int:
    plan, revision = await objects.apply(client, prefix, args.files, node)
    text = objects.describe(plan) + (f"\nwritten at revision {revision}" if revision else "")
    _print(args, {**plan.__dict__, "revision": revision}, text)
    return 0


async def cmd_diff(client: EtcdClient, prefix: str, node: Any, args: argparse.Namespace) -> int:
    plan, _ = await objects.apply(client, prefix, args.files, node, dry_run=True)
    _print(args, plan.__dict__, objects.describe(plan))
    return 0


async def cmd_get(client: EtcdClient, prefix: str, node: Any, args: argparse.Namespace) -> int:
    current = await objects.read_current(client, prefix)
    objects.refuse_broken(current, args.names or None)
    missing = [n for n in args.names if n not in current.vips]
    if missing:
        raise objects.Refused(f"no VIP named {', '.join(missing)} in etcd "
                              f"(known: {', '.join(sorted(current.vips)) or 'none'})")
    names = args.names or sorted(current.vips)
    vips = [current.vips[n] for n in names]
    data = {"revision": current.stamp_revision, "vips": [v.model_dump(mode="json", exclude_none=True) for v in vips]}
    _print(args, data, f"# etcd revision {current.stamp_revision}\n" + objects.vips_yaml(vips).rstrip("\n"))
    return 0


async def cmd_delete(client: EtcdClient, prefix: str, node: Any, args: argparse.Namespace) -> int:
    plan, revision = await objects.delete(client, prefix, args.names)
    _print(args, {**plan.__dict__, "revision": revision}, objects.describe(plan) + f"\nwritten at revision {revision}")
    return 0
