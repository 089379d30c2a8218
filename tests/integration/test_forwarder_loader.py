"""The loader: layouts against the object's BTF, restart safety (pins re-opened, ids and
conntrack kept, nothing rewritten), validation messages, attach/detach on a veth (native and
generic) and bpf_fib_lookup, in namespaces of our own."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import textwrap
from ipaddress import ip_address
from pathlib import Path

import pytest

from node.forwarder import build, maps
from node.forwarder import model as M
from node.forwarder import packets as P
from node.forwarder.loader import BackendSpec, Forwarder, ForwarderError, VipSpec
from node.forwarder.testing import make_config, temp_bpffs, temp_forwarder

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIP4 = "10.1.1.1"


def be(key, addr, state="active"):
    return BackendSpec(key, ip_address(addr), state)


def web(backends, table=None, port=80) -> VipSpec:
    act = [b.key for b in backends if b.state == "active"]
    if table is None:
        table = [act[i % len(act)] for i in range(13)] if act else []
    return VipSpec("web", ip_address(VIP4), "tcp", port, tuple(backends), table)


def _btf_structs(obj: Path) -> dict[str, dict]:
    dump = json.loads(subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj)],
                                     check=True, capture_output=True, text=True).stdout)
    return {t["name"]: t for t in dump["types"] if t.get("kind") == "STRUCT"}


def test_python_layouts_match_the_object_btf() -> None:
    """Both forwarder objects (one per conntrack design): every struct each one uses matches
    maps.py, and between them they use every struct maps.py mirrors."""
    import ctypes

    found: set[str] = set()
    for mode, name in build.FORWARDER_OBJECTS.items():
        structs = _btf_structs(build.build(name))
        need = {"flow_key", "ct_value"} | ({"ct_entry"} if mode == "direct" else set())
        assert need <= set(structs), (name, need - set(structs))
        for sname, ctype in maps.LAYOUTS.items():
            if sname not in structs:
                continue
            found.add(sname)
            t = structs[sname]
            assert t["size"] == ctypes.sizeof(ctype), (name, sname)
            py = [(f[0], getattr(ctype, f[0]).offset * 8) for f in ctype._fields_]
            c = [(m["name"], m["bits_offset"]) for m in t["members"]]
            assert py == c, (name, sname)
    assert found == set(maps.LAYOUTS), set(maps.LAYOUTS) - found


def test_each_design_has_its_own_object_and_conntrack_map() -> None:
    from node.forwarder import libbpf

    paths = {mode: build.build(name) for mode, name in build.FORWARDER_OBJECTS.items()}
    assert paths["lru"] != paths["direct"]
    with temp_forwarder() as f:
        assert f.conntrack == "lru"
        info = libbpf.map_info(f.fds["conntrack"])
        assert (info.type, info.key_size, info.value_size) == (
            maps.BPF_MAP_TYPE_LRU_HASH, *maps.CT_SHAPES["lru"])
        assert info.max_entries == maps.ct_entries(65536, "lru", libbpf.num_possible_cpus())
    with temp_forwarder(conntrack="direct", conntrack_size=3000) as f:
        info = libbpf.map_info(f.fds["conntrack"])
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (
            maps.BPF_MAP_TYPE_ARRAY, *maps.CT_SHAPES["direct"], 4096)


def test_stat_reasons_match_the_header() -> None:
    text = (build.BPF_DIR / "maglev.h").read_text()
    body = re.search(r"enum stat_reason \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"^\s*([A-Z][A-Z0-9_]+)(?: = 0)?,", body, re.M)
    assert names[:-1] == [s.name for s in maps.Stat] and names[-1] == "STAT_MAX"
    for const in ("MAX_VIPS", "MAX_BACKENDS", "NAME_LEN", "TABLE_CHUNK", "GRE_V4_OVERHEAD",
                  "GRE_V6_OVERHEAD", "OUTER_TTL", "STOP_GAP_STEPS"):
        value = int(re.search(rf"#define {const} (\d+)", text).group(1))
        assert value == getattr(maps, const), const


@pytest.mark.parametrize("mode", ["lru", "direct"])
def test_restart_reopens_pins_keeps_ids_and_conntrack(mode) -> None:
    backs = [be("a", "10.2.0.1"), be("b", "10.2.0.2")]
    syn = P.flow_packet("192.0.2.9", VIP4, 33333, 80)
    ack = P.flow_packet("192.0.2.9", VIP4, 33333, 80, tcp_flags=0x10)
    with temp_bpffs() as root:
        cfg = make_config(root / "maglev", conntrack=mode)
        first = Forwarder(cfg, table_capacity=1 << 16)
        first.open()
        first.sync([web(backs)])
        _, out = first.test_run(syn)
        ids = dict(first.backend_ids)
        first.close()  # a controller restart: no detach, pins stay

        second = Forwarder(cfg, table_capacity=1 << 16)
        second.open()
        try:
            assert second.vip_ids == {"web": 0} and second.backend_ids == ids
            # the tracked flow survives even though the new instance routes new flows elsewhere
            vid = second.vip_id("web")
            second.sync([web(backs, ["b"] * 13)])
            assert second.test_run(ack)[1][30:34] == out[30:34]
            # same spec again: nothing to write
            assert second.stage_table(vid, [ids[("web", "b")]] * 13) is None
            assert second.counters()["vips"]["web"]["ct_hits"] == 1
            assert second.conntrack_count() == 1
            second.conntrack_clear()
            assert second.conntrack_count() == 0
        finally:
            second.close()
            second.remove_pins()


@pytest.mark.parametrize("first,then", [("lru", "direct"), ("direct", "lru")])
def test_pins_of_the_other_conntrack_design_are_refused_with_advice(first, then) -> None:
    with temp_bpffs() as root:
        old = Forwarder(make_config(root / "maglev", conntrack=first), table_capacity=1 << 16)
        old.open()
        old.sync([web([be("a", "10.2.0.1")])])
        old.close()
        try:
            new = Forwarder(make_config(root / "maglev", conntrack=then), table_capacity=1 << 16)
            with pytest.raises(ForwarderError, match=rf"conntrack.*'{first}' design.*forwarder.conntrack is "
                               rf"'{then}'.*remove the pins under .*maglev.*start again"):
                new.open()
            # nothing was changed: the old design re-opens with its state
            again = Forwarder(make_config(root / "maglev", conntrack=first), table_capacity=1 << 16)
            again.open()
            assert again.vip_ids == {"web": 0}
            again.close()
        finally:
            old.remove_pins()


def test_object_of_the_other_design_is_refused() -> None:
    with temp_bpffs() as root:
        f = Forwarder(make_config(root / "maglev"), obj_path=build.build("xdp_lb_direct"),
                      table_capacity=1 << 16)
        with pytest.raises(ForwarderError, match="keeps conntrack as 'direct'.*use the xdp_lb object"):
            f.open()
        f.remove_pins()


def test_incompatible_pinned_map_is_refused_with_advice() -> None:
    from node.forwarder import libbpf

    with temp_bpffs() as root:
        cfg = make_config(root / "maglev")
        (root / "maglev").mkdir()
        # a "conntrack" from some other version: a different value size
        obj = libbpf.BpfObject(build.build("xdp_floor"))
        obj.set_max_entries("lru_probe", 1024)
        obj.load()
        libbpf.obj_pin(obj.map_fd("lru_probe"), root / "maglev" / "stats")
        obj.close()
        f = Forwarder(cfg, table_capacity=1 << 16)
        with pytest.raises(ForwarderError, match="stats.*incompatible version.*remove the pins"):
            f.open()
        (root / "maglev" / "stats").unlink()


def test_backend_ids_are_stable_and_not_reused_at_once() -> None:
    with temp_forwarder() as f:
        f.sync([web([be("a", "10.2.0.1"), be("b", "10.2.0.2"), be("c", "10.2.0.3")])])
        a, b, c = (f.backend_id("web", k) for k in "abc")
        f.sync([web([be("a", "10.2.0.1"), be("c", "10.2.0.3")])])
        assert (f.backend_id("web", "a"), f.backend_id("web", "c")) == (a, c)
        f.sync([web([be("a", "10.2.0.1"), be("c", "10.2.0.3"), be("d", "10.2.0.4")])])
        assert f.backend_id("web", "d") not in (a, b, c)
        # a removed VIP stops matching: its traffic goes to the kernel
        f.sync([])
        frame = P.flow_packet("192.0.2.9", VIP4, 1, 80)
        assert f.test_run(frame) == (M.XDP_PASS, frame)
        assert f.counters()["vips"] == {}


@pytest.mark.parametrize("spec,message", [
    (web([be("a", "10.2.0.1")], ["a", "zz"]), "table names backend 'zz'"),
    (web([be("a", "10.2.0.1"), be("b", "10.2.0.2", "drain")], ["a", "b"]), "state drain"),
    (web([be("a", "10.2.0.1"), be("a", "10.2.0.2")]), "listed twice"),
    (web([be("a", "10.2.0.1")], ["a"] * 40000), "table_capacity"),
    (web([be("a", "10.2.0.1")], port=0), "port 0"),
])
def test_sync_rejects_bad_input_with_names(spec, message) -> None:
    with temp_forwarder(table_capacity=1 << 16) as f:
        with pytest.raises(ForwarderError, match=re.escape(message)) as exc:
            f.sync([spec])
        assert "VIP 'web'" in str(exc.value) or "table_capacity" in str(exc.value)


def test_bad_bpffs_and_missing_interface_say_what_to_do() -> None:
    with temp_forwarder(interfaces=["mlbt-nosuchif"]) as f:
        with pytest.raises(ForwarderError, match="mlbt-nosuchif.*does not exist"):
            f.attach()


# ---- namespaces ---------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns():
    name = f"mlbt{secrets.token_hex(3)}-fwd"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "link", "set", "veth0", "address", "02:00:00:00:a0:01")
        _ip("-n", name, "link", "set", "veth1", "address", "02:00:00:00:a0:02")
        _ip("-n", name, "addr", "add", "10.99.0.1/24", "dev", "veth0")
        _ip("-n", name, "addr", "add", "10.99.0.2/24", "dev", "veth1")
        _ip("-n", name, "link", "set", "veth0", "up")
        _ip("-n", name, "link", "set", "veth1", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _in_ns(ns: str, body: str) -> dict:
    """Run body (Python, defines `result`) inside the namespace; returns result."""
    script = textwrap.dedent("""
        import json, socket, sys
        from ipaddress import ip_address
        from node.forwarder import packets as P
        from node.forwarder.loader import BackendSpec, Forwarder, VipSpec
        from node.forwarder.testing import make_config, temp_bpffs
        result = {}
    """) + SPEC + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60, cwd=str(Path(__file__).parents[2]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SPEC = """
