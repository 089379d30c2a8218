"""The etcd config source inside a controller, with a fake etcd client (the real etcd is in
tests/integration/test_fleet_etcd.py and the lab's tests/e2e/test_fleet.py): a compacted watch
is answered by a full re-read, the source runs as the supervised task "vip-source" (a crash is
restarted and counted), a revision this node refuses at start falls back to the persisted last
good set, and the parse runs in the reader's worker thread, not on the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import yaml

from node import metrics
from node.config import parse_node_object
from node.controller import Controller
from node.events import EventLog
from node.fleet import layout
from node.fleet.etcd import EtcdCompacted, EtcdError, KeyValue, WatchEvent
from node.fleet.source import EtcdSource
from tests.unit.test_controller import FakeForwarder, FakeHealth, FakeSpeaker, spec, vip

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/t/"


class FakeEtcd:
    """get_prefix/revision/watch over a dict; watch() raises what ``watch_errors`` holds first."""

    endpoint = "http://fake:2379"
    endpoints = [endpoint]

    def __init__(self) -> None:
        self.kvs: dict[str, tuple[bytes, int]] = {}
        self.store_revision = 1
        self.watch_errors: list[Exception] = []
        self.watch_starts: list[int] = []
        self.changes: asyncio.Queue = asyncio.Queue()
        self.reads = 0
        self.down = False

    def put(self, key: str, value: str) -> int:
        self.store_revision += 1
        self.kvs[key] = (value.encode(), self.store_revision)
        return self.store_revision

    def put_vip(self, data: dict) -> int:
        revision = self.put(layout.vip_key(PREFIX, data["name"]), json.dumps(data))
        self.changes.put_nowait((revision, [WatchEvent("PUT", KeyValue(layout.vip_key(PREFIX, data["name"]),
                                                                       json.dumps(data).encode(), revision))]))
        return revision

    async def get_prefix(self, prefix: str):
        if self.down:
            raise EtcdError("no etcd endpoint answered (fake)")
        self.reads += 1
        kvs = [KeyValue(k, v, r) for k, (v, r) in sorted(self.kvs.items()) if k.startswith(prefix)]
        return self.store_revision, kvs

    async def revision(self, prefix: str) -> int:
        if self.down:
            raise EtcdError("no etcd endpoint answered (fake)")
        return self.store_revision

    async def watch(self, prefix: str, start: int):
        """Changes from revision ``start`` on, as etcd's watch: a write the source has read
        already is not sent again (the queue holds every write since the fake was made)."""
        self.watch_starts.append(start)
        if self.watch_errors:
            raise self.watch_errors.pop(0)
        while True:
            revision, events = await self.changes.get()
            if revision >= start:
                yield revision, events

    async def close(self) -> None:
        pass


class Node:
    def __init__(self, tmp: Path, client: FakeEtcd, source_cls=EtcdSource) -> None:
        node = yaml.safe_load((REPO / "configs/node.yaml").read_text())
        node.update(vip_dir=str(tmp / "unused"), run_dir=str(tmp / "run"), warmup=0,
                    config_source="etcd", etcd={"endpoints": [FakeEtcd.endpoint], "prefix": PREFIX})
        node.pop("api")
        self.config = parse_node_object(node, "node.yaml")
        self.events = EventLog()
        self.source = source_cls(client, PREFIX, tmp / "state" / "etcd-cache.json", self.events)
        self.c = Controller(self.config, health_factory=FakeHealth, speaker=FakeSpeaker(),
                            forwarder=FakeForwarder(), events=self.events, spec_builder=spec,
                            vip_source=self.source)

    def events_named(self, name: str) -> list[dict]:
        return [e for e in self.events.recent if e["event"] == name]


async def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_compacted_watch_is_answered_by_a_full_re_read(tmp_path):
    etcd = FakeEtcd()
    etcd.put_vip(vip("web"))
    etcd.put("/t/nodes/n9", "{}")  # another node's record: the store moves past the config
    etcd.changes = asyncio.Queue()  # the first write is read, not watched
    etcd.watch_errors = [EtcdCompacted(5)]
    node = Node(tmp_path, etcd)
    await node.c.start()
    try:
        await wait_for(lambda: len(etcd.watch_starts) == 2, 5, "the watch started again")
        assert node.events_named("etcd_compacted") and etcd.reads >= 3  # prime, first read, re-read
        # The watch starts after the store's revision at the read, not after the config's last write.
        assert etcd.watch_starts[-1] == etcd.store_revision + 1
        revision = etcd.put_vip(vip("api", "10.100.0.2"))
        await wait_for(lambda: "api" in node.c.vips, 5, "api applied through the watch")
        assert node.source.applied_revision == revision and not node.source.stale
    finally:
        await node.c.stop()


class CrashingOnce(EtcdSource):
    crashed = False  # per instance (set on self): every run of the test starts with a crash

    async def run(self, controller):
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("a bug in the source loop")
        await super().run(controller)


async def test_the_source_is_the_supervised_task_vip_source(tmp_path):
    etcd = FakeEtcd()
    etcd.put_vip(vip("web"))
    node = Node(tmp_path, etcd, CrashingOnce)
    await node.c.start()
    try:
        await wait_for(lambda: node.c.supervisor.restarts().get("vip-source") == 1, 5, "a restart")
        assert "vip-dir-watch" not in node.c.supervisor.tasks
        assert 'maglev_task_restarts_total{task="vip-source"} 1' in metrics.render(node.c, {})
        # Restarted, it follows etcd again.
        etcd.put_vip(vip("api", "10.100.0.2"))
        await wait_for(lambda: "api" in node.c.vips, 5, "api applied after the restart")
        # SIGHUP (`systemctl reload`) re-applies the current revision rather than nothing.
        node.c.request_reload()
        def sighup_applied() -> bool:  # an event, not last_reload: a later reload may follow it
            return any(e["event"] == "config_applied" and "(SIGHUP)" in e["msg"] for e in node.events.recent)

        deadline = time.monotonic() + 5
        while not sighup_applied():
            assert time.monotonic() < deadline, (node.c.last_reload, node.c.supervisor.status(),
                                                 node.c._reload_wanted.is_set())
            await asyncio.sleep(0.02)
        assert set(node.c.vips) == {"web", "api"}
    finally:
        await node.c.stop()


async def test_an_etcd_node_ignores_its_vip_dir(tmp_path):
    """The directory named by vip_dir is not this node's source: editing it reloads nothing,
    and its files are not warned about (they were: each poll saw the edit, "VIP directory
    changed" re-applied the etcd set, and every reload listed the directory's warnings)."""
    from node.controller import WATCH_INTERVAL

    etcd = FakeEtcd()
    etcd.put_vip(vip("web"))
    node = Node(tmp_path, etcd)
    await node.c.start()
    try:
        await wait_for(lambda: "web" in node.c.vips, 5, "web applied")
        unused = tmp_path / "unused"
        unused.mkdir(exist_ok=True)
        stray = unused / "stray.yaml"
        stray.write_text("name: stray\n")
        stray.chmod(0o666)  # a file anyone may rewrite: a directory node warns about it
        node.c.request_reload()  # a reload that would list the directory's warnings
        await wait_for(lambda: node.c.last_reload is not None and node.c.last_reload.source == "SIGHUP",
                       5, "the SIGHUP reload")
        assert node.c.last_reload.ok and node.c.last_reload.warnings == []
        await asyncio.sleep(WATCH_INTERVAL * 2.5)  # two polls of the watcher
        msgs = [e["msg"] for e in node.events.recent]
        assert not any("VIP directory changed" in m for m in msgs), msgs
        assert not node.events_named("config_warning")
        assert set(node.c.vips) == {"web"}
    finally:
        await node.c.stop()


async def test_a_revision_refused_at_start_falls_back_to_the_last_good_set(tmp_path):
    etcd = FakeEtcd()
    good = etcd.put_vip(vip("web"))
    node = Node(tmp_path, etcd)
    await node.c.start()
    await wait_for(lambda: node.source.cache_file.exists(), 5, "the cache written")
    await node.c.stop()

    etcd.put_vip(vip("bad", "10.100.0.9", table_size=250))  # written around `maglev fleet`
    again = Node(tmp_path, etcd)
    await again.c.start()  # a refused revision does not keep the node down
    try:
        assert set(again.c.vips) == {"web"} and again.source.applied_revision == good
        status = again.c.status()["config_source"]
        assert status["served_from_cache"] and "table_size 250 is not prime" in str(status["rejected"])
        assert again.events_named("config_rejected")
        await wait_for(lambda: etcd.watch_starts, 5, "following etcd")
        assert again.c.status()["config_source"]["rejected"]  # still refused, still reported
    finally:
        await again.c.stop()

    # Without a cached set there is nothing to fall back to: the node does not start.
    (tmp_path / "state" / "etcd-cache.json").unlink()
    fresh = Node(tmp_path, etcd)
    with pytest.raises(Exception, match="table_size 250 is not prime"):
        await fresh.c.start()


async def test_an_etcd_revision_is_parsed_off_the_event_loop(tmp_path, monkeypatch):
    from node.fleet import layout as lay

    threads = []
    real = lay.parse_found

    def spy(*args, **kw):
        threads.append(threading.current_thread())
        return real(*args, **kw)

    monkeypatch.setattr(lay, "parse_found", spy)
    etcd = FakeEtcd()
    etcd.put_vip(vip("web"))
    node = Node(tmp_path, etcd)
    await node.c.start()
    try:
        etcd.put_vip(vip("api", "10.100.0.2"))
        await wait_for(lambda: "api" in node.c.vips, 5, "api applied")
        assert threads and threading.main_thread() not in threads
    finally:
        await node.c.stop()
