"""One lab for the whole end-to-end session (building it costs ~15 s; every test shares it).

Each test starts from a converged lab (`ready` fixture): every node running and announcing both
VIPs, every backend serving on every node, the router with one nexthop per node. Tests that
break something put it back, and `ready` repairs what a failed test left broken.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable

import pytest

from lab import plan as P
from lab.lab import Lab

VIPS = {"web4": P.VIP_V4, "web6": P.VIP_V6}


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> float:
    """Poll cond until truthy; return the seconds it took, or fail naming `what`."""
    t0 = time.monotonic()
    last_exc: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            if cond():
                return time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - a probe failing means "not yet"
            last_exc = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


async def await_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> float:
    """wait_until for async tests: the probe runs in a thread so open connections keep going."""
    t0 = time.monotonic()
    last_exc: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            if await asyncio.to_thread(cond):
                return time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - a probe failing means "not yet"
            last_exc = exc
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


def node_vips(lab: Lab, index: int) -> dict[str, dict]:
    data = lab.node_api(index, "/api/v1/vips")
    if data is None:
        return {}
    return {v["name"]: v for v in data["vips"]}


def serving_backends(view: dict) -> set[str]:
    return {b["address"] for b in view["backends"] if b.get("serving")}


def node_addresses(lab: Lab, version: int) -> set[str]:
    return {h.v4 if version == 4 else h.v6 for h in lab.plan.node_hosts}


def backend_name(lab: Lab, address: str) -> str:
    for h in lab.plan.backend_hosts:
        if address in (h.v4, h.v6):
            return h.name
    raise KeyError(address)


def fully_converged(lab: Lab) -> bool:
    all_backends = {4: {h.v4 for h in lab.plan.backend_hosts}, 6: {h.v6 for h in lab.plan.backend_hosts}}
    for h in lab.plan.node_hosts:
        vips = node_vips(lab, h.index)
        for name, addr in VIPS.items():
            v = vips.get(name)
            version = 6 if ":" in addr else 4
            if not v or not v["announced"] or serving_backends(v) != all_backends[version]:
                return False
    return all(
        lab.router_nexthops(addr) == node_addresses(lab, 6 if ":" in addr else 4) for addr in VIPS.values()
    )


OWN_LAB_MODULES = ("test_fleet.py",)  # bring up a lab of their own (etcd): before the shared one
LAST = "test_lab_down_leaves_nothing_behind"  # takes the shared lab down: the last e2e test


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Only one lab can be up at a time (fixed namespace names, /run/maglev-lab): the modules
    with a lab of their own run first, then every test on the shared session lab, then the test
    that takes it down. File names do not decide it."""
    slots = [i for i, item in enumerate(items) if "/tests/e2e/" in str(item.path)]

    def rank(item: pytest.Item) -> int:
        return 0 if item.path.name in OWN_LAB_MODULES else (2 if item.name == LAST else 1)

    ordered = sorted((items[i] for i in slots), key=rank)
    for i, item in zip(slots, ordered):
        items[i] = item


@pytest.fixture(scope="session")
def lab() -> Lab:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    the_lab = Lab(P.LabPlan(nodes=3, backends=5), progress=lambda m: print(f"[lab] {m}", flush=True))
    the_lab.up(timeout=90)
    try:
        yield the_lab
    finally:
        the_lab.down(quiet=True)


@pytest.fixture
def ready(lab: Lab) -> Lab:
    """The lab, converged: restart whatever an earlier (maybe failed) test left down."""
    if not P.RUN_DIR.exists():
        pytest.fail("the lab was taken down by an earlier test")
    for h in lab.plan.backend_hosts:
        if not lab.pid(h.name):
            lab.start_backend(h.index)
    for h in lab.plan.node_hosts:
        if not lab.pid(h.name):
            lab.start_node(h.index)
    wait_until(lambda: fully_converged(lab), 60, "every node announcing both VIPs over every backend")
    return lab
