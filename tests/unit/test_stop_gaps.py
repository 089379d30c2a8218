"""The stop-gap lane's bookkeeping (node.stop_gaps) with a fake forwarder: losses heard of
before it runs go in one batch, the VIPs patched are handed on to be programmed, a failed
patch is reported and hands on every VIP of the batch, a reconcile waits for a batch in
flight, and a forwarder without the patch leaves it all to the reconcile. The patch itself
runs on the real maps in tests/integration/test_stop_gaps.py."""

from __future__ import annotations

import asyncio

from node.events import EventLog
from node.stop_gaps import StopGaps


class Patcher:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[dict] = []
        self.fail = fail

    def drop_from_tables(self, gone):
        self.calls.append({v: set(k) for v, k in gone.items()})
        if self.fail:
            raise OSError("mmap failed")
        return sorted(v for v in gone if v != "untouched")


class StopsFirst(Patcher):
    """A forwarder that also stops the backends in the data path (the real one does)."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def stop_serving(self, gone):
        self.order.append("stop_serving")
        return sorted(v for v in gone if v != "untouched")

    def drop_from_tables(self, gone):
        self.order.append("drop_from_tables")
        return super().drop_from_tables(gone)


async def test_losses_go_in_one_batch_and_patched_vips_are_handed_on():
    fwd, events, handed = Patcher(), EventLog(), []
    lane = StopGaps(fwd, events, handed.append)
    lane.lost([("a", "b1"), ("b", "b1")])
    lane.lost([("a", "b2"), ("untouched", "b1")])
    task = asyncio.create_task(lane.run())
    try:
        await asyncio.wait_for(lane.settled(), 5)
        assert fwd.calls == [{"a": {"b1", "b2"}, "b": {"b1"}, "untouched": {"b1"}}]
        assert handed == [{"a", "b"}] and lane.tables_patched == 2
        (event,) = [e for e in events.recent if e["event"] == "tables_stop_gapped"]
        assert "b1, b2" in event["msg"] and "out of 2 live table(s)" in event["msg"]
    finally:
        task.cancel()


async def test_a_failed_patch_is_reported_and_every_vip_of_the_batch_programmed_again():
    fwd, events, handed = Patcher(fail=True), EventLog(), []
    lane = StopGaps(fwd, events, handed.append)
    task = asyncio.create_task(lane.run())
    try:
        lane.lost([("a", "b1"), ("b", "b1")])
        await asyncio.wait_for(lane.settled(), 5)
        assert handed == [{"a", "b"}] and lane.tables_patched == 0
        (event,) = [e for e in events.recent if e["event"] == "stop_gap_failed"]
        assert event["level"] == "error" and "2 VIP table(s)" in event["msg"] and "mmap failed" in event["msg"]
        lane.lost([("c", "b1")])  # the lane goes on
        await asyncio.wait_for(lane.settled(), 5)
        assert fwd.calls[-1] == {"c": {"b1"}}
    finally:
        task.cancel()


async def test_a_forwarder_without_the_patch_leaves_it_to_the_reconcile():
    handed = []
    lane = StopGaps(object(), EventLog(), handed.append)
    lane.lost([("a", "b1")])
    await asyncio.wait_for(lane.settled(), 0.5)  # nothing in flight: returns at once
    assert handed == []


async def test_the_data_path_stops_the_backends_before_the_tables_are_patched():
    fwd, events, handed = StopsFirst(), EventLog(), []
    lane = StopGaps(fwd, events, handed.append)
    lane.lost([("a", "b1"), ("untouched", "b1")])
    task = asyncio.create_task(lane.run())
    try:
        await asyncio.wait_for(lane.settled(), 5)
        assert fwd.order == ["stop_serving", "drop_from_tables"]
        assert lane.serving_stopped == 1 and lane.tables_patched == 1 and handed == [{"a"}]
        (event,) = [e for e in events.recent if e["event"] == "tables_stop_gapped"]
        assert "out of service in 1 VIP(s)' data path in" in event["msg"]
        assert 0 <= event["serving_ms"] <= event["ms"]
    finally:
        task.cancel()
