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
    # A fixed tables map (configs/node.yaml leaves it unset: sized from the VIPs at start).
    fwd = env.c.config.forwarder.model_copy(update={"table_capacity": 4194304})
    env.c.config = env.c.config.model_copy(update={"forwarder": fwd})
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


async def test_a_vip_file_that_cannot_be_written_is_a_clear_error_and_changes_nothing(api, monkeypatch):
    """An OSError writing or deleting a VIP file (a full disk, a read-only directory) is an
    answer naming the file and the reason, not an unhandled 500; nothing changes."""
    import os
    from pathlib import Path

    env, client = api
    # A real failure for root: the temp file's name is taken by a directory.
    blocker = env.vip_dir / f".api.yaml.tmp{os.getpid()}"
    blocker.mkdir()
    r = await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.2"), headers=AUTH)
    body = await r.json()
    assert r.status == 500 and f"cannot write {env.vip_dir / 'api.yaml'}" in body["error"], body
    assert "nothing was changed" in body["error"]
    assert sorted(env.c.vips) == ["web"] and not (env.vip_dir / "api.yaml").exists()
    blocker.rmdir()
    r = await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.2"), headers=AUTH)
    assert r.status == 201, await r.text()

    def refuse(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    r = await client.delete("/api/v1/vips/api", headers=AUTH)
    body = await r.json()
    assert r.status == 500 and "cannot delete" in body["error"] and "Permission denied" in body["error"], body
    assert sorted(env.c.vips) == ["api", "web"]


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


# ---------------------------------------------------------------- writes that cannot brick a node


def files(env) -> list[str]:
    return sorted(p.name for p in env.vip_dir.iterdir())


def next_start_problems(env) -> list:
    """What `maglev node` would say at its next start about the directory left behind."""
    from node.config import ConfigError, check_vips_for_node, load_vip_sources

    try:
        sources = load_vip_sources(env.vip_dir)
    except ConfigError as exc:
        return exc.problems
    return check_vips_for_node({n: v for n, (_, v) in sources.items()}, env.c.config, "start")


async def test_put_over_capacity_writes_nothing_and_the_node_stays_editable(api):
    env, client = api
    # table_capacity 4194304 (the fixture); the VIPs take every table_size plus the largest
    # once (to rebuild in): 'web' + 1500007 fits, a second one does not.
    big = vip("big", "10.100.0.2", table_size=1500007)
    r = await client.put("/api/v1/vips/big", json=big, headers=AUTH)
    assert r.status == 201, await r.text()
    r = await client.put("/api/v1/vips/big2", json=vip("big2", "10.100.0.3", table_size=1500007), headers=AUTH)
    body = await r.json()
    assert r.status == 409 and "nothing was changed" in body["error"]
    assert any("table_capacity is 4194304" in p for p in body["problems"])
    assert files(env) == ["big.yaml", "main.yaml"] and sorted(env.c.vips) == ["big", "web"]
    assert env.c.last_reload.ok and next_start_problems(env) == []
    # Later writes still work, and so does a delete.
    r = await client.put("/api/v1/vips/small", json=vip("small", "10.100.0.4"), headers=AUTH)
    assert r.status == 201
    r = await client.delete("/api/v1/vips/big", headers=AUTH)
    assert r.status == 200 and (await r.json())["reload"]["ok"] is True
    assert sorted(env.c.vips) == ["small", "web"]


async def test_concurrent_puts_are_serialised(api):
    """The old API checked each PUT alone against the directory: 50 concurrent PUTs left 50 files
    for 29 served VIPs, and a node that could not start again."""
    env, client = api
    # 262139-entry tables: 14 fit next to 'web' (251 + 14 x 262139 + 262139 to rebuild in <= 4194304).
    import asyncio

    async def put(i):
        r = await client.put(f"/api/v1/vips/v{i}", json=vip(f"v{i}", f"10.100.1.{i}", table_size=262139),
                             headers=AUTH)
        return r.status, (await r.json()).get("error", "")

    answers = await asyncio.gather(*(put(i) for i in range(20)))
    statuses = [s for s, _ in answers]
    assert statuses.count(201) == 14 and statuses.count(409) == 6, answers
    # Serialised: each refusal came from the check before writing, never from a written file
    # the reload then rejected (which would be a rejected reload and a rollback).
    assert all("would be rejected by a reload" in e for s, e in answers if s == 409), answers
    assert env.c.metrics.reloads.get(False, 0) == 0
    assert len(files(env)) == 15 and len(env.c.vips) == 15  # every file on disk is served
    assert next_start_problems(env) == []


async def test_delete_an_api_vip_while_another_file_is_broken(api):
    env, client = api
    assert (await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.2"), headers=AUTH)).status == 201
    (env.vip_dir / "broken.yaml").write_text("vips: [{name: broken, address: nope}]\n")
    r = await client.put("/api/v1/vips/other", json=vip("other", "10.100.0.3"), headers=AUTH)
    body = await r.json()
    assert r.status == 409 and any("broken.yaml" in p for p in body["problems"])
    assert not (env.vip_dir / "other.yaml").exists()
    r = await client.delete("/api/v1/vips/api", headers=AUTH)
    body = await r.json()
    assert r.status == 200 and not (env.vip_dir / "api.yaml").exists()
    assert body["reload"]["ok"] is False and "last good config" in body["warning"]
    assert any("broken.yaml" in p for p in body["reload"]["problems"])


async def test_delete_a_file_the_api_wrote_that_is_not_served(api):
    """What the old API left behind: its own file, valid alone, that the node rejects (over
    capacity), so the VIP was never served; DELETE answered 404 and the node could not start."""
    env, client = api
    from node.api import API_FILE_HEADER

    huge = yaml.safe_dump({"vips": [vip("huge", "10.100.0.9", table_size=2097143)]})
    (env.vip_dir / "huge.yaml").write_text(API_FILE_HEADER + huge)
    assert not (await env.c.reload("test")).ok and "huge" not in env.c.vips
    r = await client.delete("/api/v1/vips/huge", headers=AUTH)
    assert r.status == 200 and (await r.json())["reload"]["ok"] is True
    assert files(env) == ["main.yaml"] and next_start_problems(env) == []
    # Its own file, even broken beyond parsing, is still the API's to delete.
    (env.vip_dir / "gone.yaml").write_text(API_FILE_HEADER + "vips: [{{{\n")
    assert (await client.delete("/api/v1/vips/gone", headers=AUTH)).status == 200
    # An operator's broken file is not.
    (env.vip_dir / "hand.yaml").write_text("vips: [{{{\n")
    r = await client.delete("/api/v1/vips/hand", headers=AUTH)
    assert r.status == 409 and "not written by the API" in (await r.json())["error"]
    assert (env.vip_dir / "hand.yaml").exists()
    r = await client.delete("/api/v1/vips/never", headers=AUTH)
    assert r.status == 404


async def test_a_write_the_reload_rejects_is_rolled_back(api, monkeypatch):
    """The directory can change by hand between the check and the reload: the write is undone."""
    env, client = api
    real = env.c.reload

    async def edit_then_reload(source):
        if source.startswith("PUT"):
            (env.vip_dir / "late.yaml").write_text(yaml.safe_dump({"vips": [vip("late", "10.100.0.2")]}))
        return await real(source)

    monkeypatch.setattr(env.c, "reload", edit_then_reload)
    r = await client.put("/api/v1/vips/api", json=vip("api", "10.100.0.2"), headers=AUTH)
    assert r.status == 409 and "rolled back" in (await r.json())["error"]
    assert not (env.vip_dir / "api.yaml").exists() and "api" not in env.c.vips


@pytest.mark.parametrize("name", ["web%0A", "web%0D", "-web", ".hidden", "a%20b", "x" * 64, "caf%C3%A9",
                                  "x%00y"])
async def test_bad_vip_names_are_refused_before_the_disk(api, name):
    env, client = api
    before = files(env)
    r = await client.put(f"/api/v1/vips/{name}", json={"address": "10.100.0.2", "port": 80}, headers=AUTH)
    assert r.status == 400 and "invalid VIP name" in (await r.json())["error"]
    r = await client.delete(f"/api/v1/vips/{name}", headers=AUTH)
    assert r.status == 400
    assert files(env) == before


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"address": "10.100.0.2", "port": 80, "backends": ' + b"[" * 40 + b"]" * 40 + b"}",
    b"[1, 2]", b'"text"', b"42", b"null", b"true",
    b'{"address": "10.100.0.2", "port": ' + b"9" * 5000 + b"}",
    b'{"address": "10.100.0.2", "port": 80, "table_size": 10000000000000000000000001}',
    b'{"address": "10.100.0.2", "port": 80, "backends": [{"address": "10.0.1.1", "weight": 1e400}]}',
    b'{"address": "10.100.0.2", "port": NaN}',
    b'{"address": "\xff\xfe"}',
    b'{"address": ',
    b"",
])
async def test_malformed_json_is_400(api, raw):
    env, client = api
    before = files(env)
    r = await client.put("/api/v1/vips/api", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 400, await r.text()
    assert "error" in await r.json()
    assert files(env) == before


async def test_body_over_the_limit_is_413(api):
    env, client = api
    r = await client.put("/api/v1/vips/api", data=b" " * (1024 * 1024 + 1), headers=AUTH)
    assert r.status == 413 and files(env) == ["main.yaml"]


def test_token_file_readable_by_others_is_a_warning(tmp_path):
    from node.api import token_file_warnings

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    token.chmod(0o600)
    assert token_file_warnings(token) == []
    token.chmod(0o640)  # a group of operators may share it
    assert token_file_warnings(token) == []
    token.chmod(0o644)
    (warning,) = token_file_warnings(token)
    assert str(token) in warning and "mode 0644" in warning and "chmod o-rw" in warning
