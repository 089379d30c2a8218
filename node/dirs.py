"""Where a node keeps its files, in one place.

- run:   sockets, generated ExaBGP/bfdd configs, pid files; may vanish at every stop
         (``run_dir``, default /run/maglev: systemd's RuntimeDirectory=maglev).
- state: what the operator decided (drains, node drain: state.json); must survive restarts
         and reboots (``state_dir``; else systemd's $STATE_DIRECTORY from StateDirectory=;
         else run_dir, as a lab or a test wants).
- logs:  ExaBGP's and bfdd's own output, size-bounded and rotated (``log_dir``; else
         $LOGS_DIRECTORY from LogsDirectory=; else run_dir).
The BPF object cache follows $CACHE_DIRECTORY (CacheDirectory=); see node.forwarder.build.
Relative paths in the node file are from the node file's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class NodeDirs:
    run: Path
    state: Path
    logs: Path


def _from_env(env: Mapping[str, str], key: str) -> Path | None:
    # systemd passes a colon-separated list when the unit names several; ours names one.
    value = env.get(key, "").split(":")[0]
    return Path(value) if value.startswith("/") else None


def node_dirs(config, base_dir: Path | None = None, env: Mapping[str, str] | None = None) -> NodeDirs:
    env = os.environ if env is None else env

    def resolve(p: Path) -> Path:
        return p if p.is_absolute() or base_dir is None else base_dir / p

    run = resolve(config.run_dir)
    state = resolve(config.state_dir) if config.state_dir else (_from_env(env, "STATE_DIRECTORY") or run)
    logs = resolve(config.log_dir) if config.log_dir else (_from_env(env, "LOGS_DIRECTORY") or run)
    return NodeDirs(run=run, state=state, logs=logs)
