"""Bounded parsing: every limit refuses with a ConfigError naming the file (and the VIP, the
field and the limit where there is one), before the expensive step it guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from node import config
from node.config import (
    ConfigError,
    Deadline,
    load_node_vips,
    load_vip_file,
    parse_node_object,
    parse_vip_object,
    parse_yaml,
    validate_vip_set,
)
from node.maglev import is_prime

REPO = Path(__file__).resolve().parents[2]


def vip(**over):
    base = {"name": "web", "address": "10.100.0.1", "port": 80,
            "backends": [{"address": "10.0.1.1"}, {"address": "10.0.1.2"}]}
    base.update(over)
    return base


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_vip_file(path)
    return [str(p) for p in info.value.problems]


def node_config(**forwarder):
    data = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    data["forwarder"].update(forwarder)
    return parse_node_object(data, "node.yaml")


def test_not_utf8_names_file_and_line(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_bytes(b"vips:\n  - name: caf\xe9\n")
    (msg,) = problems(f)
    assert msg.startswith(f"{f}: not valid UTF-8 (line 2")


def test_deep_nesting_refused_before_it_is_built(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("vips: " + "[" * 20000 + "]" * 20000 + "\n")
    (msg,) = problems(f)
    # libyaml has a flow-nesting limit of its own (1000), which its scanner may reach first.
    assert msg.startswith(f"{f}: ") and "nesting" in msg
    block = "".join("  " * i + "- \n" for i in range(200))
    f.write_text("vips:\n" + block)
    assert "nesting deeper than the limit" in problems(f)[0]


def test_huge_integer_refused(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text(yaml.safe_dump({"vips": [vip()]}).replace("port: 80", "port: " + "7" * 5000))
    (msg,) = problems(f)
    assert "an integer of 5000 characters exceeds the limit of 20 digits" in msg
    f.write_text("vips: []\nx: !!int '" + "1" * 50 + "'\n")
    assert "exceeds the limit of 20 digits" in problems(f)[0]


def test_alias_bomb_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    lines.append("vips: *a8")
    f = tmp_path / "a.yaml"
    f.write_text("\n".join(lines) + "\n")
    (msg,) = problems(f)
    assert f"more than {config.MAX_YAML_NODES} YAML nodes (aliases expanded)" in msg


def test_file_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_FILE_BYTES", 1000)
    f = tmp_path / "a.yaml"
    f.write_text("vips: []\n" + "#" * 2000 + "\n")
    (msg,) = problems(f)
    assert msg == f"{f}: file is 2010 bytes, over the limit of 1000 bytes"


def test_backends_per_vip_limit_names_vip_and_field():
    many = [{"address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"} for i in range(config.MAX_BACKENDS_PER_VIP + 1)]
    with pytest.raises(ConfigError) as info:
        parse_vip_object(vip(backends=many), "f.yaml")
    (p,) = info.value.problems
    assert (p.file, p.vip, p.field) == ("f.yaml", "web", "backends")
    assert f"at most {config.MAX_BACKENDS_PER_VIP} items" in p.message


def test_vips_per_node_limit(monkeypatch):
    monkeypatch.setattr(config, "MAX_VIPS", 3)
    data = {"vips": [vip(name=f"v{i}", address=f"10.100.0.{i}") for i in range(4)]}
    with pytest.raises(ConfigError) as info:
        config.parse_vip_file_object(data, "f.yaml")
    assert str(info.value) == "f.yaml: vips: 4 VIPs exceed the limit of 3 per node"


@pytest.mark.parametrize("size,reason", [
    (2**61 - 1, f"exceeds the maximum of {config.MAX_TABLE_SIZE}"),
    (config.MAX_TABLE_SIZE + 1, "exceeds the maximum"),
    (16777215, "is not prime"),
])
def test_table_size_maximum(size, reason):
    with pytest.raises(ConfigError) as info:
        parse_vip_object(vip(table_size=size), "f.yaml")
    (p,) = info.value.problems
    assert p.field == "table_size" and reason in p.message


def test_largest_table_size_is_accepted():
    assert parse_vip_object(vip(table_size=16777213)).table_size == 16777213


def test_miller_rabin_matches_trial_division():
    def trial(n):
        return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))
    assert [n for n in range(20000) if is_prime(n)] == [n for n in range(20000) if trial(n)]
    # Strong pseudoprimes to the first bases fool a short Miller-Rabin, not this one.
    for composite in (3215031751, 2152302898747, 3474749660383, 341550071728321, 3825123056546413051):
        assert not is_prime(composite)
    assert is_prime(2**61 - 1) and is_prime(16777213) and is_prime(65537)


def test_infinite_interval_refused():
    with pytest.raises(ConfigError) as info:
        parse_vip_object(vip(health_check={"type": "tcp", "interval": float("inf")}), "f.yaml")
    assert info.value.problems[0].field == "health_check.interval"


def test_problem_list_is_capped():
    bad = [{"address": f"nope{i}"} for i in range(500)]
    with pytest.raises(ConfigError) as info:
        parse_vip_object(vip(backends=bad), "f.yaml")
    ps = info.value.problems
    assert len(ps) == config.MAX_PROBLEMS + 1 and ps[-1].message == "... and 400 more problem(s)"


def test_deadline_stops_a_load(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"vips": [vip()]}))
    now = [0.0]
    deadline = Deadline(5.0, clock=lambda: now[0])
    now[0] = 6.0
    with pytest.raises(ConfigError) as info:
        load_node_vips(tmp_path, node_config(), deadline)
    assert "took longer than the budget of 5 s" in str(info.value)


def test_validate_vip_set_runs_the_reload_checks():
    node = node_config(table_capacity=65536)
    a = parse_vip_object(vip())
    b = parse_vip_object(vip(name="web2"))  # same address, protocol and port as a
    msgs = [str(p) for p in validate_vip_set([("a.yaml", a), ("b.yaml", b)], node, "vips.d")]
    assert msgs[0] == "b.yaml: vip 'web2': address: tcp 10.100.0.1 port 80 overlaps VIP 'web' in a.yaml"
    assert any("table_capacity is 65536" in m for m in msgs)
    assert validate_vip_set([("a.yaml", a)], node_config(), "vips.d") == []


def test_load_node_vips_is_what_a_reload_sees(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"vips": [vip()]}))
    assert list(load_node_vips(tmp_path, node_config())) == ["web"]
    with pytest.raises(ConfigError) as info:
        load_node_vips(tmp_path, node_config(table_capacity=65536))
    assert "table_capacity is 65536" in str(info.value)


def test_a_reload_parses_again_only_the_files_that_changed(tmp_path):
    files = config.ParsedFiles()
    for n in range(3):
        vips = [vip(name=f"web{n}{i}", address=f"10.100.{n}.{i}") for i in range(2)]
        (tmp_path / f"v{n}.yaml").write_text(yaml.safe_dump({"vips": vips}))
    first = load_node_vips(tmp_path, node_config(), files=files)
    assert (files.hits, files.misses) == (0, 3)
    changed = yaml.safe_load((tmp_path / "v1.yaml").read_text())
    changed["vips"][0]["backends"][0]["address"] = "10.0.1.9"
    (tmp_path / "v1.yaml").write_text(yaml.safe_dump(changed))
    second = load_node_vips(tmp_path, node_config(), files=files)
    assert (files.hits, files.misses) == (2, 4)
    # The same objects for the unchanged files (the controller compares VIPs by identity).
    assert all(second[n][1] is first[n][1] for n in ("web00", "web01", "web20", "web21"))
    assert second["web11"][1] is first["web11"][1]  # parsed again, equal: the same object
    assert second["web10"][1] is not first["web10"][1]
    assert str(second["web10"][1].backends[0].address) == "10.0.1.9"


def test_a_cached_file_is_still_checked_against_the_whole_set(tmp_path):
    """All or nothing: a new file that clashes with a cached one rejects the set, and a file
    that turns bad rejects it until it is fixed, whatever was cached."""
    files = config.ParsedFiles()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"vips": [vip()]}))
    load_node_vips(tmp_path, node_config(), files=files)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"vips": [vip(name="web2")]}))
    with pytest.raises(ConfigError) as info:
        load_node_vips(tmp_path, node_config(), files=files)
    assert "overlaps VIP 'web'" in str(info.value)
    (tmp_path / "b.yaml").unlink()
    good = (tmp_path / "a.yaml").read_text()
    (tmp_path / "a.yaml").write_text(good.replace("port: 80", "port: 99999"))
    with pytest.raises(ConfigError) as info:
        load_node_vips(tmp_path, node_config(), files=files)
    assert str(info.value).startswith(f"{tmp_path / 'a.yaml'}: vip 'web': port:")
    (tmp_path / "a.yaml").write_text(good)
    assert list(load_node_vips(tmp_path, node_config(), files=files)) == ["web"]
    (tmp_path / "a.yaml").write_text("x" * (config.MAX_FILE_BYTES + 1))  # the bounded read still runs
    with pytest.raises(ConfigError) as info:
        load_node_vips(tmp_path, node_config(), files=files)
    assert "over the limit" in str(info.value)


def test_libyaml_and_pure_loader_agree():
    for path in sorted(REPO.glob("configs/**/*.yaml")):
        text = path.read_text()
        assert yaml.load(text, Loader=config.YAML_LOADER) == yaml.load(text, Loader=yaml.SafeLoader), path


def test_bad_timestamp_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        parse_yaml("vips: []\nwhen: 2001-13-45\n", "f.yaml")
    assert str(info.value).startswith("f.yaml: invalid YAML value:")
