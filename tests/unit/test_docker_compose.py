"""docker-compose.yml describes the same lab as `maglev lab` (no Docker engine runs here, so the
file's structure is checked instead): services and networks, every referenced file exists, every
node and VIP config validates with the node's own loaders, and addresses agree with lab/plan.py
and with the router's BGP config."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import yaml

from lab import plan as P
from node.config import load_node_file, load_vip_dir

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PLAN = P.LabPlan()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services(compose: dict, prefix: str) -> dict[str, dict]:
    return {k: v for k, v in compose["services"].items() if k.startswith(prefix)}


def host_volumes(svc: dict) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts."""
    out = {}
    for v in svc.get("volumes", []):
        host, container = v.split(":")[:2]
        out[container] = (ROOT / host).resolve()
    return out


def test_every_role_has_a_service(compose: dict) -> None:
    names = set(compose["services"])
    expected = {"router", "client", *(h.name for h in PLAN.node_hosts), *(h.name for h in PLAN.backend_hosts)}
    assert expected <= names, f"missing services: {expected - names}"


def test_networks_match_the_lab_plan(compose: dict) -> None:
    nets = compose["networks"]
    subnets = {n: {c["subnet"] for c in nets[n]["ipam"]["config"]} for n in ("client", "fabric")}
    assert subnets["client"] == {"10.0.0.0/24", "fd00::/64"}
    assert subnets["fabric"] == {"10.1.0.0/24", "fd00:1::/64"}
    assert int(nets["fabric"]["driver_opts"]["com.docker.network.driver.mtu"]) == P.FABRIC_MTU
    for n in ("client", "fabric"):
        assert nets[n]["enable_ipv6"] is True
        # Docker's gateway must not take the router's address.
        gateways = {c.get("gateway") for c in nets[n]["ipam"]["config"]}
        assert not gateways & {P.ROUTER_FABRIC_V4, P.ROUTER_FABRIC_V6, P.ROUTER_CLIENT_V4, P.ROUTER_CLIENT_V6}
    router = compose["services"]["router"]["networks"]
    assert router["fabric"] == {"ipv4_address": P.ROUTER_FABRIC_V4, "ipv6_address": P.ROUTER_FABRIC_V6}
    assert router["client"] == {"ipv4_address": P.ROUTER_CLIENT_V4, "ipv6_address": P.ROUTER_CLIENT_V6}
    client = compose["services"]["client"]["networks"]
    assert list(client) == ["client"], "the client must reach the fabric only through the router"


def test_every_referenced_file_exists(compose: dict) -> None:
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file(), name
        for container, host in host_volumes(svc).items():
            assert host.exists(), f"{name}: volume source {host} (for {container}) does not exist"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(\S+)\s", dockerfile, re.M):
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "ENTRYPOINT" in dockerfile


def test_node_services_can_run_bpf(compose: dict) -> None:
    nodes = services(compose, "node-")
    assert len(nodes) == PLAN.nodes
    for name, svc in {**nodes, **services(compose, "backend-")}.items():
        caps = set(svc.get("cap_add", []))
        assert svc.get("privileged") is True or {"NET_ADMIN", "BPF", "SYS_ADMIN"} <= caps, name


def test_node_configs_validate_and_match_their_service(compose: dict) -> None:
    for h in PLAN.node_hosts:
        svc = compose["services"][h.name]
        vols = host_volumes(svc)
        node = load_node_file(vols["/etc/maglev/node.yaml"])
        vips = load_vip_dir(vols[str(node.vip_dir)])  # the node's VIP dir is mounted from configs/
        assert set(vips) == {"web4", "web6"}
        net = svc["networks"]["fabric"]
        assert node.node_id == h.name
        assert str(node.bgp.local_address) == net["ipv4_address"]
        assert str(node.bgp.local_address_v6) == net["ipv6_address"]
        assert str(node.forwarder.encap_source_v4) == net["ipv4_address"]
        assert {str(p.address) for p in node.bgp.peers} == {P.ROUTER_FABRIC_V4, P.ROUTER_FABRIC_V6}
        assert node.forwarder.mtu == P.FABRIC_MTU
        # The docker node file is the lab's own, with container paths and generic XDP.
        expected = PLAN.node_file(h.index, vip_dir="/etc/maglev/vips.d", run_dir="/run/maglev",
                                  bpffs="/sys/fs/bpf/maglev", token_file="/run/maglev/api-token",
                                  xdp_mode="generic")
        assert yaml.safe_load(vols["/etc/maglev/node.yaml"].read_text()) == expected


