"""Shared test setup.

Tests marked ``root`` need root (BPF, namespaces, FRR, ExaBGP). CI runs as root, so they run
there; a developer without root sees them reported as skipped with the reason, never silently
passing.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, network namespaces, FRR, ExaBGP)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
