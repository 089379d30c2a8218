"""The status page and the read-only routes over a controller with fake components (the real
browser test is tests/integration/test_observability.py): what the page holds, its asset from
the package, escaping, the refresh switch, and the events/conntrack routes' validation."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from healthcheck import State
from node.api import make_app
from tests.unit.test_controller import Env, vip


@pytest.fixture
async def client(tmp_path):
    env = Env(tmp_path, [vip()])
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2"):
        env.health.set(a, State.UP)
    env.health.set("10.0.1.3", State.DOWN)
    await env.c.reconcile()
    client = TestClient(TestServer(make_app(env.c, "t")))
    await client.start_server()
    yield env, client
    await client.close()


async def test_page_shows_vips_backends_and_events(client):
    env, c = client
    env.events.emit("probe_note", "a <script>alert(1)</script> in a message", vip="web")
    r = await c.get("/")
    page = await r.text()
    assert r.status == 200 and r.content_type == "text/html"
    assert 'id="vip-web"' in page and "ANNOUNCED" in page and "10.100.0.1" in page
    assert page.count('class="backend up"') == 2 and page.count('class="backend down"') == 1
    for key, share in env.c.desired.vips["web"].table.shares().items():  # table share / expected
        assert f"{share:.1%} / 50.0%" in page, key
    assert "0.0% / 0.0%" in page  # the down backend: no entries, none expected
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<meta http-equiv="refresh" content="5">' in page
    assert 'href="/status.css"' in page and "//" not in page.split("<body>")[0].replace("http-equiv", "")
    r = await c.get("/status.css")
    assert r.status == 200 and r.content_type == "text/css" and ".bar" in await r.text()


async def test_refresh_can_be_turned_off_and_is_checked(client):
    _, c = client
    page = await (await c.get("/?refresh=0")).text()
    assert "http-equiv" not in page and "auto-refresh off" in page
    r = await c.get("/?refresh=soon")
    assert r.status == 400 and "refresh='soon'" in (await r.json())["error"]


async def test_events_since_and_conntrack_validation(client):
    env, c = client
    events = (await (await c.get("/api/v1/events")).json())["events"]
    assert [e["event"] for e in events] == [e["event"] for e in env.events.recent]
    last = events[-1]["ts"]
    newer = (await (await c.get("/api/v1/events", params={"since": str(last)})).json())["events"]
    assert newer and all(e["ts"] >= last for e in newer)
    r = await c.get("/api/v1/events", params={"since": "yesterday"})
    assert r.status == 400 and "not a UNIX timestamp" in (await r.json())["error"]
    r = await c.get("/api/v1/conntrack", params={"vip": "nope"})
    assert r.status == 404 and "no VIP named 'nope'" in (await r.json())["error"]
    r = await c.get("/api/v1/conntrack", params={"limit": "0"})
    assert r.status == 400 and "limit must be between 1 and" in (await r.json())["error"]
    r = await c.get("/api/v1/conntrack")  # the fake forwarder has no conntrack map
    assert r.status == 503 and "cannot read the conntrack map" in (await r.json())["error"]


async def test_the_page_is_read_only(client):
    _, c = client
    for path in ("/", "/metrics", "/api/v1/events", "/api/v1/page"):
        r = await c.post(path)
        assert r.status in (401, 405), path


async def test_page_shows_a_de_preferred_vip_and_the_disable_file(client):
    env, c = client
    (env.c.run_dir / "disable").touch()
    env.c.disable.poll()
    await env.c.reconcile()
    page = await (await c.get("/?refresh=0")).text()
    assert '<span class="badge warn announce-state">DE-PREFERRED</span>' in page
    assert 'id="disabled"' in page and str(env.c.run_dir / "disable") in page
    assert "every VIP de-preferred" in page


async def test_page_shows_the_config_source(client):
    env, c = client
    page = await (await c.get("/?refresh=0")).text()
    assert f"<th>config source</th><td>directory {env.c.vip_dir}</td>" in page


def test_the_etcd_source_on_the_page_says_revision_stale_cache_and_refusal():
    from node.status_page import _config_source

    fresh = {"type": "etcd", "endpoint": "http://10.0.9.1:2379", "prefix": "/maglev/", "revision": 42,
             "stale": False, "stale_for": 0.0, "stale_reason": None, "rejected": None, "served_from_cache": False}
    text = _config_source(fresh)
    assert "etcd http://10.0.9.1:2379 /maglev/" in text and '<span id="config-revision">42</span>' in text
    assert 'id="config-stale">FRESH' in text and "cache" not in text and "REFUSED" not in text
    stale = {**fresh, "stale": True, "stale_for": 7.5, "stale_reason": "no etcd endpoint answered",
             "served_from_cache": True,
             "rejected": {"revision": 43, "problems": ["revision 43: web: table_size 250 is <not> prime"]}}
    text = _config_source(stale)
    assert 'id="config-stale">STALE</span> for 7.5 s (no etcd endpoint answered)' in text
    assert "serving the last good config" in text and "served from the local cache" in text
    assert "REFUSED</span> revision 43: revision 43: web: table_size 250 is &lt;not&gt; prime" in text
