"""The fleet against a real etcd: members started by the test on loopback (unique ports, own
data directories), stopped by PID.

Nodes here are real Controllers with their real etcd source, registry and monitor; their
forwarder, BGP speaker and health monitor are the unit tests' fakes, because what is under test
is the etcd side (the lab's end-to-end tests run whole nodes against a 3-member cluster). The
operator's side is the real `maglev fleet` command, run as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from healthcheck import State
from lab.etcd import EtcdCluster
from node.config import parse_node_object
from node.controller import Controller
from node.events import EventLog
from node.fleet import layout
from node.fleet.etcd import EtcdClient, EtcdCompacted
from node.fleet.member import FleetMember
from tests.integration.harness import CHROMIUM_FLAGS
from tests.unit.test_controller import FakeForwarder, FakeHealth, FakeSpeaker, spec

pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
MAGLEV = [sys.executable, "-m", "node.cli"]


@contextlib.contextmanager
def running_cluster(data_dir: Path, size: int):
    cluster = EtcdCluster.on_loopback(data_dir, size=size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def etcd(tmp_path):
    with running_cluster(tmp_path / "etcd", 1) as cluster:
        yield cluster


@pytest.fixture
def etcd3(tmp_path):
    with running_cluster(tmp_path / "etcd3", 3) as cluster:
        yield cluster


def vip(name: str, address: str, backends=("10.0.1.1", "10.0.1.2", "10.0.1.3"), **extra) -> dict:
    return {"name": name, "address": address, "port": 80, "table_size": 251,
            "backends": [{"address": a} for a in backends],
            "health_check": {"type": "tcp", "interval": 1, "timeout": 0.5}, **extra}


class FleetNode:
    """One node of the fleet: a Controller whose VIPs come from etcd."""

    def __init__(self, tmp: Path, node_id: str, endpoints: list[str], prefix: str = "/t/") -> None:
        self.dir = tmp / node_id
        self.dir.mkdir(parents=True, exist_ok=True)
        node = yaml.safe_load((REPO / "configs/node.yaml").read_text())
        node.update(node_id=node_id, vip_dir=str(self.dir / "unused"), run_dir=str(self.dir / "run"),
                    warmup=0, config_source="etcd",
                    etcd={"endpoints": endpoints, "prefix": prefix, "lease_ttl": 2, "request_timeout": 0.5})
        node.pop("api")
        self.config = parse_node_object(node, f"{node_id}.yaml")
        self.node_file = self.dir / "node.yaml"
        self.node_file.write_text(yaml.safe_dump({**node, "api": {"port": 9180}}))
        self.events = EventLog()
        self.health: FakeHealth | None = None
        self.forwarder = FakeForwarder()
        self.member = FleetMember(self.config, self.dir / "run", self.dir, self.events)  # state dir = run dir here

        def health_factory(cb):
            self.health = FakeHealth(cb)
            return self.health

        self.c = Controller(self.config, health_factory=health_factory, speaker=FakeSpeaker(),
                            forwarder=self.forwarder, events=self.events, spec_builder=spec,
                            vip_source=self.member)

    async def start(self) -> None:
        await self.c.start()

    async def stop(self) -> None:
        await self.c.stop()

    def all_up(self) -> None:
        for t in self.health.targets:
            self.health.states[t] = State.UP
        self.c.mark_dirty()

    @property
    def revision(self) -> int:
        return self.member.source.applied_revision

    def digest(self, name: str) -> str | None:
        d = self.c.desired.vips.get(name) if self.c.desired else None
        return d.table.digest() if d and d.table else None

    def event_names(self) -> list[str]:
        return [e["event"] for e in self.events.recent]


@contextlib.asynccontextmanager
async def fleet_nodes(tmp: Path, endpoints: list[str], count: int):
    """``count`` started FleetNodes n0, n1...; every one started is stopped, whatever happens."""
    started = []
    try:
        for i in range(count):
            node = FleetNode(tmp, f"n{i}", endpoints)
            await node.start()
            started.append(node)
        yield started
    finally:
        for node in started:
            await node.stop()


async def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def fleet(endpoints: list[str], *args: str, prefix: str = "/t/") -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGLEV_ETCD_ENDPOINTS": ",".join(endpoints), "MAGLEV_ETCD_PREFIX": prefix}
    return await asyncio.to_thread(subprocess.run, [*MAGLEV, "fleet", *args], capture_output=True,
                                   text=True, env=env, cwd=REPO, timeout=60)


def vip_file(tmp: Path, name: str, vips: list[dict]) -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump({"vips": vips}))
    return path


async def etcd_revision(endpoints: list[str]) -> int:
    """The config's revision: the last write under /t/config/ (the nodes' registry writes under
    /t/nodes/ move the store's revision, not this one)."""
    async with EtcdClient(endpoints) as client:
        return layout.config_revision((await client.get_prefix(layout.config_prefix("/t/")))[1])


