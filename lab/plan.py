"""The lab's addressing plan and the config files it renders (pure: no I/O, no root).

One place decides every name, address and MAC of the lab so that `maglev lab up`, `status`, the
end-to-end tests, the demo and the docker-compose files all agree. Nothing here touches the
system; `lab.topology` builds what this describes.

Wiring (defaults: 3 nodes, 3 backends)::

    mlb-client eth0 10.0.0.2/24 fd00::2/64
        |  (veth, MTU 1500: the client's world)
    mlb-router to-client 10.0.0.1/24 fd00::1/64
    mlb-router bridge "fabric" 10.1.0.1/24 fd00:1::1/64, MTU 1600 (room for GRE's 24/44 bytes)
        |-- port node-I    <-> mlb-node-I eth0    10.1.0.(10+I) fd00:1::(10+I)
        |-- port backend-J <-> mlb-backend-J eth0 10.1.0.(20+J) fd00:1::(20+J)

The router runs FRR (AS 65000) with one eBGP session per node and family, each with BFD
(100 ms x 3: FRR's bfdd on the router and on every node); every node is AS 65001. The client's only route to the VIPs is its default route via the router, which spreads
flows over the nodes by ECMP; a node's XDP program encapsulates each packet in GRE to a
backend over the fabric; the backend decapsulates and answers the client directly (DSR) via
its default route, the router.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 9
MAX_BACKENDS = 9
RUN_DIR = Path("/run/maglev-lab")
NS_PREFIX = "mlb-"
ROUTER_NS = "mlb-router"
CLIENT_NS = "mlb-client"
ROUTER_AS = 65000
NODE_AS = 65001
FABRIC_BRIDGE = "fabric"
FABRIC_MTU = 1600
CLIENT_MTU = 1500
ROUTER_FABRIC_V4 = "10.1.0.1"
ROUTER_FABRIC_V6 = "fd00:1::1"
ROUTER_FABRIC_MAC = "02:00:0a:01:00:01"
ROUTER_CLIENT_V4 = "10.0.0.1"
ROUTER_CLIENT_V6 = "fd00::1"
CLIENT_V4 = "10.0.0.2"
CLIENT_V6 = "fd00::2"
VIP_V4 = "10.100.0.1"
VIP_V6 = "fd00:100::1"
# Not in any VIP file at start: the end-to-end tests add it by dropping a VIP file into every
# node. Backends listen on it from the start (FREEBIND), so only the VIP config changes.
SPARE_VIP_V4 = "10.100.0.2"
VIP_PORT = 80
HEALTH_PORT = 8080
API_PORT = 9180
# BFD between every node and the router: a crashed node leaves the router's FIB in ~0.3 s
# (interval x multiplier) instead of the 2-3 s the BGP hold timer takes.
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3
# Graceful restart: a lab node restarts in a few seconds; its routes stay at most this long
# after its process died (bgp.graceful_restart.restart_time), and at most GR_STALEPATH_TIME
# after its new session came up without End-of-RIB (the router's stalepath-time).
GR_RESTART_TIME = 10
GR_STALEPATH_TIME = 20

# --config-source etcd: a 3-member etcd cluster on its own control network (bridge "control" in
# the router's namespace, not routed), so a node's links to etcd can fail while its data path
# stays up. Node I has ctl0 10.2.0.(10+I); etcd member K is mlb-etcd-K at 10.2.0.(30+K).
CONFIG_SOURCES = ("directory", "etcd")
ETCD_MEMBERS = 3
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_PREFIX = "/maglev/"
CONTROL_BRIDGE = "control"


def etcd_address(k: int) -> str:
    return f"10.2.0.{30 + k}"


def node_control_address(i: int) -> str:
    return f"10.2.0.{10 + i}"


def etcd_endpoints() -> list[str]:
    return [f"http://{etcd_address(k)}:{ETCD_CLIENT_PORT}" for k in range(1, ETCD_MEMBERS + 1)]


@dataclass(frozen=True)
class Host:
    """One namespace on the fabric (a node or a backend)."""

    role: str  # "node" | "backend"
    index: int
    ns: str
    v4: str
    v6: str
    mac: str
    router_port: str  # the bridge port in mlb-router facing this host

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"


def _host(role: str, index: int, base: int) -> Host:
    host_id = base + index
    return Host(
        role=role,
        index=index,
        ns=f"{NS_PREFIX}{role}-{index}",
        v4=f"10.1.0.{host_id}",
        v6=f"fd00:1::{host_id}",
        # Fixed MACs keep neighbour entries and captures readable and stable across runs.
        mac=f"02:00:0a:01:00:{host_id:02x}",
        router_port=f"{role}-{index}",
    )


@dataclass(frozen=True)
class LabPlan:
    nodes: int = 3
    backends: int = 3
    run_dir: Path = RUN_DIR
    config_source: str = "directory"
    node_hosts: tuple[Host, ...] = field(init=False)
    backend_hosts: tuple[Host, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"--nodes {self.nodes}: the lab supports 1 to {MAX_NODES} nodes")
        if not 1 <= self.backends <= MAX_BACKENDS:
            raise ValueError(f"--backends {self.backends}: the lab supports 1 to {MAX_BACKENDS} backends")
        if self.config_source not in CONFIG_SOURCES:
            raise ValueError(f"--config-source {self.config_source}: use {' or '.join(CONFIG_SOURCES)}")
        object.__setattr__(self, "node_hosts", tuple(_host("node", i, 10) for i in range(1, self.nodes + 1)))
        object.__setattr__(
            self, "backend_hosts", tuple(_host("backend", j, 20) for j in range(1, self.backends + 1))
        )

    # ---------------------------------------------------------------- lookups

    def node(self, index: int) -> Host:
        if not 1 <= index <= self.nodes:
            raise ValueError(f"node {index} does not exist (the lab has nodes 1-{self.nodes})")
        return self.node_hosts[index - 1]

    def backend(self, index: int) -> Host:
        if not 1 <= index <= self.backends:
            raise ValueError(f"backend {index} does not exist (the lab has backends 1-{self.backends})")
        return self.backend_hosts[index - 1]

    def namespaces(self) -> list[str]:
        return [ROUTER_NS, CLIENT_NS, *(h.ns for h in self.node_hosts), *(h.ns for h in self.backend_hosts)]

    def role_namespace(self, role: str) -> str:
        """'router', 'client', 'node-2', 'backend-1' (or 'node2') -> the namespace name."""
        r = role.strip().lower().removeprefix(NS_PREFIX)
        if r in ("router", "client"):
            return f"{NS_PREFIX}{r}"
        for kind, hosts in (("node", self.node_hosts), ("backend", self.backend_hosts)):
            if r.startswith(kind):
                num = r[len(kind):].lstrip("-")
                if num.isdigit():
                    return (self.node if kind == "node" else self.backend)(int(num)).ns
        raise ValueError(f"unknown role {role!r}: use router, client, node-I or backend-J")

    # ---------------------------------------------------------------- paths

    def node_dir(self, index: int) -> Path:
        return self.run_dir / f"node-{index}"

    def backend_dir(self, index: int) -> Path:
        return self.run_dir / f"backend-{index}"

    @property
    def router_dir(self) -> Path:
        return self.run_dir / "router"

    @property
    def token_file(self) -> Path:
        return self.run_dir / "api-token"

    # ---------------------------------------------------------------- rendered configs

    def vip_file(self) -> dict[str, Any]:
        """The lab's VIP file: one IPv4 and one IPv6 VIP on port 80 over every backend. The
        checks go through the tunnel (VIP:8080 GRE-encapsulated to each backend, answered by
        DSR), so a backend that loses its VIP or its decap leaves the tables."""
        check = {
            "type": "http",
            "via": "tunnel",
            "path": "/healthz",
            "port": HEALTH_PORT,
            # Fast enough that a dead backend leaves the tables in ~1.5 s (interval x fall).
            "interval": 0.5,
            "timeout": 0.4,
            "rise": 2,
            "fall": 3,
        }
        return {
            "vips": [
                {
                    "name": "web4",
                    "address": VIP_V4,
                    "protocol": "tcp",
                    "port": VIP_PORT,
                    "table_size": 65537,
                    "backends": [{"address": b.v4} for b in self.backend_hosts],
                    "health_check": dict(check),
                    "announce": {"min_healthy": 1},
                },
                {
                    "name": "web6",
                    "address": VIP_V6,
                    "protocol": "tcp",
                    "port": VIP_PORT,
                    "table_size": 65537,
                    "backends": [{"address": b.v6} for b in self.backend_hosts],
                    "health_check": dict(check),
                    "announce": {"min_healthy": 1},
                },
            ]
        }

    def node_file(
        self,
        index: int,
        *,
        vip_dir: str | None = None,
        run_dir: str | None = None,
        bpffs: str | None = None,
        token_file: str | None = None,
        xdp_mode: str = "native",
        interface: str = "eth0",
    ) -> dict[str, Any]:
        """Node I's node file. Paths default to the lab's run directory; docker-compose passes
        its own."""
        h = self.node(index)
        d = self.node_dir(index)
        node = {
            "node_id": h.name,
            "vip_dir": vip_dir or str(d / "vips.d"),
            "run_dir": run_dir or str(d / "run"),
            # Backends answer their first probes within a second; 5 s covers a slow start.
            "warmup": 5,
            "log_format": "text",
            "bgp": {
                "local_as": NODE_AS,
                "router_id": h.v4,
                "local_address": h.v4,
                "local_address_v6": h.v6,
                "next_hop": "self",
                "hold_time": 3,
                "withdraw_delay": 1,
                "peers": [
                    {"address": ROUTER_FABRIC_V4, "peer_as": ROUTER_AS},
                    {"address": ROUTER_FABRIC_V6, "peer_as": ROUTER_AS},
                ],
                "bfd": {"enabled": True, "interval_ms": BFD_INTERVAL_MS, "multiplier": BFD_MULTIPLIER},
                # The router keeps a node's routes this long while it restarts (with
                # forwarder.on_stop: keep), or after its process died with its host alive.
                "graceful_restart": {"enabled": True, "restart_time": GR_RESTART_TIME},
            },
            "forwarder": {
                "interfaces": [interface],
                "xdp_mode": xdp_mode,
                "encap_source_v4": h.v4,
                "encap_source_v6": h.v6,
                "mtu": FABRIC_MTU,
                "bpffs": bpffs or str(d / "bpffs"),
                "self_test_interval": 2,
                "on_stop": "detach",
            },
            "api": {
                "listen": "127.0.0.1",
                "port": API_PORT,
                "token_file": token_file or str(self.token_file),
            },
        }
        if self.config_source == "etcd":
            node["config_source"] = "etcd"
            # Lab timings: a dead node leaves the registry in 3 s; a dead member costs 0.5 s.
            node["etcd"] = {"endpoints": etcd_endpoints(), "prefix": ETCD_PREFIX, "lease_ttl": 3,
                            "request_timeout": 0.5}
        return node

    def frr_config(self) -> str:
        """bgpd's config for the router (rendered by lab.frr): one static eBGP neighbor per node
        and family with BFD (static, because BFD needs it), ECMP over all of them; BFD drops a
        dead node's path in ~0.3 s, the 1 s keepalive / 3 s hold within ~3 s without it."""
        from lab.frr import Neighbor, render_config  # helper-4's renderer; imported on use

        neighbors = [Neighbor(addr, NODE_AS, bfd=True) for h in self.node_hosts for addr in (h.v4, h.v6)]
        return render_config(
            asn=ROUTER_AS, router_id=ROUTER_FABRIC_V4, neighbors=neighbors, maximum_paths=16,
            multipath_relax=True, timers=(1, 3), hostname="mlb-router", stalepath_time=GR_STALEPATH_TIME,
        )

    def bfd_config(self) -> str:
        """bfdd's config for the router: the profile its neighbors use (the nodes' bfdd peers
        with the router from their own config, bgp.bfd)."""
        from bgp.bfd import render_bfd_config

        return render_bfd_config(interval_ms=BFD_INTERVAL_MS, multiplier=BFD_MULTIPLIER)

    def wiring(self) -> str:
        """Human description printed by `lab up` and `lab status`."""
        out = [
            f"client   {CLIENT_NS:<14} eth0 {CLIENT_V4}/24 {CLIENT_V6}/64  (default via router)",
            f"router   {ROUTER_NS:<14} to-client {ROUTER_CLIENT_V4}/24 {ROUTER_CLIENT_V6}/64; "
            f"bridge {FABRIC_BRIDGE} {ROUTER_FABRIC_V4}/24 {ROUTER_FABRIC_V6}/64 mtu {FABRIC_MTU}; "
            f"FRR AS {ROUTER_AS}, BFD {BFD_INTERVAL_MS} ms x {BFD_MULTIPLIER} with every node",
        ]
        for h in self.node_hosts:
            out.append(
                f"{h.name:<8} {h.ns:<14} eth0 {h.v4}/24 {h.v6}/64 mac {h.mac} <-> router port "
                f"{h.router_port}; AS {NODE_AS}; API 127.0.0.1:{API_PORT}"
            )
        for h in self.backend_hosts:
            out.append(
                f"{h.name:<8} {h.ns:<14} eth0 {h.v4}/24 {h.v6}/64 mac {h.mac} <-> router port "
                f"{h.router_port}; HTTP on the VIPs :{VIP_PORT}, health :{HEALTH_PORT}/healthz"
            )
        if self.config_source == "etcd":
            out.append(f"etcd     mlb-etcd-1..{ETCD_MEMBERS} {etcd_address(1)}-{etcd_address(ETCD_MEMBERS)}:"
                       f"{ETCD_CLIENT_PORT} on bridge {CONTROL_BRIDGE} (router ns, not routed); "
                       f"nodes' ctl0 {node_control_address(1)}...; VIPs under {ETCD_PREFIX}")
        out.append(f"VIPs     web4 {VIP_V4}:{VIP_PORT}/tcp, web6 [{VIP_V6}]:{VIP_PORT}/tcp")
        return "\n".join(out)


def dump_yaml(data: dict[str, Any], header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    return (header + "\n" if header else "") + body


def vip_network(addr: str) -> str:
    """The host route a node announces for a VIP: /32 or /128."""
    ip = ipaddress.ip_address(addr)
    return f"{ip}/{32 if ip.version == 4 else 128}"
