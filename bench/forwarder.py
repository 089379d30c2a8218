"""Forwarder cost per packet, measured with BPF_PROG_TEST_RUN (root).

Method (see the datapath field notes): repeat=1 calls, never `repeat N` (the program would see
its own encapsulated output from the second iteration on), >= 200k calls per case, 64-byte TCP
frames (60 bytes + FCS). Every program is loaded side by side and every case interleaved in
rounds (in a seeded random order, new each round), so drift and the other work on this shared
machine hit them alike; each figure is the
median over the rounds of that round's value, and comparisons are ratios within a round.
Each program is loaded --loads times (default 3) and every load measured in every round; a
round's figure for a program is the median over its loads. The kernel places each JIT image at
a random offset, and on this machine the same object measured up to 15 % apart (and a non-VIP
packet 5-18 ns) from one load to the next: one load per program would compare two draws.

Floors (bpf/xdp_floor.c), the fixed cost of a test-run call:
- floor:       a bare XDP_TX program, subtracted from the VIP cases
- pass floor:  a bare XDP_PASS program (the test run then hands the frame to the kernel's
               stack, which costs more than a bounce), subtracted from the non-VIP case
Per program:
- established: a VIP flow with a conntrack hit
- new flow:    a VIP SYN that hashes into the Maglev table and inserts (distinct source
               address/port per call)
- SYN, same:   the same SYN every call: the insert replaces the previous entry (warm memory);
               shown because a bench that does not vary the flow measures this
- non-VIP:     a TCP frame to an address with no VIP (the address pre-filter says no: XDP_PASS)
Second chance (issue 17), on a second VIP (SC_VIP) whose table just gained an 11th backend
(about 1 entry in 11 moved) with its window open, current programs only:
- sc established: a conntrack hit on that VIP (second chance is never consulted)
- sc new flow:    distinct SYNs on that VIP (the table path looks the VIP's window up; a SYN
                  is never hinted)
- sc new ACK:     distinct ACKs without conntrack entries (a flow arriving from a dead node):
                  the whole hint lookup; ~1 in 11 lands on a moved entry and is hinted
- sc hinted:      the same ACK on a moved entry every call: table path, previous owner
                  looked up, 28-byte keyed GRE, no conntrack insert
These run on "lru+sc" / "direct+sc" (the same objects on maps of their own, so their inserts do
not fill the conntrack of the other cases); each is compared with its case on the VIP without
second chance of the same program and run ("x no-sc"). `--reference main` compares the plain
programs (the bench VIP only) with main's on the same maps (the pre-filter and vip_only too,
where the revision has them).
Programs: the two designs (forwarder.conntrack "lru", the default, and "direct"; bpf/maglev.h
explains the trade), "lru/percpu" (the same program with per-CPU LRU lists,
BPF_F_NO_COMMON_LRU: the previous design, to show the choice), and with --reference REV the
xdp_lb.c of that git revision in both designs ("REV lru", "REV direct"), compiled from
`git archive` and run on the same VIP, table and backend maps (its own conntrack maps): the
"x REV" column is the median of the per-round ratios of the costs above the floor.

For scale it also measures the kernel's LRU hash insert alone, shared LRU and per-CPU lists
(xdp_lru_insert*, conntrack_v4's 16-byte key and value, distinct keys per call): the part of
the "lru" new-flow cost no program can avoid while it keeps an LRU conntrack. And (unless
--no-displacement) the displacement check of the README: FLOWS distinct flows arriving on one
CPU of a conntrack map of conntrack_size entries, then how many are still tracked, for the
shared LRU and for per-CPU lists.

    .venv/bin/python bench/forwarder.py [--calls 200000] [--rounds 8] [--reference main]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as C
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.forwarder import build, libbpf, maps, packets  # noqa: E402
from node.forwarder.loader import BackendSpec, Forwarder, VipSpec  # noqa: E402
from node.forwarder.testing import make_config, temp_bpffs  # noqa: E402

VIP = "10.1.1.1"
SC_VIP = "10.1.1.2"  # second chance, window open, 1 entry in 11 moved
REPO = Path(__file__).resolve().parent.parent
VIP_CASES = ("established", "new flow", "SYN, same")


def vips(sc_added: bool = False) -> list[VipSpec]:
    """The bench VIP, and SC_VIP with second chance: sync with sc_added False, then True
    (an 11th backend takes every 11th entry: those name their previous owner)."""
    backends = tuple(BackendSpec(f"b{i}", ip_address(f"10.2.0.{i}"), "active") for i in range(1, 12))
    keys = [b.key for b in backends[:10]]
    table = [keys[i % len(keys)] for i in range(65537)]
    sc_table = [("b11" if sc_added and i % 11 == 0 else k) for i, k in enumerate(table)]
    return [VipSpec("bench", ip_address(VIP), "tcp", 80, backends[:10], table),
            VipSpec("bench-sc", ip_address(SC_VIP), "tcp", 80, backends, sc_table, second_chance_window=3600.0)]


def moved_sport() -> int:
    """A source port whose flow to SC_VIP hashes to a moved entry (i % 11 == 0)."""
    from node.forwarder import model
    for sport in range(40000, 65536):
        h = model.flow_hash(model.Flow.of("192.0.2.1", SC_VIP, sport, 80, "tcp"))
        if model.table_index(h, 65537) % 11 == 0:
            return sport
    raise AssertionError("no moved entry found")


class Case:
    def __init__(self, name: str, prog_fd: int, frame: bytes, vary: bool = False, prog: str = "",
                 floor: "Case | None" = None, flow_base: int = 0):
        self.name = name
        self.prog = prog  # which program ("" for the reference programs)
        self.floor = floor
        self.runner = libbpf.TestRun(prog_fd, 512)
        self.runner.set_packet(frame)
        self.vary = vary
        self.flow = flow_base  # each load of a program inserts flows of its own
        self.wall_ns = 0
        self.calls = 0
        self.rounds_ns: list[float] = []
        self.verdicts: set[int] = set()

    def round(self, calls: int) -> None:
        r = self.runner
        opts = r.opts
        run = r.run_raw
        inp = r.inp
        total = 0
        t0 = time.perf_counter_ns()
        if self.vary:
            # distinct flows: source port bytes 34-35, low source address bytes 28-29 (IPv4)
            f = self.flow
            for _ in range(calls):
                f += 1
                inp[34] = (f >> 8) & 0xFF
                inp[35] = f & 0xFF
                inp[29] = (f >> 16) & 0xFF
                inp[28] = (f >> 24) & 0xFF
                run()
                total += opts.duration
            self.flow = f
        else:
            for _ in range(calls):
                run()
                total += opts.duration
        self.wall_ns += time.perf_counter_ns() - t0
        self.calls += calls
        self.rounds_ns.append(total / calls)
        self.verdicts.add(opts.retval)

    def reset(self) -> None:
        self.wall_ns = self.calls = 0
        self.rounds_ns.clear()

    @property
    def ns(self) -> float:
        """Median over the rounds of the round's mean in-kernel ns per call."""
        return statistics.median(self.rounds_ns)

    def above(self) -> list[float]:
        """Per round: ns above this case's floor in the same round."""
        assert self.floor is not None
        return [a - b for a, b in zip(self.rounds_ns, self.floor.rounds_ns)]

    @property
    def above_ns(self) -> float:
        return statistics.median(self.above())

    @property
    def ratio(self) -> float:
        """Median over the rounds of case / floor."""
        assert self.floor is not None
        return statistics.median(a / b for a, b in zip(self.rounds_ns, self.floor.rounds_ns))

    def versus(self, other: "Case") -> float:
        """Median over the rounds of (self - floor) / (other - floor)."""
        return statistics.median(a / b for a, b in zip(self.above(), other.above()) if b > 0)

    @property
    def wall(self) -> float:
        return self.wall_ns / self.calls


