"""The generated ExaBGP config is accepted by the real ExaBGP 5.0.15 parser (`exabgp validate`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bgp import exabgp
from node.config import BgpConfig

pytestmark = pytest.mark.integration


def validate(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    return subprocess.run([sys.executable, "-m", "exabgp", "validate", str(conf)],
                          capture_output=True, text=True, timeout=60)


CASES = {
    "v4+v6 peers": {"peers": [{"address": "10.77.1.1", "peer_as": 65000},
                              {"address": "fd77:1::1", "peer_as": 65000}]},
    "passive, per-peer hold, 4-byte ASN": {
        "local_as": 4200000001,
        "peers": [{"address": "10.77.1.1", "peer_as": 4200000000, "passive": True, "hold_time": 0},
                  {"address": "fd77:1::1", "peer_as": 65000, "hold_time": 90,
                   "local_address": "fd77:1::3"}]},
    "next hop address": {"next_hop": "10.77.1.9", "peers": [{"address": "10.77.1.1", "peer_as": 65000}]},
    "graceful restart, both families": {
        "graceful_restart": {"enabled": True, "restart_time": 300},
        "peers": [{"address": "10.77.1.1", "peer_as": 65000}, {"address": "fd77:1::1", "peer_as": 65000}]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_config_is_valid_for_exabgp(case: str, tmp_path: Path):
    data = {"local_as": 65101, "router_id": "10.77.1.2", "local_address": "10.77.1.2",
            "local_address_v6": "fd77:1::2"}
    data.update(CASES[case])
    text = exabgp.render_config(BgpConfig.model_validate(data), tmp_path / "api.sock")
    proc = validate(text, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validator_rejects_what_exabgp_rejects(tmp_path: Path):
    """Control: the check above can fail (a hold time of 2 s is refused by ExaBGP)."""
    data = {"local_as": 65101, "router_id": "10.77.1.2", "local_address": "10.77.1.2",
            "peers": [{"address": "10.77.1.1", "peer_as": 65000}]}
    text = exabgp.render_config(BgpConfig.model_validate(data), tmp_path / "api.sock")
    proc = validate(text.replace("hold-time 3;", "hold-time 2;"), tmp_path)
    assert proc.returncode != 0
    assert "holdtime" in proc.stdout + proc.stderr
