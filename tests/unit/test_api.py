"""The HTTP API over a controller with fake components: token enforcement, validation errors that
change nothing, VIP objects written atomically, operator actions, and a metrics scrape that a
Prometheus parser accepts."""

from __future__ import annotations

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from healthcheck import State
from node.api import make_app
from tests.unit.test_controller import Env, vip

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def api(tmp_path):
    env = Env(tmp_path, [vip()])
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    client = TestClient(TestServer(make_app(env.c, TOKEN)))
    await client.start_server()
    yield env, client
    await client.close()


async def test_status_and_vips(api):
    env, client = api
    r = await client.get("/api/v1/status")
    s = await r.json()
    assert r.status == 200 and s["node_id"] == "lb-1" and s["vips"]["web"]["announced"] is True
    r = await client.get("/api/v1/vips/web")
    v = await r.json()
    assert v["announced"] and v["digest"] == env.c.desired.vips["web"].table.digest()
    shares = {b["key"]: b["table_share"] for b in v["backends"]}
    assert abs(sum(shares.values()) - 1) < 1e-9 and all(0.3 < s < 0.37 for s in shares.values())
    r = await client.get("/api/v1/vips/nope")
    assert r.status == 404 and "no VIP named 'nope'" in (await r.json())["error"]


async def test_writes_need_the_token(api):
    env, client = api
    r = await client.post("/api/v1/node/drain")
    assert r.status == 401 and "bearer token" in (await r.json())["error"]
    r = await client.post("/api/v1/node/drain", headers={"Authorization": "Bearer wrong"})
    assert r.status == 401
    assert env.c.node_drained is False
    r = await client.post("/api/v1/node/drain", headers=AUTH)
    assert r.status == 200 and env.c.node_drained is True
    assert env.speaker.prefixes == []


async def test_backend_actions(api):
    env, client = api
    r = await client.post("/api/v1/vips/web/backends/10.0.1.2/drain", headers=AUTH)
    body = await r.json()
    assert r.status == 200
    b = {x["key"]: x for x in body["backends"]}["10.0.1.2"]
    assert b["state"] == "drain" and b["table_share"] == 0.0
    assert env.forwarder.last["web"]["states"]["10.0.1.2"] == "drain"
    r = await client.post("/api/v1/vips/web/backends/10.0.1.2/undrain", headers=AUTH)
    assert {x["key"]: x for x in (await r.json())["backends"]}["10.0.1.2"]["state"] == "active"
    r = await client.post("/api/v1/vips/web/backends/10.9.9.9/drain", headers=AUTH)
    assert r.status == 404 and "has no backend '10.9.9.9'" in (await r.json())["error"]
    r = await client.post("/api/v1/vips/web/backends/10.0.1.2/explode", headers=AUTH)
    assert r.status == 400


async def test_put_bad_vip_is_400_and_changes_nothing(api):
    env, client = api
    before = sorted(p.name for p in env.vip_dir.iterdir())
    r = await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.2", table_size=100), headers=AUTH)
    body = await r.json()
    assert r.status == 400 and any("table_size 100 is not prime" in p for p in body["problems"])
    assert sorted(p.name for p in env.vip_dir.iterdir()) == before and sorted(env.c.vips) == ["web"]
    # Overlaps an existing VIP: 409, nothing written.
    r = await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.1"), headers=AUTH)
    assert r.status == 409 and "overlaps VIP 'web'" in " ".join((await r.json())["problems"])
    assert sorted(p.name for p in env.vip_dir.iterdir()) == before


async def test_put_and_delete_vip(api):
    env, client = api
    r = await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.2"), headers=AUTH)
    assert r.status == 201, await r.text()
    written = yaml.safe_load((env.vip_dir / "api.yaml").read_text())
    assert written["vips"][0]["name"] == "api" and written["vips"][0]["address"] == "10.100.0.2"
    assert sorted(env.c.vips) == ["api", "web"]
    assert not [p for p in env.vip_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    r = await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.3"), headers=AUTH)
    assert r.status == 200 and str(env.c.vips["api"].address) == "10.100.0.3"
    # A VIP defined in an operator's file is not the API's to delete.
    r = await client.delete("/api/v1/vips/web", headers=AUTH)
    assert r.status == 409 and "main.yaml" in (await r.json())["error"]
    r = await client.delete("/api/v1/vips/api", headers=AUTH)
    assert r.status == 200 and sorted(env.c.vips) == ["web"] and not (env.vip_dir / "api.yaml").exists()


async def test_metrics_parse(api):
    env, client = api
    r = await client.get("/metrics")
    text = await r.text()
    assert r.status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    announced = {s.labels["vip"]: s.value for s in families["maglev_vip_announced"].samples}
    assert announced == {"web": 1.0}
    health = {(s.labels["backend"], s.labels["health"]) for s in families["maglev_backend_health"].samples}
    assert ("10.0.1.1", "up") in health
    assert "maglev_config_reloads" in families  # counters lose _total in the parser's family name
    assert families["maglev_forwarder_up"].samples[0].value == 1.0


async def test_trace_matches_the_model(api):
    from node.forwarder import model

    env, client = api
    r = await client.get("/api/v1/vips/web/trace", params={"src": "192.0.2.7:40000"})
    t = await r.json()
    assert r.status == 200, t
    table = env.c.desired.vips["web"].table
    h = model.flow_hash(model.Flow.of("192.0.2.7", "10.100.0.1", 40000, 80, "tcp"))
    assert t["hash"] == h and t["digest"] == table.digest()
    assert t["backend"] == table.backends[table.entries[model.table_index(h, table.size)]]
    # Different sources spread over every serving backend.
    seen = set()
    for port in range(40000, 40060):
        r = await client.get("/api/v1/vips/web/trace", params={"src": f"192.0.2.7:{port}"})
        seen.add((await r.json())["backend"])
    assert seen == {"10.0.1.1", "10.0.1.2", "10.0.1.3"}
    r = await client.get("/api/v1/vips/web/trace", params={"src": "fd00::1:5"})
    assert r.status == 400
    r = await client.get("/api/v1/vips/web/trace", params={"src": "[fd00::1]:5"})
    assert r.status == 400 and "is IPv6 but VIP web is IPv4" in (await r.json())["error"]


async def test_metrics_count_table_builds(api):
    env, client = api
    text = await (await client.get("/metrics")).text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["maglev_table_builds"].samples[0].value >= 1
    assert families["maglev_table_last_build_seconds"].samples[0].value > 0
