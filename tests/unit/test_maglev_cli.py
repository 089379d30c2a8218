"""`maglev table`, run as operators run it: a subprocess on real VIP files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from node.maglev import build_table

REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "configs" / "vips.d" / "web.yaml"


def maglev(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "table", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )


def test_example_file_text() -> None:
    out = maglev(WEB)
    assert out.returncode == 0, out.stdout + out.stderr
    web = build_table({"10.1.0.11": 1, "10.1.0.12": 1, "10.1.0.13": 2}, 65537)
    web6 = build_table({"[2001:db8:1::11]": 1, "[2001:db8:1::12]": 1}, 65537)
    assert f"VIP web (tcp 198.51.100.10 port 80): table size 65537, 3 active backend(s), digest {web.digest()}" in out.stdout
    assert f"digest {web6.digest()}" in out.stdout
    counts = web.counts()
    row = next(line for line in out.stdout.splitlines() if line.strip().startswith("10.1.0.13"))
    assert row.split() == ["10.1.0.13", "active", "2", str(counts["10.1.0.13"]),
                           f"{counts['10.1.0.13'] / 65537:.3%}", "50.000%"]


def test_example_file_json_one_vip() -> None:
    out = maglev(WEB, "--vip", "web", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [v["name"] for v in data["vips"]] == ["web"]
    vip = data["vips"][0]
    table = build_table({"10.1.0.11": 1, "10.1.0.12": 1, "10.1.0.13": 2}, 65537)
    assert vip["digest"] == table.digest() and vip["table_size"] == 65537
    assert {b["key"]: b["entries"] for b in vip["backends"]} == table.counts()
    assert abs(sum(b["share"] for b in vip["backends"]) - 1) < 1e-9
    assert [b["expected_share"] for b in vip["backends"]] == [0.25, 0.25, 0.5]


VIPS = """
vips:
  - name: api
    address: 192.0.2.1
    port: 443
    table_size: 101
    backends:
      - {address: 10.0.0.1, port: 8443, weight: 3}
      - {address: 10.0.0.2, port: 8443, state: drain}
      - {address: 10.0.0.3, port: 8443, state: disabled}
      - {address: 10.0.0.4, port: 8443, hash_key: rack4}
  - name: dark
    address: 192.0.2.2
    port: all
    table_size: 7
    backends:
      - {address: 10.0.0.9, state: drain}
"""


def test_drain_and_disabled_take_no_entries(tmp_path: Path) -> None:
    path = tmp_path / "vips.yaml"
    path.write_text(VIPS)
    out = maglev(path, "--json")
    assert out.returncode == 0, out.stderr
    api, dark = json.loads(out.stdout)["vips"]
    table = build_table({"10.0.0.1:8443": 3, "rack4": 1}, 101)
    assert api["digest"] == table.digest() and api["active_backends"] == 2
    by_key = {b["key"]: b for b in api["backends"]}
    assert by_key["10.0.0.2:8443"]["entries"] == 0 and by_key["10.0.0.2:8443"]["state"] == "drain"
    assert by_key["10.0.0.3:8443"]["entries"] == 0 and by_key["10.0.0.3:8443"]["expected_share"] == 0
    assert by_key["rack4"]["entries"] == table.counts()["rack4"]
    assert by_key["10.0.0.1:8443"]["expected_share"] == 0.75
    assert dark["active_backends"] == 0 and dark["digest"] == build_table({}, 7).digest()

    text = maglev(path).stdout
    assert "note: 10.0.0.2:8443, 10.0.0.3:8443 take no entries" in text
    assert "no active backends: the table is empty" in text


def test_unknown_vip_and_bad_file(tmp_path: Path) -> None:
    out = maglev(WEB, "--vip", "nope")
    assert out.returncode == 2
    assert "no VIP named 'nope' (VIPs in this file: web, web6)" in out.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("vips:\n  - name: x\n    address: 192.0.2.1\n    port: 80\n    table_size: 100\n")
    out = maglev(bad)
    assert out.returncode == 2
    assert f"error: {bad}: vip 'x': table_size: table_size 100 is not prime" in out.stdout

    out = maglev(tmp_path / "missing.yaml")
    assert out.returncode == 2 and "cannot read" in out.stdout
