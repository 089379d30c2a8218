"""What an operator looks at, against a real node (the fixture of test_node.py: FRR router,
ExaBGP, the XDP forwarder, HTTP backends): the live /metrics passes `promtool check metrics`,
the shipped rules and dashboard name only metrics it exports, a real Prometheus scrapes the
node, loads the rules and evaluates every dashboard query, the status page renders the node's
VIPs and backends in a real headless Chromium (DOM and a screenshot that is not blank), and the
live CLI (top, conntrack, events, enable, reload) works on it.

Prometheus and Chromium run inside the node's namespace (the API listens on its 127.0.0.1),
on a port and in directories of their own, stopped by PID in the fixtures.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from lab.nssocket import in_netns
from tests.integration.test_node import BACKENDS, ROUTER, VIP, NodeLab, wait_for
from tests.unit.test_prometheus_rules import RULES, dashboard_exprs, exported_names, unknown_names

pytestmark = [pytest.mark.root, pytest.mark.integration]

API = "http://127.0.0.1:9180"
PROMETHEUS_PORT = 19090  # inside the node's namespace: nothing else listens there
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def lab():
    lab = NodeLab()
    try:
        lab.build()
        wait_for(lambda: VIP in lab.routes(), 30, "the VIP to be announced to the router")
        send_syns(lab, 20)
        yield lab
    except BaseException:
        if lab.node_proc is not None:
            print(lab.log_text())
        raise
    finally:
        lab.teardown()


def send_syns(lab: NodeLab, n: int) -> None:
    """TCP SYNs from the router to the VIP: they cross the node's XDP forwarder (counted, one
    conntrack entry per flow) and go on GRE-encapsulated; nobody answers, which is fine here."""
    with in_netns(lab.r.name):
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.bind((ROUTER, 41000 + i))
            try:
                s.connect((VIP, 80))
            except BlockingIOError:
                pass
            s.close()


def get(lab: NodeLab, url: str, headers: dict[str, str] | None = None) -> bytes:
    with in_netns(lab.n.name):
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()


def live_metrics(lab: NodeLab) -> str:
    return get(lab, f"{API}/metrics").decode()


def test_live_metrics_are_clean_for_promtool(lab):
    wait_for(lambda: "maglev_vip_packets_total{vip=\"web\"} 0.0" not in live_metrics(lab), 10,
             "the SYNs to show in the VIP's packet counter")
    text = live_metrics(lab)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    per = {(s.labels["vip"], s.labels["backend"]): s.value for s in fams["maglev_backend_new_flows"].samples
           if s.name.endswith("_total")}
    assert sum(per.values()) >= 20 and set(per) == {("web", f"{b}:8080") for b in BACKENDS}
    ct = {s.name: s.value for s in fams["maglev_conntrack_entries"].samples}
    assert ct["maglev_conntrack_entries"] >= 20  # one entry per SYN's flow
    assert fams["maglev_conntrack_capacity"].samples[0].value >= 4096
    events = {s.labels["event"] for s in fams["maglev_forwarder_events"].samples}
    assert {"ct_insert_bypassed", "icmp_steered", "self_test_packets"} <= events
    confirmed = {s.labels["vip"]: s.value for s in fams["maglev_vip_route_confirmed"].samples}
    assert confirmed == {"web": 1.0}
    probes = [s for s in fams["maglev_probe_duration_seconds"].samples if s.name.endswith("_count")]
    assert {s.labels["backend"] for s in probes} == {f"{b}:8080" for b in BACKENDS}
    assert "process_resident_memory_bytes" in fams


def test_rules_and_dashboard_name_only_what_a_live_node_exports(lab):
    assert unknown_names(exported_names(live_metrics(lab))) == {}


@pytest.fixture(scope="module")
def prometheus(lab):
    work = Path(tempfile.mkdtemp(prefix="mlbprom"))
    shutil.copy(RULES, work / RULES.name)
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES.name],
        "scrape_configs": [{"job_name": "maglev", "static_configs": [{"targets": ["127.0.0.1:9180"]}]}],
    }))
    log = open(work / "prometheus.log", "w")
    proc = lab.n.popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                        f"--storage.tsdb.path={work / 'data'}",
                        f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
                       stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        yield f"http://127.0.0.1:{PROMETHEUS_PORT}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def prom_query(lab: NodeLab, base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(get(lab, url))
    except OSError:
        return {"status": "unreachable"}


def test_a_real_prometheus_scrapes_the_node_and_loads_the_rules(lab, prometheus):
    def announced():
        result = prom_query(lab, prometheus, 'maglev_vip_announced{vip="web"}')
        return result.get("status") == "success" and result["data"]["result"]

    wait_for(announced, 60, "Prometheus to scrape maglev_vip_announced from the node")
    sample = prom_query(lab, prometheus, 'maglev_vip_announced{vip="web"}')["data"]["result"][0]
    assert sample["metric"]["job"] == "maglev" and sample["metric"]["address"] == VIP
    assert sample["value"][1] == "1"
    rules = json.loads(get(lab, f"{prometheus}/api/v1/rules"))["data"]["groups"]
    health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
    wait_for(lambda: all(r["health"] == "ok" for g in json.loads(get(lab, f"{prometheus}/api/v1/rules"))
                         ["data"]["groups"] for r in g["rules"]), 20, "every rule to be evaluated")
    assert "MaglevVipWithdrawnEverywhere" in health and len(health) == 9
    # Every dashboard query, with Grafana's variables filled in, is valid PromQL over the
    # node's series, and the per-VIP panels have data.
    for expr in dashboard_exprs():
        q = (expr.replace("$__rate_interval", "1m").replace("$__range", "5m")
             .replace('"$instance"', '".*"'))
        if q.startswith("label_values("):
            continue  # a Grafana templating function, not PromQL
        result = prom_query(lab, prometheus, q)
        assert result.get("status") == "success", (expr, result)
    assert prom_query(lab, prometheus, "count by (vip) (count by (vip, digest) (maglev_vip_table_info))"
                      )["data"]["result"][0]["value"][1] == "1"


def chromium(lab: NodeLab, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="mlbchrome")
    try:
        return lab.n.run("chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
                         check=False, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_status_page_renders_the_vips_and_backends_in_chromium(lab):
    r = chromium(lab, "--dump-dom", f"{API}/")
    dom = r.stdout
    assert r.returncode == 0 and "<h1>" in dom, r.stderr[-2000:]
    assert 'id="vip-web"' in dom and "ANNOUNCED" in dom and VIP in dom
    for b in BACKENDS:
        assert f"{b}:8080" in dom
    assert ROUTER in dom and "ESTABLISHED" in dom  # the BGP session
    assert "table share / expected" in dom and 'class="fill"' in dom
    assert "vip_announced" in dom  # the event timeline
    assert 'http-equiv="refresh"' in dom
    assert "<script" not in dom  # readable as it is: no framework, nothing fetched from elsewhere


def test_status_page_screenshot_is_not_blank(lab, tmp_path):
    from PIL import Image

    shot = tmp_path / "status.png"
    r = chromium(lab, f"--screenshot={shot}", "--window-size=1280,1100", "--hide-scrollbars", f"{API}/?refresh=0")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    keep = Path("/tmp/maglev-status-page.png")  # for a person to look at after the run
    shutil.copy(shot, keep)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1100)
    colors = image.getcolors(maxcolors=1 << 20) or []
    background = max(colors)[1]
    other = sum(n for n, c in colors if c != background)
    assert len(colors) > 50 and other / (image.width * image.height) > 0.05, (len(colors), other)
    # The page's own blue (headers, bars) is there: the stylesheet came from the package.
    assert any(abs(c[0] - 0x2B) < 8 and abs(c[1] - 0x5F) < 8 and abs(c[2] - 0xA8) < 8 for _, c in colors)


def test_lab_web_relays_the_page_to_the_host(lab):
    """`maglev lab web I`: the page of a node (API on its namespace's 127.0.0.1) from the host."""
    import asyncio
    import threading

    from lab.web import relay

    loop = asyncio.new_event_loop()
    port: list[int] = []
    task = loop.create_task(relay(lab.n.name, 9180, "127.0.0.1", 0, port.append))

    def run() -> None:
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass  # stopped by the test
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: port, 5, "the relay to listen")
        with urllib.request.urlopen(f"http://127.0.0.1:{port[0]}/?refresh=0", timeout=10) as r:
            page = r.read().decode()
        assert 'id="vip-web"' in page and f"{BACKENDS[0]}:8080" in page
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(timeout=5)
