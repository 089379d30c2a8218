"""/metrics through prometheus_client over a controller with fake components: exact counters,
every forwarder counter by reason, per-(VIP, backend) figures, shares and digests, the route as
the speaker confirmed it, durations as histograms, content negotiation, and an exposition that
the real `promtool check metrics` finds clean."""

from __future__ import annotations

import gzip
import shutil
import subprocess

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from healthcheck import State
from healthcheck.types import ProbeResult
from node import metrics
from node.api import make_app
from node.forwarder.maps import Stat
from tests.unit.test_controller import Env, vip

BIG = 123_456_789_012  # `%g` made this 1.23457e+11


def stats(packets: int) -> dict[str, int]:
    return {"packets": packets, "bytes": packets * 100, "new_flows": packets // 10, "ct_hits": packets // 2,
            "ct_misses": packets // 10}


def counters() -> dict:
    """What Forwarder.counters() returns for two VIPs sharing backend 10.0.1.1."""
    drops = {r.name.partition("_")[2].lower(): int(r) + 1 for r in Stat if r.name.startswith("DROP_")}
    events = {r.name.lower(): 1000 + int(r) for r in Stat if not r.name.startswith("DROP_")}
    return {
        "vips": {"web": stats(BIG), "api": stats(50)},
        "vip_backends": {"web": {"10.0.1.1": stats(BIG - 7), "10.0.1.2": stats(7)},
                         "api": {"10.0.1.1": stats(50)}},
        "backends": {"10.0.1.1": stats(BIG - 7 + 50), "10.0.1.2": stats(7)},
        "drops": drops, "events": events,
    }


@pytest.fixture
async def env(tmp_path):
    env = Env(tmp_path, [vip(), vip("api", "10.100.0.2", backends=("10.0.1.1",))])
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    env.forwarder.counters = counters
    return env


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, family: str, sample: str | None = None) -> dict:
    return {tuple(sorted(s.labels.items())): s.value for s in fams[family].samples
            if sample is None or s.name == sample}


async def test_counters_are_exact_and_per_vip_and_backend(env):
    fams = families(metrics.render(env.c, counters()))
    vip_packets = samples(fams, "maglev_vip_packets", "maglev_vip_packets_total")
    assert vip_packets[(("vip", "web"),)] == BIG  # every digit kept
    per = samples(fams, "maglev_backend_packets", "maglev_backend_packets_total")
    # The backend shared by two VIPs has one series per VIP, not their sum.
    assert per[(("backend", "10.0.1.1"), ("vip", "web"))] == BIG - 7
    assert per[(("backend", "10.0.1.1"), ("vip", "api"))] == 50
    for family in ("maglev_backend_bytes", "maglev_backend_new_flows", "maglev_backend_conntrack_hits"):
        assert len(fams[family].samples) == 3, family


async def test_every_forwarder_counter_is_exported_by_reason(env):
    fams = families(metrics.render(env.c, counters()))
    drops = {s.labels["reason"]: s.value for s in fams["maglev_forwarder_drops"].samples}
    events = {s.labels["event"]: s.value for s in fams["maglev_forwarder_events"].samples}
    assert len(drops) + len(events) == len(Stat)
    assert events["ct_insert_bypassed"] == 1000 + Stat.CT_INSERT_BYPASSED
    assert {"icmp_steered", "pass_malformed", "frag_forwarded"} <= set(events)
    assert drops["no_backend"] == 1


