"""`maglev check-config PATH...`: validate node and VIP files without running anything."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.config import (
    ConfigError,
    ConfigProblem,
    load_node_file,
    load_node_vips,
    load_vip_dir,
    load_vip_file,
    parse_yaml,
    read_config_text,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate node files, VIP files and VIP directories",
        description="Exit 0 with one summary line per file when all are valid; exit 2 listing "
        "every error otherwise. A node file's VIP directory is checked too.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.set_defaults(func=run)


def _kind(path: Path) -> str:
    if path.is_dir():
        return "vipdir"
    try:
        data = parse_yaml(read_config_text(path), str(path))
    except ConfigError:
        return "vip"  # the loader reports the read or parse error with the file name
    return "node" if isinstance(data, dict) and "node_id" in data else "vip"


def check_path(path: Path) -> list[str]:
    """Summary lines for a valid path; raises ConfigError listing every problem otherwise."""
    kind = _kind(path)
    if kind == "node":
        node = load_node_file(path)
        source = (f"VIPs from etcd {', '.join(node.etcd.endpoints)} under {node.etcd.prefix} "
                  "(`maglev fleet diff FILE --config NODE.yaml` checks a change)"
                  if node.config_source == "etcd" else f"VIP directory {node.vip_dir}")
        lines = [
            f"{path}: node {node.node_id!r}: AS {node.bgp.local_as}, {len(node.bgp.peers)} BGP peer(s), "
            f"forwarder on {', '.join(node.forwarder.interfaces)} ({node.forwarder.xdp_mode}), {source}"
        ]
        if node.config_source == "etcd":
            return lines  # the node never reads its vip_dir
        vip_dir = node.vip_dir if node.vip_dir.is_absolute() else path.parent / node.vip_dir
        if vip_dir.is_dir():
            lines.extend(check_path(vip_dir))
            load_node_vips(vip_dir, node)  # exactly what the node's reload would check
        return lines
    if kind == "vipdir":
        vips = load_vip_dir(path)
        return [f"{path}: VIP directory: {len(vips)} VIP(s): {', '.join(sorted(vips)) or 'none'}"]
    vips = load_vip_file(path)
    parts = [f"{v.name} ({v.protocol} {v.address}:{v.port}, {len(v.backends)} backends)" for v in vips]
    return [f"{path}: {len(vips)} VIP(s): {'; '.join(parts) or 'none'}"]


def run(args: argparse.Namespace) -> int:
    problems: list[ConfigProblem] = []
    for path in args.paths:
        if not path.exists():
            problems.append(ConfigProblem(str(path), None, None, "no such file or directory"))
            continue
        try:
            for line in check_path(path):
                print(line)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        for p in problems:
            print(f"error: {p}")
        print(f"{len(problems)} error(s); nothing was applied")
        return 2
    return 0
