"""The shipped alert rules and dashboard: the real promtool checks the rules and runs their unit
tests (configs/prometheus/maglev-rules.test.yml); every metric they name is one the node
exports (here against a rendered exposition; tests/integration/test_observability.py checks a
live node's /metrics and has a real Prometheus evaluate every dashboard query)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "configs/prometheus/maglev-rules.yml"
RULE_TESTS = REPO / "configs/prometheus/maglev-rules.test.yml"
DASHBOARD = REPO / "configs/grafana/maglev-lb.json"

# PromQL words that are not metric names.
_FUNCTIONS = r"(?:sum|count|max|min|avg|rate|increase|histogram_quantile|label_values)"
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: apt-get install prometheus (APT_PACKAGES in the Makefile)"
    return path


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once label matchers,
    groupings, strings, functions, durations and keywords are taken out."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    keywords = {"and", "or", "unless", "bool", "offset"}
    return {w for w in words if w not in keywords and not re.fullmatch(_FUNCTIONS, w)}


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return exprs


def test_promtool_accepts_the_rules_and_their_tests_pass():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_a_broken_expectation_fails_promtool(tmp_path):
    """The rule tests can fail: the same file with one expectation changed does."""
    broken = RULE_TESTS.read_text().replace("Forwarder self-test failing on lb1", "Forwarder self-test failing on lb9")
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "t.yml").write_text(broken)
    r = subprocess.run([promtool(), "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "lb9" in r.stdout + r.stderr


def test_the_expression_parser_finds_metric_names():
    assert metric_names('sum by (vip) (rate(maglev_vip_packets_total{instance=~"$i"}[5m])) / 2^30') == {
        "maglev_vip_packets_total"}
    assert metric_names("maglev_vip_announced == 1 unless on (instance, vip) maglev_vip_route_confirmed == 1") == {
        "maglev_vip_announced", "maglev_vip_route_confirmed"}
    assert metric_names("label_values(maglev_node_info, instance)") == {"maglev_node_info", "instance"}


def exported_names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    names = set()
    for family in text_string_to_metric_families(text):
        # A family is exported even with no sample yet (no BGP transition so far, say).
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def unknown_names(exported: set[str]) -> dict[str, set[str]]:
    """Expression -> names it reads that the node does not export ("instance" is a label of
    label_values, added by Prometheus)."""
    out = {}
    for expr in rule_exprs() + dashboard_exprs():
        missing = metric_names(expr) - exported - {"instance"}
        if missing:
            out[expr] = missing
    return out


@pytest.fixture
async def rendered(tmp_path):
    from healthcheck import ProbeResult, State
    from node import metrics
    from tests.unit.test_controller import Env, vip
    from tests.unit.test_metrics import counters

    env = Env(tmp_path, [vip()])
    await env.start()
    for a in ("10.0.1.1", "10.0.1.2", "10.0.1.3"):
        env.health.set(a, State.UP)
    await env.c.reconcile()
    env.c.metrics.on_probe(next(iter(env.c.targets.values())), 0, 0, ProbeResult(True, "ok", 0.001, 1))
    snap = metrics.snapshot(env.c, counters(), (10, 4096))
    body, _ = metrics.exposition(snap, env.c.metrics)
    return body.decode()


async def test_rules_and_dashboard_name_only_exported_metrics(rendered):
    assert unknown_names(exported_names(rendered)) == {}
    assert len(dashboard_exprs()) >= 30