async def test_shares_digest_and_confirmed_route(env):
    d = env.c.desired.vips["web"]
    env.speaker.announced = lambda: set()  # decided, but ExaBGP has not acknowledged it yet
    fams = families(metrics.render(env.c, counters()))
    shares = {s.labels["backend"]: s.value for s in fams["maglev_backend_table_share"].samples
              if s.labels["vip"] == "web"}
    assert shares == pytest.approx(d.table.shares()) and sum(shares.values()) == pytest.approx(1)
    expected = {s.labels["backend"]: s.value for s in fams["maglev_backend_expected_share"].samples
                if s.labels["vip"] == "web"}
    assert expected == pytest.approx({k: 1 / 3 for k in shares})
    info = {s.labels["vip"]: s.labels["digest"] for s in fams["maglev_vip_table_info"].samples}
    assert info["web"] == d.table.digest()
    announced = {s.labels["vip"]: s.value for s in fams["maglev_vip_announced"].samples}
    confirmed = {s.labels["vip"]: s.value for s in fams["maglev_vip_route_confirmed"].samples}
    assert announced == {"web": 1.0, "api": 1.0} and confirmed == {"web": 0.0, "api": 0.0}
    env.speaker.announced = lambda: {"10.100.0.1/32"}
    confirmed = {s.labels["vip"]: s.value
                 for s in families(metrics.render(env.c, {}))["maglev_vip_route_confirmed"].samples}
    assert confirmed == {"web": 1.0, "api": 0.0}


async def test_durations_are_histograms_and_probes_are_counted(env):
    before = env.c.metrics.reconcile_duration.collect()[0].samples
    await env.c.reconcile()
    target = next(iter(env.c.targets.values()))
    env.c.metrics.on_probe(target, 0.0, 0.0, ProbeResult(True, "connected", 0.0021, 1.0))
    env.c.metrics.on_probe(target, 0.0, 0.0, ProbeResult(False, "connection failed: [Errno 111] refused", 0.0003, 2.0))
    fams = families(metrics.render(env.c, {}))
    count = {s.name: s.value for s in fams["maglev_reconcile_duration_seconds"].samples}
    assert count["maglev_reconcile_duration_seconds_count"] == 1 + {s.name: s.value for s in before}[
        "maglev_reconcile_duration_seconds_count"]
    assert fams["maglev_forwarder_sync_duration_seconds"].type == "histogram"
    probes = {s.labels["le"]: s.value for s in fams["maglev_probe_duration_seconds"].samples
              if s.name.endswith("_bucket")}
    assert probes["0.001"] == 1 and probes["0.0025"] == 2
    results = {(s.labels["result"], s.labels["reason"]): s.value for s in fams["maglev_probe_results"].samples
               if s.name.endswith("_total")}
    assert results == {("ok", "connected"): 1, ("fail", "connection failed"): 1}


