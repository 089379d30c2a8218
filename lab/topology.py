"""Build and tear down the lab's namespaces and wiring (see lab.plan for the picture).

Only plumbing lives here: namespaces, veth pairs, the router's bridge, addresses, routes,
sysctls, neighbour entries, the XDP_PASS programs the veth peers need, and the per-node bpffs
mounts. Processes (FRR, nodes, backends) are started by lab.lab.

Each step below avoids a pitfall from the datapath field notes that would otherwise drop every
packet silently:
- XDP_TX on a veth only arrives if the *peer* runs an XDP program: every router-side bridge
  port facing a node gets a trivial XDP_PASS program.
- Native XDP loses CHECKSUM_PARTIAL: TX checksum offload is off on every lab interface, so
  every sender (client, router's BGP, backends' health answers, nodes) computes checksums.
- GRE adds 24 (IPv4) or 44 (IPv6) bytes: the fabric runs at MTU 1600 while the client stays at
  1500, so a full-size client segment still fits once encapsulated.
- bpf_fib_lookup needs resolved neighbours: nodes get permanent entries for every backend.
- IPv6 BGP sessions flap while addresses are tentative: no DAD anywhere, and
  keep_addr_on_down on node links so a crashed node comes back with its addresses.
- `ip netns exec` hides /sys/fs/bpf: each node pins into its own bpffs under the run dir,
  mounted from the root mount namespace.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from lab import plan as P
from node.forwarder import build as bpf_build
from lab.netns import Netns, NetnsError, delete_namespace, list_namespaces, mount_bpffs, run, umount, veth

Progress = Callable[[str], None]

def build_xdp_pass(cache_dir: Path | None = None) -> Path:
    """The XDP_PASS object (bpf/xdp_pass.c), built by the project's one BPF builder."""
    try:
        return bpf_build.build("xdp_pass", cache_dir)
    except bpf_build.BuildError as exc:
        raise NetnsError(f"cannot build the XDP_PASS program for the router's node ports: {exc}") from exc


def _no_offload(ns: Netns, dev: str) -> None:
    # tx off also turns off TSO/GSO (they depend on it): full checksums, MTU-sized packets.
    ns.run("ethtool", "-K", dev, "tx", "off", check=False)


def _quiet_v6(ns: Netns, dev: str = "default") -> None:
    ns.sysctl(f"net.ipv6.conf.{dev}.accept_dad", 0)
    ns.sysctl(f"net.ipv6.conf.{dev}.keep_addr_on_down", 1)


def _new_ns(name: str) -> Netns:
    ns = Netns.create(name)
    # Interfaces created later inherit 'default': no DAD, keep addresses over link down.
    for dev in ("all", "default"):
        _quiet_v6(ns, dev)
    ns.sysctl("net.ipv4.conf.all.rp_filter", 0)
    ns.sysctl("net.ipv4.conf.default.rp_filter", 0)
    return ns