# ------------------------------------------------------------------------------ the client


async def test_client_txn_watch_and_compaction(etcd):
    async with EtcdClient(etcd.endpoints) as client:
        r1 = await client.put("/c/a", "1")
        ok, r2 = await client.txn([{"key": layout_b64("/c/a"), "target": "MOD", "result": "EQUAL",
                                    "mod_revision": str(r1)}],
                                  [{"requestPut": {"key": layout_b64("/c/b"), "value": layout_b64("2")}}])
        assert ok and r2 == r1 + 1
        ok, _ = await client.txn([{"key": layout_b64("/c/a"), "target": "MOD", "result": "EQUAL",
                                   "mod_revision": "1"}], [])
        assert not ok
        rev, kvs = await client.get_prefix("/c/")
        assert rev == r2 and [(kv.key, kv.value) for kv in kvs] == [("/c/a", b"1"), ("/c/b", b"2")]

        watched = []

        async def watch():
            async for revision, events in client.watch("/c/", r2 + 1):
                watched.append((revision, [(e.type, e.kv.key) for e in events]))
                return

        task = asyncio.create_task(watch())
        await asyncio.sleep(0.3)
        async with EtcdClient(etcd.endpoints) as other:
            r3 = await other.put("/c/a", "3")
        await asyncio.wait_for(task, 5)
        assert watched == [(r3, [("PUT", "/c/a")])]

        await client.compact(r3)
        with pytest.raises(EtcdCompacted):
            async for _ in client.watch("/c/", r1):
                pass


def layout_b64(text: str) -> str:
    from node.fleet.etcd import b64

    return b64(text)


# ------------------------------------------------------------------------------ the fleet


async def test_apply_reaches_every_node_at_one_revision(etcd, tmp_path):
    async with fleet_nodes(tmp_path, etcd.endpoints, 2) as nodes:
        await wait_for(lambda: all(not n.member.source.stale for n in nodes), 5, "nodes reading etcd")
        f = vip_file(tmp_path, "web.yaml", [vip("web", "10.100.0.1"), vip("api", "10.100.0.2")])
        out = await fleet(etcd.endpoints, "apply", str(f))
        assert out.returncode == 0, out.stderr
        assert "add       api" in out.stdout and "add       web" in out.stdout
        for n in nodes:
            n.all_up()
        await wait_for(lambda: all(set(n.c.vips) == {"web", "api"} for n in nodes), 5, "VIPs on both nodes")
        await wait_for(lambda: all(n.digest("web") for n in nodes), 5, "tables built")
        assert nodes[0].revision == nodes[1].revision > 0
        assert nodes[0].digest("web") == nodes[1].digest("web")
        assert nodes[0].c.status()["config_source"]["revision"] == nodes[0].revision

        # Both registered; the fleet view agrees (exit 0) and names the revision.
        out = await fleet(etcd.endpoints, "status", "--json")
        await wait_for(lambda: all(n.member.registry.published and n.member.registry.published["vips"].get("web", {}).get("digest")
                                   for n in nodes), 5, "records published")
        out = await fleet(etcd.endpoints, "status", "--json")
        view = json.loads(out.stdout)
        assert out.returncode == 0, out.stdout
        assert [x["node_id"] for x in view["nodes"]] == ["n0", "n1"]
        assert view["revisions"] == [nodes[0].revision] and view["differing"] == []

        # Re-applying the same file is a no-op: no new revision, nothing reloaded.
        before = await etcd_revision(etcd.endpoints)
        out = await fleet(etcd.endpoints, "apply", str(f))
        assert out.returncode == 0 and "unchanged web" in out.stdout
        assert await etcd_revision(etcd.endpoints) == before

        # get prints a VIP file that round-trips; delete removes the VIP everywhere.
        out = await fleet(etcd.endpoints, "get", "web")
        assert yaml.safe_load(out.stdout)["vips"][0]["name"] == "web"
        out = await fleet(etcd.endpoints, "delete", "api")
        assert out.returncode == 0, out.stderr
        await wait_for(lambda: all(set(n.c.vips) == {"web"} for n in nodes), 5, "api deleted on both")
        assert nodes[0].revision == nodes[1].revision