async def test_probe_series_kept_per_target_count_every_probe(env):
    """on_probe keeps each target's series at hand: repeated verdicts, reasons with variable
    detail (more than it keeps per target) and a second target all land in the right series."""
    await env.c.reconcile()
    first, second = list(env.c.targets.values())[:2]
    for _ in range(5):
        env.c.metrics.on_probe(first, 0.0, 0.0, ProbeResult(True, "connected", 0.0004, 1.0))
    for n in range(metrics.PROBE_REASONS_KEPT + 3):  # "exit 1: <detail>" varies probe to probe
        env.c.metrics.on_probe(first, 0.0, 0.0, ProbeResult(False, f"exit 1: disk {n} full", 0.002, 1.0))
    env.c.metrics.on_probe(first, 0.0, 0.0, ProbeResult(True, "connected", 0.0004, 1.0))
    env.c.metrics.on_probe(second, 0.0, 0.0, ProbeResult(False, "timeout after 1 s", 1.0, 1.0,
                                                         inconclusive=True))
    fams = families(metrics.render(env.c, {}))
    results = {(s.labels["backend"], s.labels["result"], s.labels["reason"]): s.value
               for s in fams["maglev_probe_results"].samples if s.name.endswith("_total")}
    name = lambda t: f"{t.address}:{t.probe_port}" if t.probe_port else str(t.address)  # noqa: E731
    assert results == {(name(first), "ok", "connected"): 6,
                       (name(first), "fail", "exit 1"): metrics.PROBE_REASONS_KEPT + 3,
                       (name(second), "inconclusive", "timeout after 1 s"): 1}
    counts = {s.labels["backend"]: s.value for s in fams["maglev_probe_duration_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {name(first): 6 + metrics.PROBE_REASONS_KEPT + 3, name(second): 1}


async def test_scrape_negotiates_like_prometheus_client(env):
    client = TestClient(TestServer(make_app(env.c, "t")))
    await client.start_server()
    try:
        r = await client.get("/metrics")
        text = await r.text()
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "process_cpu_seconds_total" in text and "process_resident_memory_bytes" in text
        r = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        body = await r.text()
        assert r.headers["Content-Type"].startswith("application/openmetrics-text") and body.endswith("# EOF\n")
        r = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
        assert r.headers["Content-Encoding"] == "gzip"
        assert b"maglev_vip_announced" in gzip.decompress(await r.read())
        r = await client.get("/metrics", params={"name[]": "maglev_forwarder_up"})
        assert [f.name for f in text_string_to_metric_families(await r.text())] == ["maglev_forwarder_up"]
    finally:
        await client.close()


async def test_promtool_check_metrics_is_clean(env):
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: apt-get install prometheus (APT_PACKAGES in the Makefile)"
    target = next(iter(env.c.targets.values()))
    env.c.metrics.on_probe(target, 0.0, 0.0, ProbeResult(True, "connected", 0.002, 1.0))
    env.speaker.status = lambda: {"sessions": {"192.0.2.1": {"state": "established"}}, "restarts": 2,
                                  "bfd": {"enabled": True, "restarts": 1, "peers": {"192.0.2.1": {"status": "up"}}},
                                  "graceful_restart": {"enabled": True, "restart_time": 15,
                                                       "end_of_rib_owed": ["192.0.2.1"], "end_of_rib_sent_total": 4}}
    env.speaker.session_transitions = {("192.0.2.1", "established"): 3}
    text = metrics.render(env.c, counters())
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
    fams = families(text)
    assert samples(fams, "maglev_bgp_session_transitions", "maglev_bgp_session_transitions_total") == {
        (("peer", "192.0.2.1"), ("to", "established")): 3}
    assert fams["maglev_bgp_speaker_restarts"].samples[0].value == 2
    assert fams["maglev_bfdd_restarts"].samples[0].value == 1
    assert fams["maglev_bgp_graceful_restart_enabled"].samples[0].value == 1
    assert fams["maglev_bgp_graceful_restart_time_seconds"].samples[0].value == 15
    assert samples(fams, "maglev_bgp_end_of_rib_owed", "maglev_bgp_end_of_rib_owed") == {(("peer", "192.0.2.1"),): 1}
    assert fams["maglev_bgp_end_of_rib_sent"].samples[0].value == 4


def test_reason_classes_stay_bounded():
    assert metrics.reason_class("exit 1: disk full at /var") == "exit 1"
    assert metrics.reason_class("HTTP 503") == "HTTP 503"
    assert metrics.reason_class("") == "unknown"


def test_rates_between_two_views():
    def view(p):
        return [{"name": "web", "counters": {"packets": p}, "backends": [{"key": "a", "counters": {"packets": p}}]}]

    r = metrics.counter_rates(view(100), view(300), 2.0)
    assert r["web"]["packets"] == 100 and r["web"]["backends"]["a"]["packets"] == 100
    assert metrics.counter_rates(view(300), view(40), 2.0)["web"]["packets"] == 20  # maps recreated


async def test_maglev_vips_shows_each_vips_own_backend_figures(env):
    """`maglev vips` used to show, for a backend shared by two VIPs, the sum of both."""
    web = {b["key"]: b["counters"].get("packets") for b in env.c.vip_view("web", counters())["backends"]}
    api = {b["key"]: b["counters"]["packets"] for b in env.c.vip_view("api", counters())["backends"]}
    assert web["10.0.1.1"] == BIG - 7 and api == {"10.0.1.1": 50}


async def test_a_render_leaves_the_garbage_collector_as_it_found_it(env):
    import gc

    assert gc.isenabled()
    metrics.render(env.c, counters())
    assert gc.isenabled()
    gc.disable()
    try:
        metrics.render(env.c, counters())
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_bgp_and_bfd_transitions_are_counted_where_they_happen(tmp_path):
    from bgp import BgpSpeaker
    from bgp.bfd import BfdDaemon
    from tests.unit.test_bfd import bgp

    d = BfdDaemon(bgp(bfd={"enabled": True}), tmp_path / "bfd")
    for status in ("up", "down", "up", "up"):
        d._update({"192.0.2.1": {"status": status, "diagnostic": None}})
    assert d.session_transitions == {("192.0.2.1", "up"): 2, ("192.0.2.1", "down"): 1}
    sp = BgpSpeaker(bgp(), tmp_path / "bgp")
    for state in ("up", "up", "down", "connected", "up"):
        sp._on_state({"address": {"peer": "192.0.2.1"}, "state": state})
    assert sp.session_transitions == {("192.0.2.1", "established"): 2, ("192.0.2.1", "idle"): 1,
                                      ("192.0.2.1", "connecting"): 1}


async def test_announce_state_with_its_reason_fallback_and_disable(env):
    fams = families(metrics.render(env.c, {}))
    assert samples(fams, "maglev_vip_announce_state") == {
        (("reason", "healthy"), ("state", "announced"), ("vip", "api")): 1.0,
        (("reason", "healthy"), ("state", "announced"), ("vip", "web")): 1.0}
    assert samples(fams, "maglev_node_disabled") == {(): 0.0}
    (env.c.run_dir / "disable").touch()
    env.c.disable.poll()
    env.health.set("10.0.1.1", State.DOWN)  # api's only backend: nothing serves, withdrawn
    await env.c.reconcile()
    fams = families(metrics.render(env.c, {}))
    assert samples(fams, "maglev_vip_announce_state") == {
        (("reason", "no_backend"), ("state", "withdrawn"), ("vip", "api")): 1.0,
        (("reason", "disabled"), ("state", "depreferred"), ("vip", "web")): 1.0}
    assert samples(fams, "maglev_node_disabled") == {(): 1.0}
    assert samples(fams, "maglev_vip_fallback_in_use") == {(("vip", "api"),): 0.0, (("vip", "web"),): 0.0}


async def test_the_health_check_path_of_each_vip_is_exported(env):
    fams = families(metrics.render(env.c, counters()))
    paths = {(s.labels["vip"], s.labels["path"]): s.value for s in fams["maglev_vip_health_check_path"].samples}
    assert paths == {("web", "direct"): 1.0, ("api", "direct"): 1.0}
    assert "maglev_health_tunnel_up" not in fams  # no tunnel check, no tunnel


def test_a_tunnel_probe_is_counted_per_vip_with_its_reason():
    from ipaddress import ip_address

    from healthcheck import Target
    from node.config import TcpCheck

    m = metrics.NodeMetrics()
    target = Target(ip_address("10.1.0.21"), 80, TcpCheck(type="tcp", via="tunnel"), vip=ip_address("10.100.0.1"))
    m.on_probe(target, 0.0, 0.0, ProbeResult(False, "no answer through the tunnel (timeout after 1 s): "
                                             "backend 10.1.0.21 may lack VIP 10.100.0.1 on lo or its GRE decap", 1.0, 1.0))
    (family,) = m.probe_results.collect()
    (sample,) = [s for s in family.samples if s.name.endswith("_total")]
    assert sample.labels == {"backend": "10.1.0.21 via 10.100.0.1:80", "check": "tcp", "result": "fail",
                             "reason": "no answer through the tunnel (timeout after 1 s)"}


async def test_the_tunnels_counters_and_state_are_exported(env):
    class Tunnel:
        opened = True

        def status(self):
            return {"ok": True, "error": None, "counters": {"encap_v4": 12, "drop_no_target": 1}}

    env.c.tunnel = Tunnel()
    fams = families(metrics.render(env.c, counters()))
    assert samples(fams, "maglev_health_tunnel_up") == {(): 1.0}
    assert samples(fams, "maglev_health_tunnel_packets", "maglev_health_tunnel_packets_total") == {
        (("outcome", "drop_no_target"),): 1.0, (("outcome", "encap_v4"),): 12.0}