class Loads(Case):
    """One case over several loads of one program: per round, the median over the loads."""

    def __init__(self, loads: list[Case]):
        first = loads[0]
        self.name, self.prog, self.floor = first.name, first.prog, first.floor
        self.loads = loads
        self.rounds_ns = [statistics.median(r) for r in zip(*(c.rounds_ns for c in loads))]
        self.verdicts = set().union(*(c.verdicts for c in loads))
        self.wall_ns = sum(c.wall_ns for c in loads)
        self.calls = sum(c.calls for c in loads)

    def spread(self) -> tuple[float, float]:
        """The cheapest and dearest load (each its median over the rounds, above the floor)."""
        per = [statistics.median(a - b for a, b in zip(c.rounds_ns, self.floor.rounds_ns)) for c in self.loads]
        return min(per), max(per)


def reference_objects(rev: str, out: Path) -> dict[str, Path]:
    """xdp_lb.c of git revision rev, both designs, compiled into out (git archive + clang with
    build.py's flags)."""
    src = out / "src"
    src.mkdir()
    arch = subprocess.run(["git", "-C", str(REPO), "archive", rev, "node/forwarder/bpf"],
                          capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=arch, check=True)
    bpf = src / "node" / "forwarder" / "bpf"
    objs = {}
    for design, flags in (("lru", ()), ("direct", ("-DCT_DIRECT",))):
        obj = out / f"ref-{design}.o"
        cmd = build._command(bpf / "xdp_lb.c", obj, flags)
        cmd = [a for a in cmd if a != f"-I{build.BPF_DIR}"] + [f"-I{bpf}"]
        subprocess.run(cmd, check=True, capture_output=True)
        objs[design] = obj
    return objs