def build_router(lab: P.LabPlan) -> Netns:
    r = _new_ns(P.ROUTER_NS)
    for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
        r.sysctl(key, 1)
    # L4 hashing: without it every flow of the one client lands on the same node.
    r.sysctl("net.ipv4.fib_multipath_hash_policy", 1)
    r.sysctl("net.ipv6.fib_multipath_hash_policy", 1)
    r.ip("link", "add", P.FABRIC_BRIDGE, "mtu", str(P.FABRIC_MTU), "type", "bridge")
    # No STP delay: ports forward as soon as they are up.
    r.ip("link", "set", P.FABRIC_BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    # A fixed MAC: by default a bridge takes its lowest port's MAC, which changes as ports come.
    r.ip("link", "set", P.FABRIC_BRIDGE, "address", P.ROUTER_FABRIC_MAC)
    r.add_address(P.FABRIC_BRIDGE, f"{P.ROUTER_FABRIC_V4}/24")
    r.add_address(P.FABRIC_BRIDGE, f"{P.ROUTER_FABRIC_V6}/64")
    r.link_up(P.FABRIC_BRIDGE)
    _no_offload(r, P.FABRIC_BRIDGE)
    return r


def build_client(lab: P.LabPlan, router: Netns) -> Netns:
    c = _new_ns(P.CLIENT_NS)
    veth(router, "to-client", c, "eth0", mtu=P.CLIENT_MTU)
    router.add_address("to-client", f"{P.ROUTER_CLIENT_V4}/24")
    router.add_address("to-client", f"{P.ROUTER_CLIENT_V6}/64")
    c.add_address("eth0", f"{P.CLIENT_V4}/24")
    c.add_address("eth0", f"{P.CLIENT_V6}/64")
    # The router (same kernel) picks an ECMP path from the client socket's skb hash when one is
    # set, and Linux re-rolls that hash after every retransmission timeout: a flow stuck on a
    # crashed node would hop to a live one within ~0.4 s, long before the hold timer, which no
    # real router does. Keep the hash per connection, as a real 5-tuple hash is.
    c.sysctl("net.core.txrehash", 0)
    c.ip("route", "add", "default", "via", P.ROUTER_CLIENT_V4)
    c.ip("-6", "route", "add", "default", "via", P.ROUTER_CLIENT_V6)
    for ns, dev in ((c, "eth0"), (router, "to-client")):
        _no_offload(ns, dev)
    return c


def build_host(lab: P.LabPlan, router: Netns, h: P.Host, xdp_pass: Path | None) -> Netns:
    """A node or backend: eth0 on the fabric bridge, with the router port named after it."""
    ns = _new_ns(h.ns)
    veth(router, h.router_port, ns, "eth0", mtu=P.FABRIC_MTU)
    router.ip("link", "set", h.router_port, "master", P.FABRIC_BRIDGE)
    ns.ip("link", "set", "eth0", "address", h.mac)
    ns.add_address("eth0", f"{h.v4}/24")
    ns.add_address("eth0", f"{h.v6}/64")
    for n, dev in ((ns, "eth0"), (router, h.router_port)):
        _no_offload(n, dev)
    if xdp_pass is not None:
        router.ip("link", "set", "dev", h.router_port, "xdpdrv", "obj", str(xdp_pass), "sec", "xdp")
    if h.role == "node":
        # No unknown-unicast flooding towards nodes: when a node dies the bridge forgets its MAC
        # and would flood its traffic to the other nodes, whose XDP programs (which, like
        # Katran's, do not filter on MAC) would forward it, hiding the crash that the router's
        # hold timer is there to handle. A real switch port to a dead host delivers nothing.
        router.ip("link", "set", "dev", h.router_port, "type", "bridge_slave", "flood", "off")
    return ns


def configure_node(lab: P.LabPlan, ns: Netns, h: P.Host) -> None:
    # Forwarding on: bpf_fib_lookup (input mode) needs it. No default route on purpose: a VIP
    # packet the XDP program passed up must die here, not loop back to the router.
    ns.sysctl("net.ipv4.ip_forward", 1)
    ns.sysctl("net.ipv6.conf.all.forwarding", 1)
    add_backend_neighbours(lab, ns)
    mount_bpffs(lab.node_dir(h.index) / "bpffs")


def add_backend_neighbours(lab: P.LabPlan, ns: Netns) -> None:
    """Permanent neighbour entries for every backend (bpf_fib_lookup returns NO_NEIGH until
    an entry exists, and the node itself never talks to a backend's VIP traffic)."""
    for b in lab.backend_hosts:
        for addr in (b.v4, b.v6):
            ns.ip("neigh", "replace", addr, "lladdr", b.mac, "dev", "eth0", "nud", "permanent")


def configure_backend(lab: P.LabPlan, ns: Netns, h: P.Host) -> None:
    # DSR: replies leave with the VIP as source straight to the client via the router.
    ns.ip("route", "add", "default", "via", P.ROUTER_FABRIC_V4)
    ns.ip("-6", "route", "add", "default", "via", P.ROUTER_FABRIC_V6)
    # The decap program's maps are pinned here (`maglev backend setup --bpffs`).
    mount_bpffs(lab.backend_dir(h.index) / "bpffs")


def build(lab: P.LabPlan, progress: Progress = print) -> None:
    """Create every namespace and link of the lab. Raises on the first failure (the caller
    tears down what exists)."""
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    progress("compiling the XDP_PASS program for the router's node ports")
    xdp_pass = build_xdp_pass()
    progress(f"router {P.ROUTER_NS}: bridge {P.FABRIC_BRIDGE} (MTU {P.FABRIC_MTU}), forwarding, L4 ECMP hashing")
    router = build_router(lab)
    progress(f"client {P.CLIENT_NS}: {P.CLIENT_V4}, {P.CLIENT_V6}, default via the router")
    build_client(lab, router)
    for h in lab.node_hosts:
        progress(f"{h.name} {h.ns}: {h.v4}, {h.v6}, XDP_PASS on router port {h.router_port}, bpffs")
        ns = build_host(lab, router, h, xdp_pass)
        configure_node(lab, ns, h)
    for h in lab.backend_hosts:
        progress(f"{h.name} {h.ns}: {h.v4}, {h.v6}, default via the router, bpffs")
        ns = build_host(lab, router, h, None)
        configure_backend(lab, ns, h)


def set_node_links(lab: P.LabPlan, index: int, up: bool) -> None:
    """Take a node's link down (as if the machine died) or bring it back."""
    h = lab.node(index)
    state = "up" if up else "down"
    Netns(h.ns).ip("link", "set", "eth0", state)
    if up:
        # Permanent neighbours do not all survive a link going down; put them back.
        add_backend_neighbours(lab, Netns(h.ns))


def lab_namespaces() -> list[str]:
    return [n for n in list_namespaces() if n.startswith(P.NS_PREFIX)]


def lab_mounts(run_dir: Path) -> list[str]:
    """Mount points under the run dir (bpffs of nodes, anything a component mounted there)."""
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and (parts[1] == str(run_dir) or parts[1].startswith(str(run_dir) + "/")):
            out.append(parts[1])
    # Deepest first, so nested mounts go before their parents.
    return sorted(set(out), key=len, reverse=True)


def teardown(run_dir: Path, progress: Progress = print) -> list[str]:
    """Delete every lab namespace (killing what runs in it), unmount and remove the run dir.
    Idempotent; returns what it removed."""
    removed = []
    for name in lab_namespaces():
        delete_namespace(name)
        removed.append(f"namespace {name}")
    for m in lab_mounts(run_dir):
        umount(m)
        removed.append(f"mount {m}")
    if run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(f"directory {run_dir}")
    return removed


def netns_ready(name: str) -> bool:
    return name in list_namespaces()


__all__ = [
    "build", "teardown", "set_node_links", "lab_namespaces", "lab_mounts", "build_xdp_pass",
    "add_backend_neighbours", "run",
]
