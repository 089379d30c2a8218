"""Helpers for tests and benches that drive the real forwarder program (root only).

``temp_forwarder`` gives an opened Forwarder on a private bpffs mount that is torn down
afterwards (pins, mount, directory), even when the test fails.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from node.config import ForwarderConfig
from node.forwarder.loader import Forwarder, mount_bpffs, umount_bpffs

TEST_NEXT_HOP = "02:00:00:00:b0:01"


def make_config(bpffs: Path, **overrides) -> ForwarderConfig:
    fields = dict(interfaces=["lo"], encap_source_v4="10.0.0.1", encap_source_v6="fd00::1",
                  next_hop_mac=TEST_NEXT_HOP, conntrack_size=65536, bpffs=bpffs)
    fields.update(overrides)
    return ForwarderConfig(**fields)


@contextlib.contextmanager
def temp_bpffs(prefix: str = "mlbt") -> Iterator[Path]:
    """A fresh bpffs mounted on a temporary directory; unmounted and removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}{secrets.token_hex(3)}-bpffs-"))
    try:
        mount_bpffs(root)
        yield root
    finally:
        umount_bpffs(root)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def temp_forwarder(table_capacity: int = 1 << 20, **overrides) -> Iterator[Forwarder]:
    with temp_bpffs() as root:
        fwd = Forwarder(make_config(root / "maglev", **overrides), table_capacity=table_capacity)
        fwd.open()
        try:
            yield fwd
        finally:
            fwd.close()
            fwd.remove_pins()
