"""`maglev backend setup|teardown` in a fresh network namespace, through the real CLI.

Each test gets its own namespace (with a veth as the backend's interface), a private bpffs and
a state directory, and checks the kernel's view afterwards: addresses on lo, sysctls, the tc
filter, the pins. Teardown must leave the namespace as it found it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab.netns import Netns, cleanup_prefix, mount_bpffs, umount, unique_prefix, veth

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIP4, VIP4B, VIP6 = "198.51.100.10", "198.51.100.11", "2001:db8:100::10"
DSR_SYSCTLS = {
    "net.ipv4.conf.all.arp_ignore": "1",
    "net.ipv4.conf.all.arp_announce": "2",
    "net.ipv4.conf.eth0.arp_ignore": "1",
    "net.ipv4.conf.eth0.arp_announce": "2",
    "net.ipv4.conf.eth0.rp_filter": "2",
}


class Host:
    """A namespace standing in for a backend host, plus helpers to look at it."""

    def __init__(self, ns: Netns, bpffs: Path, state: Path):
        self.ns, self.bpffs, self.state = ns, bpffs, state

    def maglev(self, *args: str, check: bool = True, opts: bool = True) -> subprocess.CompletedProcess[str]:
        extra = ["--interface", "eth0", "--bpffs", str(self.bpffs), "--state-dir", str(self.state)] if opts else []
        proc = self.ns.run(sys.executable, "-m", "node.cli", "backend", *args, *extra, check=False)
        if check:
            assert proc.returncode == 0, proc.stderr + proc.stdout
        return proc

    def lo_addresses(self) -> set[str]:
        out = self.ns.ip("-j", "addr", "show", "dev", "lo").stdout
        return {a["local"] for link in json.loads(out) for a in link["addr_info"]} - {"127.0.0.1", "::1"}

    def sysctl(self, key: str) -> str:
        return self.ns.run("sysctl", "-n", key).stdout.strip()

    def sysctls(self) -> dict[str, str]:
        return {k: self.sysctl(k) for k in DSR_SYSCTLS}

    def ingress_filters(self) -> str:
        return self.ns.run("tc", "filter", "show", "dev", "eth0", "ingress").stdout

    def qdiscs(self) -> str:
        return self.ns.run("tc", "qdisc", "show", "dev", "eth0").stdout

    def pins(self) -> list[str]:
        return sorted(str(p.relative_to(self.bpffs)) for p in self.bpffs.rglob("*")
                      if not p.name.endswith(".debug"))


@pytest.fixture
def host(tmp_path):
    prefix = unique_prefix()
    bpffs = tmp_path / "bpffs"
    try:
        ns = Netns.create(f"{prefix}-be")
        peer = Netns.create(f"{prefix}-pe")
        veth(ns, "eth0", peer, "eth1")
        mount_bpffs(bpffs)
        yield Host(ns, bpffs, tmp_path / "state")
    finally:
        umount(bpffs)
        cleanup_prefix(prefix)


def test_setup_then_teardown_leaves_nothing_behind(host):
    before = host.sysctls()
    out = host.maglev("setup", "--vip", VIP4, "--vip", VIP6).stdout

    assert host.lo_addresses() == {VIP4, VIP6}
    assert host.sysctls() == DSR_SYSCTLS
    filters = host.ingress_filters()
    assert "mlb_decap" in filters and "direct-action" in filters
    assert len(host.pins()) == 3  # the per-interface directory and its two maps
    for expected in (f"added {VIP4}/32 to lo", f"added {VIP6}/128 to lo",
                     "set net.ipv4.conf.eth0.rp_filter=2", "attached mlb_decap"):
        assert expected in out
    status = host.maglev("status").stdout
    assert f"VIPs: {VIP4}, {VIP6}" in status and "program id" in status

    out = host.maglev("teardown").stdout
    assert "detached mlb_decap" in out
    assert host.lo_addresses() == set()
    assert host.sysctls() == before
    assert "mlb_decap" not in host.ingress_filters()
    assert "clsact" not in host.qdiscs()
    assert host.pins() == []
    assert list(host.state.iterdir()) == []
    assert "not attached" in host.maglev("status").stdout


def test_setup_again_replaces_the_vip_list(host):
    host.maglev("setup", "--vip", VIP4, "--vip", VIP6)
    out = host.maglev("setup", "--vip", VIP4, "--vip", VIP4B).stdout
    assert host.lo_addresses() == {VIP4, VIP4B}
    assert f"removed {VIP6}/128 from lo" in out
    assert f"VIPs: {VIP4}, {VIP4B}" in host.maglev("status").stdout
    # Replaced in place: still exactly one filter of ours.
    assert host.ingress_filters().count("handle 0x6d6c") == 1
    host.maglev("teardown")
    assert host.lo_addresses() == set()


def test_teardown_of_some_vips_keeps_serving_the_rest(host):
    host.maglev("setup", "--vip", VIP4, "--vip", VIP4B)
    out = host.maglev("teardown", "--vip", VIP4B).stdout
    assert f"still serving {VIP4}" in out
    assert host.lo_addresses() == {VIP4}
    assert "mlb_decap" in host.ingress_filters()
    assert f"VIPs: {VIP4}\n" in host.maglev("status").stdout
    assert host.sysctls() == DSR_SYSCTLS
    host.maglev("teardown")
    assert host.lo_addresses() == set()
    assert "mlb_decap" not in host.ingress_filters()


def test_teardown_keeps_what_was_there_before(host):
    """A VIP already on lo and a clsact qdisc with someone else's filter survive teardown."""
    host.ns.ip("addr", "add", f"{VIP4}/32", "dev", "lo")
    host.ns.run("tc", "qdisc", "add", "dev", "eth0", "clsact")
    # A classic-BPF filter stands in for another tool's (matchall and actions are not built here).
    host.ns.run("tc", "filter", "add", "dev", "eth0", "ingress", "pref", "100", "bpf", "bytecode", "1,6 0 0 0,")
    out = host.maglev("setup", "--vip", VIP4, "--vip", VIP4B).stdout
    assert f"{VIP4}/32 is already on lo" in out
    host.maglev("teardown")
    assert host.lo_addresses() == {VIP4}
    assert "clsact" in host.qdiscs()
    filters = host.ingress_filters()
    assert "bytecode '1,6 0 0 0'" in filters and "mlb_decap" not in filters