async def test_bad_object_refused_changes_nothing(etcd, tmp_path):
    node = FleetNode(tmp_path, "n0", etcd.endpoints)
    await node.start()
    try:
        good = vip_file(tmp_path, "good.yaml", [vip("web", "10.100.0.1")])
        assert (await fleet(etcd.endpoints, "apply", str(good))).returncode == 0
        await wait_for(lambda: "web" in node.c.vips, 5, "web applied")
        revision = await etcd_revision(etcd.endpoints)
        applied = node.revision

        # A non-prime table, and a VIP overlapping one already in etcd: both refused by name.
        bad = vip_file(tmp_path, "bad.yaml", [vip("web2", "10.100.0.3", table_size=250)])
        out = await fleet(etcd.endpoints, "apply", str(bad))
        assert out.returncode == 2 and "table_size 250 is not prime" in out.stderr and "web2" in out.stderr
        clash = vip_file(tmp_path, "clash.yaml", [vip("other", "10.100.0.1")])
        out = await fleet(etcd.endpoints, "apply", str(clash))
        assert out.returncode == 2 and "overlaps VIP 'web'" in out.stderr

        assert await etcd_revision(etcd.endpoints) == revision
        assert set(node.c.vips) == {"web"} and node.revision == applied

        # diff shows a change without writing it.
        changed = vip_file(tmp_path, "changed.yaml", [vip("web", "10.100.0.1", backends=("10.0.1.1",))])
        out = await fleet(etcd.endpoints, "diff", str(changed))
        assert out.returncode == 0 and "change    web" in out.stdout and "-  - address: 10.0.1.2" in out.stdout
        assert await etcd_revision(etcd.endpoints) == revision
    finally:
        await node.stop()


async def test_node_keeps_last_good_when_a_revision_is_bad_for_it(etcd, tmp_path):
    """An object written around `maglev fleet` (etcdctl) that fails validation on the node:
    the revision is refused whole, the last good set is kept, and the refusal is reported."""
    node = FleetNode(tmp_path, "n0", etcd.endpoints)
    await node.start()
    try:
        assert (await fleet(etcd.endpoints, "apply", str(vip_file(tmp_path, "a.yaml", [vip("web", "10.100.0.1")])))).returncode == 0
        await wait_for(lambda: "web" in node.c.vips, 5, "web applied")
        good = node.revision
        async with EtcdClient(etcd.endpoints) as client:
            bad = json.dumps(vip("web2", "10.100.0.2", table_size=250))
            ok, rev = await client.txn([], [{"requestPut": {"key": layout_b64(layout.vip_key("/t/", "web2")), "value": layout_b64(bad)}},
                                            {"requestPut": {"key": layout_b64(layout.vip_key("/t/", "web")), "value": layout_b64(json.dumps(vip("web", "10.100.0.1", backends=("10.0.1.9",))))}}])
        await wait_for(lambda: node.member.source.rejected, 5, "revision rejected")
        assert node.member.source.rejected["revision"] == rev
        assert any("table_size 250 is not prime" in p for p in node.member.source.rejected["problems"])
        # All or nothing: the valid half of the transaction (web's new backend) is not applied.
        assert set(node.c.vips) == {"web"} and str(node.c.vips["web"].backends[0].address) == "10.0.1.1"
        assert node.revision == good
        assert "config_rejected" in node.event_names()

        # What the refusal tells the operator to do works: `fleet apply` of anything else is
        # refused, naming the invalid object; a file that replaces it goes through.
        out = await fleet(etcd.endpoints, "apply", str(vip_file(tmp_path, "c.yaml", [vip("api", "10.100.0.3")])))
        assert out.returncode == 2 and "invalid object(s) in etcd: web2" in out.stderr, out.stderr
        assert "table_size 250 is not prime" in out.stderr
        out = await fleet(etcd.endpoints, "get")
        assert out.returncode == 2 and "invalid object(s) in etcd: web2" in out.stderr, out.stderr
        fixed = vip_file(tmp_path, "fixed.yaml", [vip("web2", "10.100.0.2")])
        out = await fleet(etcd.endpoints, "apply", str(fixed))
        assert out.returncode == 0 and "change    web2" in out.stdout, out.stdout + out.stderr
        await wait_for(lambda: "web2" in node.c.vips and not node.member.source.rejected, 5, "the fix applied")
        # So does deleting one: a second invalid object, then `fleet delete` of it.
        async with EtcdClient(etcd.endpoints) as client:
            await client.put(layout.vip_key("/t/", "junk"), "{not json")
        out = await fleet(etcd.endpoints, "delete", "junk")
        assert out.returncode == 0, out.stdout + out.stderr
        await wait_for(lambda: not node.member.source.rejected and set(node.c.vips) == {"web", "web2"}, 5,
                       "the revision without junk applied")
    finally:
        await node.stop()


