"""docker-compose.etcd.yml (the compose lab with its VIPs in etcd) agrees with the lab's plan:
three members on a control network of their own, every node on it with its etcd node file,
the fabric still each node's first interface, and a seed that applies the lab's VIP file.
(No Docker engine runs here: the merged structure is checked, as for docker-compose.yml.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lab import plan as P
from node.config import load_node_file, load_vip_file

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ETCD = yaml.safe_load((ROOT / "docker-compose.etcd.yml").read_text())
PLAN = P.LabPlan(config_source="etcd")


def test_members_match_the_plan():
    members = {k: v for k, v in ETCD["services"].items() if k.startswith("etcd-")}
    assert sorted(members) == [f"etcd-{k}" for k in range(1, P.ETCD_MEMBERS + 1)]
    cluster = ETCD["x-etcd-member"]["environment"]["MAGLEV_ETCD_CLUSTER"]
    for k in range(1, P.ETCD_MEMBERS + 1):
        svc = members[f"etcd-{k}"]
        addr = P.etcd_address(k)
        assert svc["command"] == ["etcd", f"etcd-{k}", addr]
        assert svc["networks"] == {"control": {"ipv4_address": addr}}
        assert f"etcd-{k}=http://{addr}:{P.ETCD_PEER_PORT}" in cluster
    assert ETCD["networks"]["control"]["ipam"]["config"][0]["subnet"] == "10.2.0.0/24"
    seed = ETCD["services"]["fleet-seed"]
    assert seed["environment"]["MAGLEV_ETCD_ENDPOINTS"].split(",") == P.etcd_endpoints()


def test_nodes_use_their_etcd_node_file_and_keep_the_fabric_first():
    for h in PLAN.node_hosts:
        svc = ETCD["services"][h.name]
        assert h.name in BASE["services"], "the override only extends services of docker-compose.yml"
        host = ROOT / svc["volumes"][0].split(":")[0]
        node = load_node_file(host)
        assert node.config_source == "etcd" and node.etcd.endpoints == P.etcd_endpoints()
        expected = PLAN.node_file(h.index, vip_dir="/etc/maglev/vips.d", run_dir="/run/maglev",
                                  bpffs="/sys/fs/bpf/maglev", token_file="/run/maglev/api-token",
                                  xdp_mode="generic")
        assert yaml.safe_load(host.read_text()) == expected
        nets = svc["networks"]
        assert nets["fabric"]["priority"] > nets["control"]["priority"]  # eth0 = fabric
        assert nets["fabric"]["ipv4_address"] == BASE["services"][h.name]["networks"]["fabric"]["ipv4_address"]
        assert nets["control"]["ipv4_address"] == P.node_control_address(h.index)


def test_entrypoint_and_image_know_the_new_roles():
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    for svc in ETCD["services"].values():
        if "command" in svc:
            assert re.search(rf"^{svc['command'][0]}\)", script, re.M)
    assert "etcd-server" in (ROOT / "Dockerfile").read_text()
    seeded = load_vip_file(ROOT / "configs/lab/vips.d/lab.yaml")
    assert {v.name for v in seeded} == {"web4", "web6"}