def test_vip_file_is_the_labs_and_lists_every_backend(compose: dict) -> None:
    path = ROOT / "configs" / "lab" / "vips.d" / "lab.yaml"
    assert yaml.safe_load(path.read_text()) == PLAN.vip_file()
    vips = load_vip_dir(path.parent)
    backend_addrs = {
        ipaddress.ip_address(a)
        for name, svc in services(compose, "backend-").items()
        for a in svc["networks"]["fabric"].values()
    }
    configured = {b.address for v in vips.values() for b in v.backends}
    assert configured == backend_addrs


def test_router_bgp_config_peers_with_every_node(compose: dict) -> None:
    router = compose["services"]["router"]
    conf = host_volumes(router)["/etc/maglev/frr/bgpd.conf"].read_text()
    assert f"router bgp {P.ROUTER_AS}" in conf
    assert "maximum-paths" in conf and "no bgp ebgp-requires-policy" in conf
    for name, svc in services(compose, "node-").items():
        for addr in svc["networks"]["fabric"].values():
            assert re.search(rf"neighbor {re.escape(addr)} remote-as {P.NODE_AS}\b", conf), (name, addr)
            assert f"neighbor {addr} activate" in conf
            # BFD (bfdd on the router, bgp.bfd on the node) drops a dead node in ~0.3 s.
            assert f"neighbor {addr} bfd profile" in conf, (name, addr)
    # Graceful restart helper (FRR's default) with a bounded wait for a node's End-of-RIB.
    assert f"bgp graceful-restart stalepath-time {P.GR_STALEPATH_TIME}" in conf
    bfdd = host_volumes(router)["/etc/maglev/frr/bfdd.conf"].read_text()
    assert [ln for ln in bfdd.splitlines() if not ln.startswith("!")] == PLAN.bfd_config().splitlines()
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "/usr/lib/frr/bfdd" in script and "/etc/maglev/frr/bfdd.conf" in script
    sysctls = router["sysctls"]
    assert sysctls["net.ipv4.fib_multipath_hash_policy"] == "1"
    assert sysctls["net.ipv6.fib_multipath_hash_policy"] == "1"


def test_entrypoint_knows_every_command_used(compose: dict) -> None:
    script = (ROOT / "docker" / "entrypoint.sh").read_text()
    for name, svc in compose["services"].items():
        role = svc["command"][0]
        assert re.search(rf"^{role}\)", script, re.M), f"{name}: entrypoint has no role {role!r}"


def test_lab_plan_names_and_limits() -> None:
    """The plan both files come from: role names map to namespaces, sizes are bounded with a
    message naming the option."""
    plan = P.LabPlan(nodes=2, backends=4)
    assert plan.role_namespace("router") == "mlb-router"
    assert plan.role_namespace("node-2") == plan.role_namespace("node2") == "mlb-node-2"
    assert plan.role_namespace("backend-4") == "mlb-backend-4"
    with pytest.raises(ValueError, match="node 3 does not exist"):
        plan.role_namespace("node-3")
    with pytest.raises(ValueError, match="unknown role"):
        plan.role_namespace("switch")
    with pytest.raises(ValueError, match="--nodes 0"):
        P.LabPlan(nodes=0)
    with pytest.raises(ValueError, match="--backends 10"):
        P.LabPlan(backends=10)
    # Every interface name fits IFNAMSIZ and every address is unique.
    hosts = [*plan.node_hosts, *plan.backend_hosts]
    assert all(len(h.router_port) <= 15 for h in hosts)
    assert len({h.v4 for h in hosts} | {h.v6 for h in hosts} | {h.mac for h in hosts}) == 3 * len(hosts)
