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
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from lab.nssocket import in_netns
from tests.integration.harness import CHROMIUM_FLAGS
from tests.integration.test_node import BACKENDS, ROUTER, VIP, NodeLab, wait_for
from tests.unit.test_prometheus_rules import RULES, dashboard_exprs, exported_names, unknown_names

pytestmark = [pytest.mark.root, pytest.mark.integration]

API = "http://127.0.0.1:9180"
PROMETHEUS_PORT = 19090  # inside the node's namespace: nothing else listens there


@pytest.fixture(scope="module")
def lab():
    lab = NodeLab()
    try:
        lab.build()
        wait_for(lambda: VIP in lab.routes(), 30, "the VIP to be announced to the router")
        send_syns(lab, 41000, 20)
        yield lab
    except BaseException:
        if lab.node_proc is not None:
            print(lab.log_text())
        raise
    finally:
        lab.teardown()


def send_syns(lab: NodeLab, first_port: int, n: int) -> None:
    """TCP SYNs from the router to the VIP, one flow per source port: they cross the node's
    XDP forwarder (counted, one conntrack entry each) and go on GRE-encapsulated; nobody
    answers, which is fine here."""
    with in_netns(lab.r.name):
        for port in range(first_port, first_port + n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.bind((ROUTER, port))
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
    moves = {(s.labels["peer"], s.labels["to"]): s.value for s in fams["maglev_bgp_session_transitions"].samples
             if s.name.endswith("_total")}
    assert moves[(ROUTER, "established")] >= 1  # counted by the speaker as ExaBGP reported it
    reconciles = {s.name: s.value for s in fams["maglev_reconcile_duration_seconds"].samples}
    assert reconciles["maglev_reconcile_duration_seconds_count"] >= 1


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
    assert "<th>config source</th><td>directory " in dom
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


@pytest.mark.parametrize("mode", ["lru", "direct"])
def test_conntrack_flows_lists_the_tracked_flows_of_either_design(mode):
    """What `maglev conntrack` reads, from the real BPF maps of each design."""
    from ipaddress import ip_address

    from node.forwarder import packets as P
    from node.forwarder.loader import BackendSpec, Forwarder, VipSpec
    from node.forwarder.testing import make_config, temp_bpffs

    backends = (BackendSpec("a", ip_address("10.2.0.1"), "active"), BackendSpec("b", ip_address("10.2.0.2"), "active"))
    specs = [VipSpec("web", ip_address("10.1.1.1"), "tcp", 80, backends, ["a", "b"] * 6 + ["a"]),
             VipSpec("api", ip_address("10.1.1.2"), "tcp", 443, backends[:1], ["a"] * 13),
             VipSpec("dns", ip_address("10.1.1.3"), "udp", 53, backends[1:], ["b"] * 13)]
    with temp_bpffs() as root:
        f = Forwarder(make_config(root / "maglev", conntrack=mode), table_capacity=1 << 16)
        f.open()
        try:
            f.sync(specs)
            for i in range(5):
                f.test_run(P.flow_packet("192.0.2.9", "10.1.1.1", 33000 + i, 80))
            f.test_run(P.flow_packet("192.0.2.10", "10.1.1.2", 34000, 443))
            flows = f.conntrack_flows()
            assert len(flows) == 6 and f.conntrack_count() == 6
            web = sorted((x for x in flows if x["vip"] == "web"), key=lambda x: x["sport"])
            assert [x["sport"] for x in web] == list(range(33000, 33005))
            assert {(x["src"], x["dst"], x["dport"], x["protocol"]) for x in web} == {("192.0.2.9", "10.1.1.1", 80, "tcp")}
            assert {x["backend"] for x in web} <= {"a", "b"}
            assert f.conntrack_flows(vip="api") == [
                {"vip": "api", "protocol": "tcp", "src": "192.0.2.10", "sport": 34000, "dst": "10.1.1.2",
                 "dport": 443, "backend": "a", "idle_seconds": None}]  # TCP: no idle time kept
            assert len(f.conntrack_flows(limit=2)) == 2
            f.test_run(P.flow_packet("192.0.2.11", "10.1.1.3", 35000, 53, "udp"))
            (udp,) = f.conntrack_flows(vip="dns")
            assert udp["protocol"] == "udp" and udp["sport"] == 35000 and udp["idle_seconds"] >= 0
        finally:
            f.close()
            f.remove_pins()


# ---------------------------------------------------------------------- the live CLI


def cli(lab: NodeLab, *args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    argv = lab.n.exec_argv([sys.executable, "-m", "node.cli", *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parents[2], env={**os.environ, **(env or {})})


def test_top_once_shows_rates_per_vip_and_backend(lab):
    import threading

    stop = threading.Event()

    def traffic() -> None:
        port = 42000
        while not stop.is_set():
            send_syns(lab, port, 5)
            port += 5
            stop.wait(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        r = cli(lab, "top", "--once", "--json", "--interval", "1", "--api", API)
    finally:
        stop.set()
        sender.join()
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = {(x["vip"], x["backend"]): x for x in report["rows"]}
    assert set(rows) == {("web", None)} | {("web", f"{b}:8080") for b in BACKENDS}
    assert rows[("web", None)]["state"] == "announced" and rows[("web", None)]["rates"]["packets"] > 0
    assert sum(rows[("web", f"{b}:8080")]["rates"]["new_flows"] for b in BACKENDS) > 0
    r = cli(lab, "top", "--once", "--interval", "0.5", "--api", API)
    assert r.returncode == 0 and "VIP / BACKEND" in r.stdout and f"-> {BACKENDS[0]}:8080" in r.stdout, r.stderr
    assert "\x1b[" not in r.stdout  # not a terminal: no screen clearing in the output



def test_conntrack_lists_the_flows(lab):
    r = cli(lab, "conntrack", "--vip", "web", "--limit", "5", "--api", API)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["VIP", "PROTO", "SOURCE", "DESTINATION"]
    assert len([x for x in lines if x.startswith("web ")]) == 5 and "limit reached" in lines[-1]
    assert "design 'lru'" in lines[-1]
    data = json.loads(cli(lab, "conntrack", "--json", "--limit", "1000", "--api", API).stdout)
    assert len(data["flows"]) >= 20 and data["capacity"] >= 4096
    assert {f["backend"] for f in data["flows"]} <= {f"{b}:8080" for b in BACKENDS}
    assert all(f["src"] == ROUTER and f["dst"] == VIP and f["dport"] == 80 for f in data["flows"])
    r = cli(lab, "conntrack", "--vip", "nope", "--api", API)
    assert r.returncode == 2 and "no VIP named 'nope'" in r.stderr


def test_events_enable_and_reload(lab):
    r = cli(lab, "events", "--api", API)
    assert r.returncode == 0 and "vip_announced: VIP web" in r.stdout, r.stderr
    events = [json.loads(line) for line in cli(lab, "events", "--json", "--api", API).stdout.splitlines()]
    assert {"node_started", "vip_announced", "table_rebuilt"} <= {e["event"] for e in events}
    cfg = str(lab.node_file)
    assert cli(lab, "disable", f"{BACKENDS[0]}:8080", "--vip", "web", "--config", cfg).returncode == 0
    r = cli(lab, "enable", f"{BACKENDS[0]}:8080", "--vip", "web", "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    states = {b["key"]: b["state"] for b in json.loads(r.stdout)["backends"]}
    assert states[f"{BACKENDS[0]}:8080"] == "active"
    assert "set to its configured state by operator" in cli(lab, "events", "--api", API).stdout
    r = cli(lab, "reload", "--config", cfg)
    assert r.returncode == 0 and "reload applied (POST /api/v1/reload)" in r.stdout, r.stderr
    bad = lab.vip_dir / "zz-broken.yaml"
    bad.write_text("vips: [{name: broken, address: 10.97.100.9, port: 80, table_size: 100, backends: []}]\n")
    try:
        r = cli(lab, "reload", "--config", cfg)
        assert r.returncode == 1 and "reload rejected" in r.stderr and "zz-broken.yaml" in r.stderr, r.stderr
    finally:
        bad.unlink()
    assert cli(lab, "reload", "--config", cfg).returncode == 0


def test_output_is_safe_to_pipe(lab):
    """A reader that leaves (head) ends the command without a traceback."""
    argv = " ".join(lab.n.exec_argv([sys.executable, "-m", "node.cli", "top", "--interval", "0.2", "--api", API]))
    r = subprocess.run(["bash", "-c", f"{argv} | head -n 3; echo \"status ${{PIPESTATUS[0]}}\""],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr
    assert r.stdout.splitlines()[0].startswith("node itest-node") and "status 141" in r.stdout, r.stdout


def test_shell_completion(lab, tmp_path):
    r = cli(lab, "completion", "bash")
    assert r.returncode == 0 and "complete" in r.stdout and "maglev" in r.stdout

    def complete(line: str) -> list[str]:
        out = tmp_path / "completions"
        cli(lab, env={"_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
                      "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "_ARGCOMPLETE_IFS": "\n"})
        return out.read_text().split()

    assert "top" in complete("maglev to") and "conntrack" in complete("maglev con")
    assert "--follow" in complete("maglev events --fo")
    assert complete(f"maglev conntrack --api {API} --vip w") == ["web"]  # from the running node