async def test_etcd_lost_keeps_serving_reports_stale_and_catches_up(etcd, tmp_path):
    node = FleetNode(tmp_path, "n0", etcd.endpoints)
    await node.start()
    try:
        assert (await fleet(etcd.endpoints, "apply", str(vip_file(tmp_path, "a.yaml", [vip("web", "10.100.0.1")])))).returncode == 0
        node.all_up()
        await wait_for(lambda: node.c.desired and node.c.desired.vips.get("web") and node.c.desired.vips["web"].announce,
                       5, "web announced")
        good = node.revision

        etcd.stop()
        await wait_for(lambda: node.member.source.stale, 5, "stale reported")
        assert "config_source_stale" in node.event_names()
        status = node.c.status()["config_source"]
        assert status["stale"] and status["revision"] == good
        metrics = node_metrics(node)
        assert metrics["maglev_config_source_stale"] == 1 and metrics["maglev_config_revision"] == good
        await asyncio.sleep(1.0)
        assert node.c.desired.vips["web"].announce and set(node.c.vips) == {"web"}  # nothing withdrawn
    finally:
        await node.stop()

    # A restart without etcd serves the persisted last good config.
    again = FleetNode(tmp_path, "n0", etcd.endpoints)
    await again.start()
    try:
        assert set(again.c.vips) == {"web"} and again.revision == good
        assert again.c.status()["config_source"]["served_from_cache"]

        # etcd returns with a change made meanwhile: the node catches up by a full re-read.
        etcd.restart(etcd.members[0])
        await wait_for(lambda: not again.member.source.stale, 10, "fresh again")
        out = await fleet(etcd.endpoints, "apply", str(vip_file(tmp_path, "b.yaml", [vip("api", "10.100.0.2")])))
        assert out.returncode == 0, out.stderr
        await wait_for(lambda: set(again.c.vips) == {"web", "api"}, 5, "api applied after the outage")
        assert again.revision > good
    finally:
        await again.stop()


def node_metrics(node: FleetNode) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from node import metrics

    out = {}
    for family in text_string_to_metric_families(metrics.render(node.c, {})):
        for s in family.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


async def test_one_member_killed_changes_nothing(etcd3, tmp_path):
    async with fleet_nodes(tmp_path, etcd3.endpoints, 2) as nodes:
        assert (await fleet(etcd3.endpoints, "apply", str(vip_file(tmp_path, "a.yaml", [vip("web", "10.100.0.1")])))).returncode == 0
        await wait_for(lambda: all("web" in n.c.vips for n in nodes), 5, "web on both")
        stale_events = [n.member.source.stale_events for n in nodes]
        etcd3.members[0].kill()
        # The fleet still takes changes through the surviving quorum, and the nodes follow.
        out = await fleet(etcd3.endpoints, "apply", str(vip_file(tmp_path, "b.yaml", [vip("api", "10.100.0.2")])))
        assert out.returncode == 0, out.stderr
        await wait_for(lambda: all("api" in n.c.vips for n in nodes), 10, "api on both with a member down")
        assert nodes[0].revision == nodes[1].revision
        assert not any(n.member.source.stale for n in nodes)
        assert set(nodes[0].c.vips) == {"web", "api"}
        # A node whose member died moved to another one within STALE_AFTER: never stale.
        assert [n.member.source.stale_events for n in nodes] == stale_events