def load_reference(path: Path, fwd: Forwarder, ct_size: int) -> libbpf.BpfObject:
    """Load a reference object on fwd's maps (all but conntrack and the counters, which it keeps
    its own of: an older revision's layouts of those may differ)."""
    obj = libbpf.BpfObject(path)
    obj.set_max_entries("conntrack", maps.ct_slots(ct_size) if fwd.conntrack == "direct" else ct_size)
    for name, fd in fwd.fds.items():
        if name in ("conntrack", maps.CT_V4, *maps.COUNTER_MAPS):
            continue
        with contextlib.suppress(KeyError):  # a map the reference does not have
            obj.reuse_map_fd(maps.obj_map_name(name), fd)
    obj.load()
    return obj


def count_entries(fd: int, key_type=maps.FlowKeyV4) -> int:
    cur, nxt, n = None, key_type(), 0
    while libbpf.map_next_key(fd, C.byref(cur) if cur is not None else None, C.byref(nxt)) == 0:
        n += 1
        cur, nxt = nxt, (cur if cur is not None else key_type())
    return n


def displacement(fwd: Forwarder, flows: int) -> int:
    """Send ``flows`` distinct SYNs from this (one) CPU; how many does conntrack still hold?"""
    fwd.conntrack_clear()
    syn = packets.flow_packet("198.19.0.0", VIP, 1, 80, tcp_flags=0x02, size=60)
    c = Case("displacement", fwd.prog_fd, syn, vary=True)
    c.round(flows)
    return count_entries(fwd.fds[maps.CT_V4])  # IPv4 flows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000, help="calls per case (>= 200000 for the record)")
    ap.add_argument("--rounds", type=int, default=8, help="the calls are split into rounds; figures are medians")
    ap.add_argument("--conntrack-size", type=int, default=1_000_000,
                    help="conntrack entries (the config default); a full table evicts on insert")
    ap.add_argument("--reference", metavar="REV", help="also measure xdp_lb.c of this git revision")
    ap.add_argument("--loads", type=int, default=3,
                    help="loads of each program (JIT placement varies per load); a round's figure is their median")
    ap.add_argument("--seed", type=int, default=1, help="seeds the order of the cases in each round")
    ap.add_argument("--displacement-flows", type=int, default=800_000,
                    help="flows for the one-CPU displacement check (0 to skip)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/forwarder.py needs root (BPF)", file=sys.stderr)
        return 1
    cpu = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {cpu})  # one CPU: per-CPU maps and caches stay put

    per_round = max(1, args.calls // args.rounds // args.loads)  # per load
    ct_size = args.conntrack_size
    est = packets.flow_packet("192.0.2.1", VIP, 40000, 80, tcp_flags=0x10, size=60)
    syn = packets.flow_packet("198.18.0.0", VIP, 1, 80, tcp_flags=0x02, size=60)
    other = packets.flow_packet("192.0.2.1", "10.9.9.9", 40000, 80, size=60)
    sc_est = packets.flow_packet("192.0.2.1", SC_VIP, 40000, 80, tcp_flags=0x10, size=60)
    sc_syn = packets.flow_packet("198.18.0.0", SC_VIP, 1, 80, tcp_flags=0x02, size=60)
    sc_ack = packets.flow_packet("198.20.0.0", SC_VIP, 1, 80, tcp_flags=0x10, size=60)
    ack = packets.flow_packet("198.20.0.0", VIP, 1, 80, tcp_flags=0x10, size=60)
    hinted = packets.flow_packet("192.0.2.1", SC_VIP, moved_sport(), 80, tcp_flags=0x10, size=60)
    assert len(est) == len(syn) == len(other) == 60
    assert maps.vip_filter_bit(4, ip_address("10.9.9.9").packed + bytes(12)) != \
        maps.vip_filter_bit(4, ip_address(VIP).packed + bytes(12)), "non-VIP frame must miss the pre-filter"
    floor_obj = libbpf.BpfObject(build.build("xdp_floor"))
    floor_obj.set_max_entries("lru_probe", ct_size)
    floor_obj.set_max_entries("lru_probe_percpu", ct_size)
    floor_obj.load()
    counters: dict[str, dict] = {}
    hints: dict[str, int] = {}
    kept: dict[str, tuple[int, int]] = {}
    refs: list[libbpf.BpfObject] = []
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlb-bench-")))
            root = stack.enter_context(temp_bpffs())
            tx = Case("floor", floor_obj.prog_fd("xdp_floor"), est)
            px = Case("pass floor", floor_obj.prog_fd("xdp_pass_floor"), other)
            cases = [tx, px]
            fwds: dict[str, Forwarder] = {}
            programs = [("lru", "lru", None), ("direct", "direct", None),
                        ("lru/percpu", "lru", build.build("xdp_lb_percpu_lru")),
                        # the same programs on maps of their own with SC_VIP too: its cases fill
                        # conntrack, which must not slow the others down (nor flatter main's)
                        ("lru+sc", "lru", None), ("direct+sc", "direct", None)]
            for label, design, obj_path in programs:
                fwd = Forwarder(make_config(root / label.replace("/", "-"), conntrack_size=ct_size,
                                            conntrack=design), obj_path=obj_path, table_capacity=1 << 19)
                fwd.open()
                stack.callback(fwd.remove_pins)
                stack.callback(fwd.close)
                if label.endswith("+sc"):
                    fwd.sync(vips())
                    fwd.sync(vips(sc_added=True))
                else:
                    fwd.sync(vips()[:1])
                fwds[label] = fwd
            progs: list[tuple[str, int]] = []
            for label, f in fwds.items():
                progs.append((label, f.prog_fd))
                for _ in range(args.loads - 1):
                    # the same object again, on the same maps but conntrack: each load inserts
                    # into a map of its own, as each reference load does
                    obj = libbpf.BpfObject(f.obj_path or build.build(build.FORWARDER_OBJECTS[f.conntrack]))
                    for name, fd in f.fds.items():
                        if name in ("conntrack", maps.CT_V4):
                            obj.set_max_entries(name, f.ct_entries)
                        else:
                            obj.reuse_map_fd(maps.obj_map_name(name), fd)
                    obj.load()
                    refs.append(obj)
                    progs.append((label, obj.prog_fd("xdp_lb")))
            if args.reference:
                for design, path in reference_objects(args.reference, tmp).items():
                    for _ in range(args.loads):
                        obj = load_reference(path, fwds[design], ct_size)
                        refs.append(obj)
                        progs.append((f"{args.reference} {design}", obj.prog_fd("xdp_lb")))
            measured: dict[tuple[str, str], list[Case]] = {}
            for i, (label, fd) in enumerate(progs):
                libbpf.TestRun(fd, 512).run(est)  # the established flow's conntrack entry
                for c in (Case("established", fd, est, prog=label, floor=tx),
                          Case("new flow", fd, syn, vary=True, prog=label, floor=tx, flow_base=i << 22),
                          Case("SYN, same", fd, syn, prog=label, floor=tx),
                          Case("non-VIP", fd, other, prog=label, floor=px)):
                    measured.setdefault((label, c.name), []).append(c)
                    cases.append(c)
                if label.endswith("+sc"):  # second chance: the current programs only
                    libbpf.TestRun(fd, 512).run(sc_est)
                    for c in (Case("sc established", fd, sc_est, prog=label, floor=tx),
                              Case("sc new flow", fd, sc_syn, vary=True, prog=label, floor=tx, flow_base=i << 22),
                              Case("sc new ACK", fd, sc_ack, vary=True, prog=label, floor=tx, flow_base=i << 22),
                              Case("new ACK", fd, ack, vary=True, prog=label, floor=tx, flow_base=i << 22),
                              Case("sc hinted", fd, hinted, prog=label, floor=tx)):
                        measured.setdefault((label, c.name), []).append(c)
                        cases.append(c)
            cases.append(Case("LRU insert", floor_obj.prog_fd("xdp_lru_insert"), syn, vary=True, floor=tx))
            cases.append(Case("LRU insert/percpu", floor_obj.prog_fd("xdp_lru_insert_percpu"), syn,
                              vary=True, floor=tx))
            for c in cases:
                c.round(2000)  # warm up, then forget the warm-up
                c.reset()
            order = random.Random(args.seed)
            for _ in range(args.rounds):
                # a fresh order every round: no case always runs right after the same one
                # (two loads of one object measured up to 8 % apart in a fixed order)
                for c in order.sample(cases, len(cases)):
                    c.round(per_round)
            counters = {m: f.counters()["vips"]["bench"] for m, f in fwds.items()}
            hints = {m: f.counters()["events"]["second_chance_hinted"] for m, f in fwds.items() if m.endswith("+sc")}
            cases = [tx, px] + [Loads(group) for group in measured.values()] + cases[-2:]
            if args.displacement_flows:
                for label in ("lru", "lru/percpu"):
                    kept[label] = (displacement(fwds[label], args.displacement_flows), fwds[label].ct_entries)
    finally:
        for obj in refs:
            obj.close()
        floor_obj.close()

    print(f"forwarder bench: {cases[2].calls} repeat=1 BPF_PROG_TEST_RUN calls per case "
          f"(median of {args.rounds} interleaved rounds; each program loaded {args.loads} times, a "
          f"round's figure the median over its loads), 64-byte TCP frames, CPU {cpu}, "
          f"kernel {os.uname().release}, conntrack_size {ct_size}")
    print(f"floors: XDP_TX {tx.ns:.1f} ns, XDP_PASS {px.ns:.1f} ns per call")
    ref = args.reference
    print(f"{'program':<14} {'case':<18} {'ns/pkt':>8} {'above floor':>12} {'x floor':>8}"
          + (f" {'x ' + ref:>10}" if ref else "") + f" {'loads min-max':>14} {'wall ns/call':>13}  verdict")
    for c in cases[2:]:
        verdict = ",".join(libbpf.VERDICTS[v] for v in sorted(c.verdicts))
        vs = ""
        if ref:
            design = c.prog.split("/")[0]
            base = next((x for x in cases if x.prog == f"{ref} {design}" and x.name == c.name), None)
            vs = f" {c.versus(base):10.2f}" if base is not None and base is not c else f" {'':>10}"
        spread = "%6.1f-%-7.1f" % c.spread() if isinstance(c, Loads) else f"{'':>14}"
        print(f"{c.prog or '-':<14} {c.name:<18} {c.ns:8.1f} {c.above_ns:12.1f} {c.ratio:8.2f}{vs} "
              f"{spread} {c.wall:13.1f}  {verdict}")
    pairs = {"sc established": "established", "sc new flow": "new flow", "sc new ACK": "new ACK"}
    print("second chance against the VIP without it (median of per-round ratios of ns above the floor):")
    for c in cases:
        if c.name in pairs:
            base = next(x for x in cases if x.prog == c.prog and x.name == pairs[c.name])
            print(f"  {c.prog:<12} {c.name:<16} x no-sc {c.versus(base):6.2f}  "
                  f"({c.above_ns:.1f} vs {base.above_ns:.1f} ns above the floor)")
    for c in cases:
        if c.name == "sc hinted":
            base = next(x for x in cases if x.prog == c.prog and x.name == "SYN, same")
            print(f"  {c.prog:<12} {c.name:<16} {c.above_ns:.1f} ns above the floor "
                  f"(a SYN through the table with its insert: {base.above_ns:.1f} ns)")
    for label, cnt in counters.items():
        print(f"VIP counters ({label}): {cnt['ct_hits']} conntrack hits, {cnt['new_flows']} new flows")
    for label, f in hints.items():
        print(f"second chance ({label}): {f} packets hinted")
    for label, (n, entries) in kept.items():
        print(f"displacement ({label}): {args.displacement_flows} flows on one CPU of a {entries}-entry map: "
              f"{n} still tracked ({args.displacement_flows - n} displaced)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
