"""The shipped fleet alert rules, checked and exercised by the real promtool: the digest alert
fires only once digests have differed for the whole grace period, and not on a short blip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "configs/prometheus/fleet-rules.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool missing: apt-get install prometheus (APT_PACKAGES in the Makefile)"
    return path


def test_rules_file_is_valid():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_digest_alert_waits_for_the_grace_period(tmp_path):
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "5s",
        "tests": [{
            "interval": "5s",
            "input_series": [
                # web differs from t=10s on; api differs for 10 s only (a rollout's blip).
                {"series": 'maglev_fleet_vip_digest_mismatch{vip="web",instance="n1"}', "values": "0 0 1x20"},
                {"series": 'maglev_fleet_vip_digest_mismatch{vip="api",instance="n1"}', "values": "0 0 1 1 0x20"},
                {"series": 'maglev_config_source_stale{instance="n1"}', "values": "0x30"},
                {"series": 'maglev_config_revision_rejected{instance="n1"}', "values": "0x30"},
                {"series": 'maglev_config_revision{instance="n1"}', "values": "7x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "35s", "alertname": "MaglevFleetDigestsDiffer", "exp_alerts": []},
                {"eval_time": "45s", "alertname": "MaglevFleetDigestsDiffer", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "vip": "web"},
                    "exp_annotations": {
                        "summary": "VIP web: nodes disagree on its Maglev table for 30 s",
                        "description": "Flows to web may land on different backends depending on the node "
                                       "the router picks. Run `maglev fleet status` for the reason (a node "
                                       "behind on revision, a differing health view of a backend, an "
                                       "operator override on one node).",
                    },
                }]},
            ],
        }],
    }
    path = tmp_path / "tests.yml"
    path.write_text(yaml.safe_dump(tests))
    r = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