async def test_differing_health_view_is_flagged_with_the_backend(etcd, tmp_path):
    async with fleet_nodes(tmp_path, etcd.endpoints, 2) as nodes:
        assert (await fleet(etcd.endpoints, "apply", str(vip_file(tmp_path, "a.yaml", [vip("web", "10.100.0.1")])))).returncode == 0
        await wait_for(lambda: all("web" in n.c.vips for n in nodes), 5, "web on both")
        for n in nodes:
            n.all_up()
        nodes[1].health.set("10.0.1.2", State.DOWN)
        nodes[1].c.mark_dirty()

        def flagged() -> bool:
            fleet_view = nodes[0].member.monitor.last
            return bool(fleet_view and fleet_view["differing"] == ["web"])

        await wait_for(flagged, 5, "the monitor flags web")
        out = await fleet(etcd.endpoints, "status")
        assert out.returncode == 3, out.stdout
        assert "VIP web: DIGESTS DIFFER" in out.stdout
        assert "different health view of backend 10.0.1.2: down on n1; up on n0" in out.stdout
        assert "different revision" not in out.stdout
        from node import metrics as m

        text = m.render(nodes[0].c, {})
        assert 'maglev_fleet_vip_digest_mismatch{vip="web"} 1' in text
        # Every series the shipped alert rules name is one a fleet node exports.
        import re

        rules = yaml.safe_load((REPO / "configs/prometheus/fleet-rules.yml").read_text())
        named = {n for g in rules["groups"] for r in g["rules"]
                 for n in re.findall(r"\bmaglev_[a-z_]+", r["expr"] + str(r.get("annotations")))}
        exported = set(re.findall(r"^(maglev_[a-z_]+)", text, re.M))
        assert named and named <= exported, named - exported

        # An operator override on one node is named as such.
        nodes[1].health.set("10.0.1.2", State.UP)
        nodes[1].c.set_backend_state("web", "10.0.1.3", "drain")
        await wait_for(lambda: nodes[0].member.monitor.last and any(
            "operator override of backend 10.0.1.3 on n1 (drain)" in r
            for r in nodes[0].member.monitor.last["vips"]["web"]["reasons"]), 5, "override flagged")


DEAD_NODE = textwrap.dedent("""
    import asyncio, sys
    from node.fleet.etcd import EtcdClient
    from node.fleet.registry import NodeRegistry
    from node.events import EventLog

    async def main():
        client = EtcdClient(sys.argv[1].split(","))
        reg = NodeRegistry(client, "/t/", "doomed", 2, lambda: {"node_id": "doomed", "revision": 1, "vips": {}},
                           EventLog())
        task = asyncio.create_task(reg.run())
        while not reg.registered:
            await asyncio.sleep(0.05)
        print("registered", flush=True)
        await task

    asyncio.run(main())
""")


