"""The fleet's pure parts: the comparison of node records, the key layout and object parsing,
the node file's etcd section, and the apply plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from node.config import ConfigError, parse_node_object, parse_vip_object
from node.fleet import layout, objects, view

REPO = Path(__file__).resolve().parents[2]


def record(node: str, revision: int = 7, digest: str = "aaaa", health=None, override=None, vips=("web",)):
    health = health or {}
    backends = {k: {"health": health.get(k, "up"), "admin": "active", "serving": True,
                    "override": (override or {}).get(k)} for k in ("10.0.1.1", "10.0.1.2")}
    return {"node_id": node, "revision": revision, "stale": False, "drained": False,
            "vips": {v: {"digest": digest, "announced": True, "reason": "", "backends": backends} for v in vips}}


def test_agreeing_fleet():
    fleet = view.compare([record("b"), record("a")])
    assert [n["node_id"] for n in fleet["nodes"]] == ["a", "b"]
    assert fleet["differing"] == [] and fleet["revisions"] == [7]
    assert fleet["vips"]["web"] == {"agree": True, "digests": {"a": "aaaa", "b": "aaaa"}, "reasons": []}
    assert "same table digest on every live node" in view.render(fleet)


def test_reason_different_revision():
    fleet = view.compare([record("a"), record("b", revision=6, digest="bbbb")])
    assert fleet["differing"] == ["web"]
    assert fleet["vips"]["web"]["reasons"] == ["different revision: a at 7, b at 6"]


def test_reason_health_view_names_the_backend_and_nodes():
    fleet = view.compare([record("a"), record("b"), record("c", digest="cccc", health={"10.0.1.2": "down"})])
    assert fleet["vips"]["web"]["reasons"] == [
        "different health view of backend 10.0.1.2: down on c; up on a, b"]
    text = view.render(fleet)
    assert "VIP web: DIGESTS DIFFER: a=aaaa, b=aaaa, c=cccc" in text


def test_reason_operator_override():
    fleet = view.compare([record("a"), record("b", digest="bbbb", override={"10.0.1.1": "drain"})])
    assert fleet["vips"]["web"]["reasons"] == ["operator override of backend 10.0.1.1 on b (drain)"]


def test_reason_missing_vip_and_unexplained():
    fleet = view.compare([record("a", vips=("web", "api")), record("b")])
    assert fleet["differing"] == ["api"]
    assert fleet["vips"]["api"]["reasons"] == ["not configured on b"]
    fleet = view.compare([record("a"), record("b", digest="bbbb")])
    assert "compare `maglev table`" in fleet["vips"]["web"]["reasons"][0]


def test_empty_fleet():
    fleet = view.compare([])
    assert fleet["nodes"] == [] and "(no live node in the registry)" in view.render(fleet)


def vip(name="web", address="10.100.0.1", **extra) -> dict:
    return {"name": name, "address": address, "port": 80, "table_size": 251,
            "backends": [{"address": "10.0.1.1"}], **extra}


def test_an_etcd_revision_is_validated_like_a_directory():
    from node.vip_source import load_fleet_vips

    node = parse_node_object(node_dict(), "n.yaml")

    def parse_objects(prefix, objects, where):  # what a node's reload runs on a revision
        return load_fleet_vips(prefix, objects, where, node, "etcd /m/config/vips/")

    good = {layout.vip_key("/m/", "web"): json.dumps(vip()).encode(), layout.stamp_key("/m/"): b"{}"}
    parsed = parse_objects("/m/", good, "revision 3")
    assert list(parsed) == ["web"] and str(parsed["web"][0]) == "etcd:/m/config/vips/web"

    bad = {
        layout.vip_key("/m/", "web"): json.dumps(vip()).encode(),
        layout.vip_key("/m/", "other"): json.dumps(vip("other")).encode(),  # same address+port
        layout.vip_key("/m/", "named"): json.dumps(vip("wrong", "10.100.0.3")).encode(),
        layout.vip_key("/m/", "junk"): b"{not json",
        layout.vip_key("/m/", "prime"): json.dumps(vip("prime", "10.100.0.4", table_size=250)).encode(),
    }
    with pytest.raises(ConfigError) as exc:
        parse_objects("/m/", bad, "revision 4")
    text = str(exc.value)
    assert "etcd /m/config/vips/junk (revision 4): not JSON" in text
    assert "the key names VIP 'named' but the object says 'wrong'" in text
    assert "table_size 250 is not prime" in text
    # The set's checks (as a directory's: once every object parses) catch what no object shows.
    overlapping = {k: v for k, v in bad.items() if k.endswith(("/web", "/other"))}
    with pytest.raises(ConfigError, match="overlaps VIP"):
        parse_objects("/m/", overlapping, "revision 4")


def test_encoding_is_canonical():
    a = parse_vip_object(vip(port=80))
    b = parse_vip_object(dict(reversed(list(vip().items()))))
    assert layout.encode_vip(a) == layout.encode_vip(b)


def node_dict(**extra) -> dict:
    node = yaml.safe_load((REPO / "configs/node.yaml").read_text())
    node.update(extra)
    return node


def test_node_file_etcd_section():
    cfg = parse_node_object(node_dict(config_source="etcd", etcd={"endpoints": ["http://10.0.9.1:2379/"]}), "n.yaml")
    assert cfg.etcd.endpoints == ["http://10.0.9.1:2379"] and cfg.etcd.prefix == "/maglev/"
    assert parse_node_object(node_dict(), "n.yaml").config_source == "directory"
    cases = [
        ({"config_source": "etcd"}, "config_source etcd needs an etcd section"),
        ({"config_source": "etcd", "etcd": {"endpoints": ["10.0.9.1:2379"]}}, "must be a URL like http://"),
        ({"config_source": "etcd", "etcd": {"endpoints": ["http://a:1"], "prefix": "maglev"}}, "must start and end with '/'"),
        ({"config_source": "etcd", "etcd": {"endpoints": ["http://a:1"], "username": "u"}}, "username and password_file"),
        ({"config_source": "zookeeper"}, "config_source"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as exc:
            parse_node_object(node_dict(**extra), "n.yaml")
        assert message in str(exc.value), (extra, str(exc.value))


def test_fleet_command_checks_endpoints_and_prefix_given_over_a_node_file(tmp_path, capsys, monkeypatch):
    """--endpoints and --prefix over a node file's etcd section get the node file's checks (they
    used to reach the client unchecked), an unreadable password or CA file is named (it was a
    traceback), and every refusal names what to fix; nothing is sent."""
    from node.cli import main

    monkeypatch.delenv("MAGLEV_ETCD_ENDPOINTS", raising=False)
    node = tmp_path / "node.yaml"
    node.write_text(yaml.safe_dump(node_dict(config_source="etcd", etcd={"endpoints": ["http://127.0.0.1:1"]})))
    secured = tmp_path / "secured.yaml"
    secured.write_text(yaml.safe_dump(node_dict(config_source="etcd", etcd={
        "endpoints": ["http://127.0.0.1:1"], "username": "u", "password_file": "no-password"})))
    tls = tmp_path / "tls.yaml"
    tls.write_text(yaml.safe_dump(node_dict(config_source="etcd", etcd={
        "endpoints": ["https://127.0.0.1:1"], "ca_file": str(tmp_path / "no-ca.pem")})))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(node_dict()))
    cases = [
        (["-c", str(node), "--endpoints", "10.0.9.1:2379"], "endpoints: endpoint '10.0.9.1:2379' must be a URL"),
        (["-c", str(node), "--prefix", "maglev"], "prefix: prefix 'maglev' must start and end with '/'"),
        (["--endpoints", "etcd-1"], "endpoint 'etcd-1' must be a URL"),
        (["-c", str(plain)], f"{plain} has no etcd section"),
        (["-c", str(tmp_path / "missing.yaml")], "missing.yaml: cannot read"),
        (["-c", str(secured)], f"etcd.password_file {tmp_path / 'no-password'}: cannot read: No such file"),
        (["-c", str(tls)], f"etcd TLS files (ca_file {tmp_path / 'no-ca.pem'}): cannot load: No such file"),
        ([], "say where etcd is"),
    ]
    for extra, message in cases:
        assert main(["fleet", "status", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and "pydantic" not in err, (extra, err)


def current(*vips_: dict) -> objects.Current:
    parsed = [parse_vip_object(v) for v in vips_]
    return objects.Current(stamp_revision=5, vips={v.name: v for v in parsed},
                           raw={v.name: layout.encode_vip(v) for v in parsed}, mod={v.name: 5 for v in parsed})


def test_plan_add_change_unchanged():
    cur = current(vip(), vip("api", "10.100.0.2"))
    new = [parse_vip_object(vip()), parse_vip_object(vip("api", "10.100.0.2", port=81)),
           parse_vip_object(vip("dns", "10.100.0.3"))]
    p = objects.plan(cur, new)
    assert (p.added, p.changed, p.unchanged) == (["dns"], ["api"], ["web"])
    assert "-  port: 80" in p.diffs["api"] and "+  port: 81" in p.diffs["api"]
    assert objects.plan(cur, [parse_vip_object(vip())]).empty


def test_result_set_checked_against_what_stays():
    cur = current(vip())
    with pytest.raises(objects.Refused) as exc:
        objects.check_result(cur, [parse_vip_object(vip("other"))], [], None)
    assert "overlaps VIP 'web'" in " ".join(exc.value.problems)
    objects.check_result(cur, [parse_vip_object(vip("other"))], ["web"], None)  # web replaced: fine
    node = parse_node_object(node_dict(forwarder={**node_dict()["forwarder"], "table_capacity": 256}), "n.yaml")
    with pytest.raises(objects.Refused) as exc:
        objects.check_result(cur, [], [], node)
    assert "forwarder.table_capacity is 256" in " ".join(exc.value.problems)


def test_maglev_status_shows_the_etcd_revision_staleness_cache_and_refusal(capsys):
    import argparse

    from node.commands.ops import cmd_status

    source = {"type": "etcd", "endpoint": "http://10.0.9.1:2379", "prefix": "/maglev/", "revision": 42,
              "stale": True, "stale_for": 3.0, "stale_reason": "no etcd endpoint answered",
              "served_from_cache": True,
              "rejected": {"revision": 43, "problems": ["revision 43: web: table_size 250 is not prime"]}}
    status = {"node_id": "lb-1", "uptime": 1.0, "warmup_over": True, "node_drained": False,
              "forwarder": {"ok": True, "mode": "native", "interfaces": ["eth0"], "error": None,
                            "last_self_test": {"reason": "ok"}},
              "bgp": {"sessions": {}}, "vips": {}, "last_reload": None, "config_source": source}

    class Client:
        def get(self, path):
            return status

    cmd_status(Client(), argparse.Namespace(json=False))
    out = capsys.readouterr().out
    assert ("config: etcd http://10.0.9.1:2379 /maglev/  revision 42  STALE for 3.0 s (no etcd endpoint "
            "answered): serving the last good config  (from the local cache)") in out
    assert "config: etcd revision 43 REFUSED by this node: revision 43: web: table_size 250 is not prime" in out
    source.update(stale=False, served_from_cache=False, rejected=None)
    cmd_status(Client(), argparse.Namespace(json=False))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("config:")]
    assert lines == ["config: etcd http://10.0.9.1:2379 /maglev/  revision 42"]


def test_a_node_whose_etcd_password_file_is_missing_says_so_and_exits_2(tmp_path):
    import subprocess
    import sys

    node = node_dict(config_source="etcd", etcd={"endpoints": ["http://127.0.0.1:1"], "username": "u",
                                                 "password_file": "no-password"})
    node.update(run_dir=str(tmp_path / "run"), vip_dir=str(tmp_path / "vips"), api={"token_file": "token"})
    (tmp_path / "token").write_text("t" * 32 + "\n")
    (tmp_path / "token").chmod(0o600)
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(node))
    proc = subprocess.run([sys.executable, "-m", "node.cli", "node", "-c", str(tmp_path / "node.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"etcd.password_file {tmp_path / 'no-password'}: cannot read" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_key_under_the_nodes_prefix_that_is_not_a_record_is_skipped():
    """Someone else's key under <prefix>nodes/ must not break the fleet view (it crashed the
    monitor, and with it the node's whole etcd task group, every second)."""
    from node.fleet.etcd import KeyValue
    from node.fleet.registry import FleetMonitor, read_records

    good = record("n1")
    values = [json.dumps(good), "[1, 2]", '"text"', "not json", json.dumps({"node_id": 7}),
              json.dumps({"node_id": "x", "vips": {"web": "digest"}}),
              json.dumps({"node_id": "y", "vips": {"web": {"backends": ["10.0.1.1"]}}})]

    class Client:
        async def get_prefix(self, prefix):
            return 9, [KeyValue(f"/m/nodes/{i}", v.encode(), 9) for i, v in enumerate(values)]

    assert await read_records(Client(), "/m/") == [good]
    monitor = FleetMonitor(Client(), "/m/")
    monitor.observe(view.compare(await read_records(Client(), "/m/")))
    assert [n["node_id"] for n in monitor.last["nodes"]] == ["n1"]


async def test_the_fleet_monitor_survives_a_failing_comparison(monkeypatch):
    import asyncio

    from node.events import EventLog
    from node.fleet import registry

    class Client:
        async def get_prefix(self, prefix):
            return 1, []

    def broken(records):
        raise RuntimeError("a bug in the comparison")

    monkeypatch.setattr(registry.view, "compare", broken)
    events = EventLog()
    task = asyncio.create_task(registry.FleetMonitor(Client(), "/m/", events=events).run())
    try:
        for _ in range(100):
            if events.recent:
                break
            await asyncio.sleep(0.01)
        assert not task.done()  # it goes on (a crash would restart the node's etcd task group)
        assert [e["event"] for e in events.recent] == ["fleet_monitor_failed"]
        assert "a bug in the comparison" in events.recent[0]["msg"]
    finally:
        task.cancel()
