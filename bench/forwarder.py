"""Forwarder cost per packet, measured with BPF_PROG_TEST_RUN (root).

Method (see the datapath field notes): repeat=1 calls, never `repeat N` (the program would see
its own encapsulated output from the second iteration on), averaged over >= 200k calls per
case, 64-byte TCP frames (60 bytes + FCS). Both conntrack designs (forwarder.conntrack: "lru",
the default, and "direct"; bpf/maglev.h explains the trade) are loaded side by side and
measured in the same run, every case interleaved in rounds so drift hits them alike:

- floor:       a bare XDP_TX program (bpf/xdp_floor.c): the fixed cost of a test-run call
and per design:
- established: a VIP flow with a conntrack hit
- new flow:    a VIP SYN that misses conntrack, hashes into the Maglev table and inserts
               (distinct source address/port per call)
- SYN, same:   the same SYN every call: the insert replaces the previous entry (warm
               memory); shown because a bench that does not vary the flow measures this
- non-VIP:     a TCP frame to an address that is no VIP (parse + conntrack and VIP lookups
               that miss + XDP_PASS)

For scale it also measures the kernel's LRU hash insert alone (bpf/xdp_floor.c: xdp_lru_insert,
an LRU hash with conntrack's key and value, distinct keys per call): the part of the "lru"
new-flow cost no program can avoid while it keeps an LRU conntrack.

Per case it prints the in-kernel ns/packet (the `duration` BPF_PROG_TEST_RUN reports, averaged
over each round's calls; the median over the rounds, so a burst of other work on this 2-core
machine moves one round, not the figure) and the cost above the floor; wall-clock ns/call (incl. the syscall and Python)
is printed for reference. Targets: established <= 120 ns above the floor, new flow <= 280 ns.
Katran, measured the same way on this kind of machine: ~149 and ~347 ns above its floor.

    .venv/bin/python bench/forwarder.py [--calls 200000] [--rounds 8] [--conntrack lru,direct]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.forwarder import build, libbpf, maps, packets  # noqa: E402
from node.forwarder.loader import BackendSpec, VipSpec  # noqa: E402
from node.forwarder.testing import temp_forwarder  # noqa: E402

TARGETS = {"established": 120.0, "new flow": 280.0}
KATRAN = {"established": 149.0, "new flow": 347.0}
VIP = "10.1.1.1"


def vips() -> list[VipSpec]:
    backends = tuple(BackendSpec(f"b{i}", ip_address(f"10.2.0.{i}"), "active") for i in range(1, 11))
    keys = [b.key for b in backends]
    table = [keys[i % len(keys)] for i in range(65537)]
    return [VipSpec("bench", ip_address(VIP), "tcp", 80, backends, table)]


class Case:
    def __init__(self, name: str, prog_fd: int, frame: bytes, vary: bool = False, mode: str = ""):
        self.name = name
        self.mode = mode  # conntrack design ("" for the reference programs)
        self.runner = libbpf.TestRun(prog_fd, 512)
        self.runner.set_packet(frame)
        self.vary = vary
        self.flow = 0
        self.kernel_ns = 0
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
            # distinct flows: source port bytes 34-35, low source address byte 29 (IPv4 frame)
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
        self.kernel_ns += total
        self.calls += calls
        self.rounds_ns.append(total / calls)
        self.verdicts.add(opts.retval)

    @property
    def ns(self) -> float:
        """Median over the rounds of the round's mean in-kernel ns per call."""
        return statistics.median(self.rounds_ns)

    @property
    def wall(self) -> float:
        return self.wall_ns / self.calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000, help="calls per case (>= 200000 for the record)")
    ap.add_argument("--rounds", type=int, default=8, help="the calls are split into rounds; figures are medians")
    ap.add_argument("--conntrack-size", type=int, default=1_000_000,
                    help="conntrack entries (the config default); a full table evicts on insert")
    ap.add_argument("--conntrack", default=",".join(maps.CONNTRACK_MODES),
                    help="designs to measure, comma-separated (default: both)")
    args = ap.parse_args(argv)
    modes = [m for m in args.conntrack.split(",") if m]
    if not modes or any(m not in maps.CONNTRACK_MODES for m in modes):
        ap.error(f"--conntrack: choose from {', '.join(maps.CONNTRACK_MODES)}")
    if os.geteuid() != 0:
        print("bench/forwarder.py needs root (BPF)", file=sys.stderr)
        return 1
    cpu = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {cpu})  # one CPU: per-CPU maps and caches stay put

    per_round = max(1, args.calls // args.rounds)
    ct_size = args.conntrack_size
    est = packets.flow_packet("192.0.2.1", VIP, 40000, 80, tcp_flags=0x10, size=60)
    syn = packets.flow_packet("198.18.0.0", VIP, 1, 80, tcp_flags=0x02, size=60)
    other = packets.flow_packet("192.0.2.1", "10.9.9.9", 40000, 80, size=60)
    assert len(est) == len(syn) == len(other) == 60
    floor_obj = libbpf.BpfObject(build.build("xdp_floor"))
    floor_obj.set_max_entries("lru_probe", ct_size)
    floor_obj.load()
    counters: dict[str, dict] = {}
    try:
        with contextlib.ExitStack() as stack:
            fwds = {}
            cases = [Case("floor", floor_obj.prog_fd("xdp_floor"), est)]
            for mode in modes:
                fwd = stack.enter_context(temp_forwarder(table_capacity=1 << 18, conntrack_size=ct_size,
                                                         conntrack=mode))
                fwd.sync(vips())
                fwd.test_run(est)  # the established flow's conntrack entry
                fwds[mode] = fwd
                cases += [Case("established", fwd.prog_fd, est, mode=mode),
                          Case("new flow", fwd.prog_fd, syn, vary=True, mode=mode),
                          Case("SYN, same", fwd.prog_fd, syn, mode=mode),
                          Case("non-VIP", fwd.prog_fd, other, mode=mode)]
            cases.append(Case("LRU insert", floor_obj.prog_fd("xdp_lru_insert"), syn, vary=True))
            for c in cases:
                c.round(2000)  # warm up, then forget the warm-up
                c.kernel_ns = c.wall_ns = c.calls = 0
                c.rounds_ns.clear()
            for _ in range(args.rounds):
                for c in cases:
                    c.round(per_round)
            counters = {m: f.counters()["vips"]["bench"] for m, f in fwds.items()}
    finally:
        floor_obj.close()

    floor = cases[0].ns
    print(f"forwarder bench: {cases[0].calls} repeat=1 BPF_PROG_TEST_RUN calls per case "
          f"(median of {args.rounds} rounds), 64-byte TCP frames, CPU {cpu}, kernel {os.uname().release}, "
          f"conntrack_size {ct_size}")
    print(f"{'conntrack':<10} {'case':<12} {'ns/pkt':>8} {'above floor':>12} {'target':>8} {'Katran':>8} "
          f"{'wall ns/call':>13}  verdict")
    for c in cases:
        tgt = TARGETS.get(c.name) if c.mode else None
        kat = KATRAN.get(c.name) if c.mode else None
        verdict = ",".join(libbpf.VERDICTS[v] for v in sorted(c.verdicts))
        print(f"{c.mode or '-':<10} {c.name:<12} {c.ns:8.1f} {c.ns - floor:12.1f} {tgt if tgt else '':>8} "
              f"{kat if kat else '':>8} {c.wall:13.1f}  {verdict}")
    missed = []
    for mode in modes:
        parts = []
        for name in ("established", "new flow"):
            c = next(x for x in cases if x.mode == mode and x.name == name)
            above = c.ns - floor
            met = above <= TARGETS[name]
            if not met:
                missed.append(f"{mode} {name}")
            parts.append(f"{name} {above:.1f} ns above floor ({above / KATRAN[name]:.2f} x Katran), "
                         f"target <= {TARGETS[name]:.0f}: {'met' if met else 'MISSED'}")
        print(f"conntrack {mode}: " + "; ".join(parts))
    meets = [m for m in modes if not any(x.startswith(m + " ") for x in missed)]
    print(f"meets both targets: {', '.join(meets) or 'neither design'}"
          + (f"; misses: {', '.join(missed)}" if missed else ""))
    lru = next(x for x in cases if x.name == "LRU insert")
    print(f"kernel LRU hash insert alone (for scale): {lru.ns - floor:.1f} ns above floor")
    for mode, cnt in counters.items():
        print(f"VIP counters ({mode}): {cnt['ct_hits']} conntrack hits, {cnt['new_flows']} new flows")
    # Figures are the product; a missed target is reported above, not as a failure exit, so
    # `make bench` still runs every bench.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