async def test_dead_node_leaves_the_registry_when_its_lease_expires(etcd, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", DEAD_NODE, ",".join(etcd.endpoints)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line.strip() == "registered"
        view = json.loads((await fleet(etcd.endpoints, "status", "--json")).stdout)
        assert [n["node_id"] for n in view["nodes"]] == ["doomed"]
        await asyncio.sleep(3)  # alive past its TTL: the keep-alives hold it
        view = json.loads((await fleet(etcd.endpoints, "status", "--json")).stdout)
        assert [n["node_id"] for n in view["nodes"]] == ["doomed"]
        proc.kill()  # no revoke: only the lease's expiry can remove it
        proc.wait(5)

        async def gone() -> bool:
            return json.loads((await fleet(etcd.endpoints, "status", "--json")).stdout)["nodes"] == []

        deadline = time.monotonic() + 10
        while not await gone():
            assert time.monotonic() < deadline, "the dead node's record outlived its lease"
            await asyncio.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_node_api_serves_the_fleet_and_refuses_local_vip_writes(etcd, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    from node.api import make_app

    node = FleetNode(tmp_path, "n0", etcd.endpoints)
    await node.start()
    client = TestClient(TestServer(make_app(node.c, "tok")))
    await client.start_server()
    try:
        assert (await fleet(etcd.endpoints, "apply", str(vip_file(tmp_path, "a.yaml", [vip("web", "10.100.0.1")])))).returncode == 0
        await wait_for(lambda: node.member.registry.published and "web" in node.member.registry.published["vips"],
                       5, "record with web")
        resp = await client.get("/api/v1/fleet")
        body = await resp.json()
        assert resp.status == 200 and [n["node_id"] for n in body["nodes"]] == ["n0"]
        assert body["revisions"] == [node.revision] and "web" in body["vips"]

        resp = await client.put("/api/v1/vips/x", json=vip("x", "10.100.0.9"), headers={"Authorization": "Bearer tok"})
        assert resp.status == 409 and "maglev fleet apply" in (await resp.json())["error"]
        assert set(node.c.vips) == {"web"}

        etcd.stop()
        resp = await client.get("/api/v1/fleet")
        assert resp.status == 503 and "cannot read the fleet registry" in (await resp.json())["error"]
        await wait_for(lambda: node.member.source.stale, 5, "stale")
        status = await (await client.get("/api/v1/status")).json()
        assert status["config_source"]["stale"] and status["config_source"]["revision"] == node.revision

        # The status page says it too, as a real browser renders it.
        dom = await chromium_dom(str(client.make_url("/?refresh=0")))
        assert f'<span id="config-revision">{node.revision}</span>' in dom, dom[-3000:]
        assert 'id="config-stale">STALE</span>' in dom and "serving the last good config" in dom
    finally:
        await client.close()
        await node.stop()


async def chromium_dom(url: str) -> str:
    """The DOM of ``url`` after a real headless Chromium loaded it (on this host's loopback)."""
    profile = tempfile.mkdtemp(prefix="mlbchrome")
    try:
        r = await asyncio.to_thread(subprocess.run, ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                                     "--dump-dom", url], capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert r.returncode == 0 and "<h1>" in r.stdout, r.stderr[-2000:]
    return r.stdout


async def test_auth_and_tls_options(tmp_path):
    """A member with client TLS and auth enabled (certificates made here with openssl): the
    node file's ca_file/cert_file/key_file and username/password_file get in; a wrong password
    gets a clear refusal, not a hang."""
    from lab.etcd import EtcdMember, free_port
    from node.config import EtcdConfig
    from node.fleet.etcd import EtcdError

    certs = make_certs(tmp_path / "pki")
    m = EtcdMember("tls", "127.0.0.1", free_port(), free_port(), tmp_path / "tls", tmp_path / "tls.log",
                   cluster_token=f"tls-{os.getpid()}")
    tls = ["--cert-file", str(certs["server.pem"]), "--key-file", str(certs["server.key"]),
           "--client-cert-auth", "--trusted-ca-file", str(certs["ca.pem"])]
    argv = m.argv(f"tls={m.peer_url}")
    url = f"https://127.0.0.1:{m.client_port}"
    argv = [url if a == m.client_url else a for a in argv] + tls
    with open(m.log, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    try:
        ctl = ["etcdctl", "--endpoints", url, "--cacert", str(certs["ca.pem"]), "--cert", str(certs["client.pem"]),
               "--key", str(certs["client.key"])]
        deadline = time.monotonic() + 20
        while subprocess.run([*ctl, "endpoint", "health"], capture_output=True, env={"ETCDCTL_API": "3"}).returncode:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "tls.log").read_text()[-2000:]
            await asyncio.sleep(0.2)
        for cmd in (["user", "add", "root:rootpw"], ["user", "add", "maglev:s3cret"], ["role", "add", "fleet"],
                    ["role", "grant-permission", "fleet", "--prefix=true", "readwrite", "/t/"],
                    ["user", "grant-role", "maglev", "fleet"], ["auth", "enable"]):
            out = subprocess.run([*ctl, *cmd], capture_output=True, text=True, env={"ETCDCTL_API": "3"})
            assert out.returncode == 0, out.stderr
        (tmp_path / "pw").write_text("s3cret\n")
        (tmp_path / "bad").write_text("nope\n")
        cfg = EtcdConfig(endpoints=[url], ca_file=certs["ca.pem"], cert_file=certs["client.pem"],
                         key_file=certs["client.key"], username="maglev", password_file=tmp_path / "pw")
        async with EtcdClient.from_config(cfg) as client:
            await client.put("/t/config/vips/x", "{}")
            assert [kv.key for kv in (await client.get_prefix("/t/"))[1]] == ["/t/config/vips/x"]
            with pytest.raises(EtcdError, match="permission denied"):
                await client.put("/other", "1")  # the role covers /t/ only
        bad = cfg.model_copy(update={"password_file": tmp_path / "bad"})
        async with EtcdClient.from_config(bad) as client:
            with pytest.raises(EtcdError, match="refused user 'maglev'"):
                await client.get_prefix("/t/")
        no_cert = cfg.model_copy(update={"cert_file": None, "key_file": None})
        async with EtcdClient.from_config(no_cert) as client:
            with pytest.raises(EtcdError):
                await client.get_prefix("/t/")
    finally:
        proc.terminate()
        proc.wait(10)


def make_certs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        # No CN on the client's: etcd's gateway refuses a client certificate with a CN when auth
        # is on (the CN would be mistaken for a user name), see the README.
        subject = "/CN=server" if name == "server" else "/O=maglev-node"
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.cnf", "-out", f"{name}.pem")
    return {p.name: p for p in d.iterdir()}