spec = [VipSpec("web", ip_address("10.1.1.1"), "tcp", 80,
                (BackendSpec("a", ip_address("10.99.0.5"), "active"),), ["a"] * 7)]
"""


def test_attach_native_then_restart_then_detach(netns) -> None:
    res = _in_ns(netns, """
        with temp_bpffs() as root:
            cfg = make_config(root / "m", interfaces=["veth0"], xdp_mode="native")
            f = Forwarder(cfg, table_capacity=1 << 16); f.open(); f.sync(spec)
            result["mode"] = f.attach()
            result["first"] = f.attached_mode("veth0")
            f.close()
            g = Forwarder(cfg, table_capacity=1 << 16); g.open()
            result["vips"] = g.vip_ids
            # before attach: the older copy still runs and this instance sees it as not its own
            result["old_still_runs"] = g.attached_mode("veth0") is None and "xdp" in __import__(
                "subprocess").run(["ip", "-d", "link", "show", "veth0"], capture_output=True, text=True).stdout
            result["second"] = g.attach()
            result["self_test"] = g.self_test().ok
            g.detach()
            result["after_detach"] = g.attached_mode("veth0")
            g.close(); g.remove_pins()
    """)
    assert res == {"mode": "native", "first": "native", "vips": {"web": 0}, "old_still_runs": True,
                   "second": "native", "self_test": True, "after_detach": None}
    out = subprocess.run(["ip", "-n", netns, "-d", "link", "show", "veth0"], capture_output=True, text=True).stdout
    assert "xdp" not in out


def test_detach_after_restart_removes_the_older_copy(netns) -> None:
    res = _in_ns(netns, """
        with temp_bpffs() as root:
            cfg = make_config(root / "m", interfaces=["veth0"])
            f = Forwarder(cfg, table_capacity=1 << 16); f.open(); f.sync(spec); f.attach(); f.close()
            g = Forwarder(cfg, table_capacity=1 << 16); g.open()
            g.detach()  # without attaching first: the previous controller's copy must go
            import subprocess
            result["xdp_left"] = "xdp" in subprocess.run(["ip", "-d", "link", "show", "veth0"],
                                                         capture_output=True, text=True).stdout
            g.close(); g.remove_pins()
    """)
    assert res == {"xdp_left": False}


def test_attach_generic_mode(netns) -> None:
    res = _in_ns(netns, """
        with temp_bpffs() as root:
            f = Forwarder(make_config(root / "m", interfaces=["veth0"], xdp_mode="generic"), table_capacity=1 << 16)
            f.open(); f.sync(spec)
            result["mode"] = f.attach()
            result["seen"] = f.attached_mode("veth0")
            f.detach(); f.close(); f.remove_pins()
    """)
    assert res == {"mode": "generic", "seen": "generic"}


def test_a_program_removed_behind_our_back_fails_the_whole_forwarder(netns) -> None:
    """Not one VIP's fault: the self-test flags it node-wide, so the controller withdraws every
    VIP (a VIP's own failed check withdraws that VIP alone)."""
    res = _in_ns(netns, """
        import subprocess
        with temp_bpffs() as root:
            f = Forwarder(make_config(root / "m", interfaces=["veth0"], xdp_mode="generic"), table_capacity=1 << 16)
            f.open(); f.sync(spec); f.attach()
            before = f.self_test()
            subprocess.run(["ip", "link", "set", "veth0", "xdpgeneric", "off"], check=True)
            after = f.self_test()
            result.update(before=[before.ok, before.node_wide], after=[after.ok, after.node_wide],
                          vip_checks_ok=all(c.ok for c in after.checks), reason=after.reason)
            f.detach(); f.close(); f.remove_pins()
    """)
    assert res["before"] == [True, False] and res["after"] == [False, True], res
    assert res["vip_checks_ok"] and "replaced or detached" in res["reason"]


def test_fib_lookup_sets_macs_and_counts_missing_neighbour(netns) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"], check=True)
    res = _in_ns(netns, """
        frame = P.flow_packet("192.0.2.9", "10.1.1.1", 4444, 80)
        with temp_bpffs() as root:
            f = Forwarder(make_config(root / "m", interfaces=["veth0"], next_hop_mac=None,
                                      encap_source_v4="10.99.0.1"), table_capacity=1 << 16)
            f.open(); f.sync(spec)
            idx = socket.if_nametoindex("veth0")
            v, out = f.test_run(frame, ingress_ifindex=idx)
            result["no_neigh"] = [v, f.counters()["drops"]["fib"]]
            import subprocess
            subprocess.run(["ip", "neigh", "replace", "10.99.0.5", "lladdr", "02:00:00:00:00:05",
                            "dev", "veth0", "nud", "permanent"], check=True)
            v, out = f.test_run(frame, ingress_ifindex=idx)
            result["tx"] = [v, out[:6].hex(), out[6:12].hex(), out[30:34].hex(), out[38:] == frame[14:]]
            result["self_test"] = f.self_test().ok
            f.close(); f.remove_pins()
    """)
    assert res["no_neigh"] == [1, 1]
    assert res["tx"] == [3, "020000000005", "02000000a001", "0a630005", True]
    assert res["self_test"] is True


def test_largest_table_size_655373() -> None:
    backs = [be(f"b{i}", f"10.2.{i // 250}.{i % 250 + 1}") for i in range(1000)]
    table = [f"b{i % 1000}" for i in range(655373)]
    with temp_forwarder(table_capacity=2 * 655376) as f:
        f.sync([web(backs, table)])
        st = f.model_state()
        assert len(st.tables[f.vip_id("web")]) == 655373
        for sport in (1, 20000, 65535):
            frame = P.flow_packet("192.0.2.9", VIP4, sport, 80)
            assert f.test_run(frame)[1] == M.process(st, frame).data
        # a smaller table in the spare slot, then back: regions are reused, not leaked
        f.sync([web(backs, table[:65537])])
        f.sync([web(backs, table)])
        assert f.table_ids(f.vip_id("web")) == [f.backend_id("web", k) for k in table]