def test_kernel_gre_fails_clearly_here_and_changes_nothing(host):
    before = host.sysctls()
    proc = host.maglev("setup", "--vip", VIP4, "--decap", "kernel", check=False)
    assert proc.returncode == 1
    assert "ip link add gre-mlb type gre external" in proc.stderr
    assert "this kernel has no GRE support" in proc.stderr and "--decap bpf" in proc.stderr
    assert host.sysctls() == before
    assert host.lo_addresses() == set()


def test_kernel_gre_dry_run_prints_the_commands(host):
    before = host.sysctls()
    out = host.maglev("setup", "--vip", VIP4, "--vip", VIP6, "--decap", "kernel", "--dry-run").stdout
    lines = out.splitlines()
    assert lines[:4] == [
        "ip link add gre-mlb type gre external",
        "ip link set gre-mlb up",
        "ip link add gre6-mlb type ip6gre external",
        "ip link set gre6-mlb up",
    ]
    assert "sysctl -w net.ipv4.conf.all.arp_ignore=1" in lines
    assert "sysctl -w net.ipv4.conf.gre-mlb.rp_filter=2" in lines
    assert lines[-2:] == [f"ip addr replace {VIP4}/32 dev lo", f"ip addr replace {VIP6}/128 dev lo"]
    assert host.sysctls() == before and host.lo_addresses() == set()


def test_switching_decap_mode_requires_teardown(host):
    host.maglev("setup", "--vip", VIP4)
    proc = host.maglev("setup", "--vip", VIP4, "--decap", "kernel", check=False)
    assert proc.returncode == 1 and "teardown" in proc.stderr
    host.maglev("teardown")


@pytest.mark.parametrize("args,message", [
    (["setup", "--vip", VIP4, "--interface", "nosuch0"], "interface 'nosuch0' does not exist"),
    (["setup", "--vip", "224.0.0.5", "--interface", "eth0"], "must be a unicast"),
    (["setup", "--vip", VIP4, "--interface", "eth0", "--bpffs", "/tmp"], "is not on a bpf filesystem"),
])
def test_bad_input_is_refused_with_a_clear_message(host, args, message):
    proc = host.ns.run(sys.executable, "-m", "node.cli", "backend", *args,
                       "--state-dir", str(host.state), check=False)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert host.lo_addresses() == set()


def test_invalid_vip_is_an_argument_error(host):
    proc = host.maglev("setup", "--vip", "10.0.0.300", check=False)
    assert proc.returncode == 2 and "'10.0.0.300' is not an IPv4 or IPv6 address" in proc.stderr
