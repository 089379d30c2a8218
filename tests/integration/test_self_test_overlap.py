"""Self-tests on the real program that overlap each other and a sync (the periodic self-test,
the post-sync one and a reload used to share one test-run buffer): every one must pass."""

from __future__ import annotations

import threading
from ipaddress import ip_address

import pytest

from node.forwarder.loader import BackendSpec, VipSpec
from node.forwarder.testing import temp_forwarder

pytestmark = [pytest.mark.root, pytest.mark.integration]


def vips(count: int, shift: int = 0) -> list[VipSpec]:
    out = []
    for i in range(count):
        backends = tuple(BackendSpec(f"b{i}-{j}", ip_address(f"10.2.{i % 250}.{j + 1}"), "active") for j in range(3))
        keys = [b.key for b in backends]
        table = [keys[(k + shift) % 3] for k in range(13)]
        out.append(VipSpec(f"v{i}", ip_address(f"10.1.{i // 250}.{i % 250 + 1}"), "tcp", 80, backends, table))
    return out


def test_overlapping_self_tests_and_syncs_all_pass() -> None:
    with temp_forwarder() as f:
        f.sync(vips(100))
        assert f.self_test().ok
        results, errors = [], []

        def self_tests() -> None:
            for _ in range(5):
                results.append(f.self_test())

        def syncs() -> None:
            try:
                for shift in range(6):  # tables change under the self-tests' feet
                    f.sync(vips(100, shift))
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=self_tests) for _ in range(8)] + [threading.Thread(target=syncs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        failed = [r.reason for r in results if not r.ok]
        assert len(results) == 40 and failed == []
