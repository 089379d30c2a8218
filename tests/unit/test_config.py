"""Config validation: every error class names the file, the VIP and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, load_node_file, load_vip_dir, load_vip_file

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def vip(**over):
    base = {
        "name": "web",
        "address": "10.100.0.1",
        "port": 80,
        "backends": [{"address": "10.0.1.1"}, {"address": "10.0.1.2"}],
    }
    base.update(over)
    return base


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_vip_file(path)
    return [str(p) for p in info.value.problems]


def test_valid_file_loads(tmp_path):
    vips = load_vip_file(write(tmp_path / "a.yaml", {"vips": [vip()]}))
    assert vips[0].name == "web" and vips[0].table_size == 65537
    assert [b.key for b in vips[0].backends] == ["10.0.1.1", "10.0.1.2"]


def test_unknown_key_names_file_vip_field(tmp_path):
    f = write(tmp_path / "a.yaml", {"vips": [vip(wieght=3)]})
    assert problems_of(f) == [f"{f}: vip 'web': wieght: unknown key (check the spelling; see configs/ for every valid key)"]


def test_unknown_nested_key(tmp_path):
    f = write(tmp_path / "a.yaml", {"vips": [vip(health_check={"type": "http", "pth": "/x"})]})
    (msg,) = problems_of(f)
    assert "vip 'web': health_check.pth: unknown key" in msg


def test_bad_address(tmp_path):
    f = write(tmp_path / "a.yaml", {"vips": [vip(backends=[{"address": "10.0.1.300"}])]})
    (msg,) = problems_of(f)
    assert msg == f"{f}: vip 'web': backends[0].address: '10.0.1.300' is not a valid IPv4 or IPv6 address"


def test_family_mixup(tmp_path):
    f = write(tmp_path / "a.yaml", {"vips": [vip(backends=[{"address": "fd00::1"}])]})
    (msg,) = problems_of(f)
    assert "vip 'web'" in msg and "backends[0].address fd00::1 is IPv6" in msg and "IPv4" in msg


@pytest.mark.parametrize("size,reason", [(100, "is not prime"), (5, "is too small"), (65536, "is not prime")])
def test_table_size(tmp_path, size, reason):
    f = write(tmp_path / "a.yaml", {"vips": [vip(table_size=size)]})
    (msg,) = problems_of(f)
    assert f"vip 'web': table_size: table_size {size} {reason}" in msg


def test_timeout_not_below_interval(tmp_path):
    f = write(tmp_path / "a.yaml", {"vips": [vip(health_check={"type": "tcp", "interval": 1, "timeout": 1})]})
    (msg,) = problems_of(f)
    assert "vip 'web': health_check" in msg and "timeout (1.0 s) must be below interval (1.0 s)" in msg


def test_duplicate_name_in_file(tmp_path):
    f = write(tmp_path / "a.yaml", {"vips": [vip(), vip(address="10.100.0.2")]})
    (msg,) = problems_of(f)
    assert msg.startswith(f"{f}: vip 'web': name: duplicate VIP name")


def test_duplicates_across_files(tmp_path):
    write(tmp_path / "a.yaml", {"vips": [vip()]})
    write(tmp_path / "b.yaml", {"vips": [vip()]})
    write(tmp_path / "c.yaml", {"vips": [vip(name="other", port="all")]})
    with pytest.raises(ConfigError) as info:
        load_vip_dir(tmp_path)
    msgs = [str(p) for p in info.value.problems]
    assert any("b.yaml: vip 'web': name: duplicate VIP name, also defined in" in m and "a.yaml" in m for m in msgs)
    assert any("b.yaml: vip 'web': address: tcp 10.100.0.1 port 80 overlaps VIP 'web'" in m for m in msgs)
    assert any("vip 'other': address: tcp 10.100.0.1 port all overlaps" in m for m in msgs)


def test_same_address_other_protocol_is_fine(tmp_path):
    write(tmp_path / "a.yaml", {"vips": [vip(), vip(name="dns", protocol="udp")]})
    assert sorted(load_vip_dir(tmp_path)) == ["dns", "web"]


def test_invalid_yaml(tmp_path):
    f = write(tmp_path / "a.yaml", "vips: [\n")
    (msg,) = problems_of(f)
    assert msg.startswith(f"{f}: invalid YAML")


def test_node_peer_family_mixup(tmp_path):
    data = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    data["bgp"]["peers"] = [{"address": "fd00::1", "peer_as": 65000}]
    data["bgp"].pop("local_address_v6")
    f = write(tmp_path / "node.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_node_file(f)
    (msg,) = [str(p) for p in info.value.problems]
    assert f"{f}: bgp: peers[0].address fd00::1 is IPv6 but no local IPv6 address" in msg


def test_node_hold_time(tmp_path):
    data = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    data["bgp"]["hold_time"] = 2
    f = write(tmp_path / "node.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_node_file(f)
    assert "bgp.hold_time: hold_time 2 must be 0 or 3-65535" in str(info.value)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_check_config_examples_valid():
    r = run_cli("check-config", "configs/node.yaml", "configs/vips.d/web.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("configs/node.yaml: node 'lb-1'")
    assert any(line.startswith("configs/vips.d/web.yaml: 2 VIP(s)") for line in lines)


def test_check_config_of_an_etcd_node_names_its_source_not_a_directory():
    r = run_cli("check-config", "configs/lab/etcd/node-1.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "VIPs from etcd http://10.2.0.31:2379, http://10.2.0.32:2379, http://10.2.0.33:2379 under /maglev/" in r.stdout
    assert "VIP directory" not in r.stdout


def test_check_config_lists_every_error(tmp_path):
    f = write(tmp_path / "a.yaml", {"vips": [vip(table_size=100, bogus=1)]})
    r = run_cli("check-config", str(f), str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert "table_size 100 is not prime" in r.stdout
    assert "bogus: unknown key" in r.stdout
    assert "missing.yaml: no such file or directory" in r.stdout
    assert "3 error(s)" in r.stdout


def test_vips_the_node_cannot_serve_or_announce(tmp_path):
    from node.config import check_vips_for_node, parse_node_object, parse_vip_object

    data = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    data["bgp"]["peers"] = data["bgp"]["peers"][:1]  # IPv4 only
    data["forwarder"].pop("encap_source_v6")
    node = parse_node_object(data, "node.yaml")
    v6 = parse_vip_object(vip(name="web6", address="fd00:100::1", backends=[{"address": "fd00:1::2"}]))
    v4 = parse_vip_object(vip())
    msgs = [str(p) for p in check_vips_for_node({"web6": v6, "web": v4}, node, "vips.d")]
    assert msgs == [
        "vips.d: vip 'web6': backends: IPv6 backends need forwarder.encap_source_v6 in the node file (the GRE outer source)",
        "vips.d: vip 'web6': address: IPv6 VIP but the node has no IPv6 BGP peer: it could never be announced",
    ]
    data["forwarder"]["table_capacity"] = 65536
    node = parse_node_object(data, "node.yaml")
    (msg,) = [str(p) for p in check_vips_for_node({"web": v4}, node, "vips.d")]
    assert "tables need 131074 entries" in msg and "table_capacity is 65536" in msg


def test_vip_names_are_matched_whole():
    from node.config import parse_vip_object

    for bad in ("web\n", "web\r\n", "a" * 64, "-web", "we b"):
        with pytest.raises(ConfigError) as info:
            parse_vip_object(vip(name=bad))
        assert "name" in str(info.value)
    assert parse_vip_object(vip(name="a" * 63)).name == "a" * 63


def test_skipped_entries_and_unsafe_modes_are_reported(tmp_path):
    """Entries that look like VIP files but cannot be one are skipped, never silently; files
    anyone can rewrite load, with a warning."""
    import os

    from node.config import scan_vip_dir

    d = tmp_path / "vips"
    d.mkdir()
    write(d / "good.yaml", {"vips": [vip()]})
    open_file = write(d / "open.yaml", {"vips": [vip(name="open", address="10.100.0.2")]})
    open_file.chmod(0o666)
    (d / "subdir.yaml").mkdir()
    (d / "loop.yaml").symlink_to(d / "loop.yaml")
    (d / "dangling.yaml").symlink_to(d / "nowhere.yaml")
    os.mkfifo(d / "pipe.yaml")  # reading it would block the loader forever
    write(d / "notes.txt", "not a VIP file")
    files, warnings = scan_vip_dir(d)
    assert [p.name for p in files] == ["good.yaml", "open.yaml"]
    text = {Path(w.file).name: w.message for w in warnings}
    assert text == {
        "subdir.yaml": "is a directory, not a VIP file: skipped",
        "loop.yaml": "is a symlink loop: skipped",
        "dangling.yaml": f"is a dangling symlink (to {d / 'nowhere.yaml'}): skipped",
        "pipe.yaml": "is not a regular file (fifo, socket or device): skipped",
        "open.yaml": "is world-writable (mode 0666): any local user can change these VIPs (chmod o-w)",
    }
    assert sorted(load_vip_dir(d)) == ["open", "web"]  # skipping keeps the valid set loading
    d.chmod(0o777)
    assert any("VIP directory is world-writable" in w.message for w in scan_vip_dir(d)[1])


def test_vip_dir_signature_sees_edits_of_vip_files_only(tmp_path):
    import os

    from node.config import vip_dir_signature

    a = tmp_path / "a.yaml"
    a.write_text("vips: []\n")
    first = vip_dir_signature(tmp_path)
    assert [e[0] for e in first] == ["a.yaml"]
    (tmp_path / ".a.yaml.swp").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    assert vip_dir_signature(tmp_path) == first
    a.write_text("vips: {}\n")  # same size, rewritten
    os.utime(a, ns=(first[0][3] + 10**9, first[0][3] + 10**9))
    assert vip_dir_signature(tmp_path) != first
    (tmp_path / "b.yml").symlink_to(tmp_path / "missing.yaml")
    assert vip_dir_signature(tmp_path)[-1] == ("b.yml", None)
    assert vip_dir_signature(tmp_path / "gone") == ()


def test_small_and_big_files_parse_the_same():
    """A file under SMALL_YAML_BYTES is composed by libyaml in C, a bigger one by PyYAML's
    composer over libyaml's events: the same text gives the same data, aliases and errors."""
    from node import config as cfg

    body = ("vips:\n  - &one {name: web, address: 10.0.0.1, port: 80, backends: [{address: 10.0.1.1}]}\n"
            "  - *one\n  - {name: 'x', n: 0x1F, f: 1.5, t: yes, s: [a, b], m: {k: ~}}\n")
    big = body + "#" + " " * cfg.SMALL_YAML_BYTES + "\n"
    assert len(body) <= cfg.SMALL_YAML_BYTES < len(big)
    assert cfg.parse_yaml(body, "f") == cfg.parse_yaml(big, "f")
    for bad in ("a: *nope\n", "a: [1, 2\n", "&x a: 1\n&x b: 2\n"):
        errors = []
        for text in (bad, bad + "#" + " " * cfg.SMALL_YAML_BYTES + "\n"):
            try:
                cfg.parse_yaml(text, "f")
                errors.append(None)
            except cfg.ConfigError as exc:
                errors.append(str(exc.problems[0]).split(" in \"")[0].split("\n")[0])
        assert errors[0] is not None and errors[0] == errors[1], errors
