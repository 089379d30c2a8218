"""Forwarder cost per packet, measured with BPF_PROG_TEST_RUN (root).

Method (see the datapath field notes): repeat=1 calls, never `repeat N` (the program would see
its own encapsulated output from the second iteration on), averaged over >= 200k calls per
case, 64-byte TCP frames (60 bytes + FCS). Four cases in the same run, interleaved in rounds so
drift hits them alike:

- floor:       a bare XDP_TX program (bpf/xdp_floor.c): the fixed cost of a test-run call
- established: a VIP flow with a conntrack hit
- new flow:    a VIP SYN that misses conntrack, hashes into the Maglev table and inserts
               (distinct source address/port per call)
- SYN, same:   the same SYN every call: the insert replaces the previous entry (warm
               memory); shown because a bench that does not vary the flow measures this
- non-VIP:     a TCP frame to an address that is no VIP (parse + conntrack and VIP lookups
               that miss + XDP_PASS)

For scale it also measures the kernel's LRU hash insert alone (bpf/xdp_floor.c: xdp_lru_insert,
an LRU hash with conntrack's key and value, distinct keys per call): what every new flow paid
while conntrack was an LRU hash, more than the whole new-flow path costs now that conntrack is a
direct-mapped array (maglev.h explains the trade).

Per case it prints the in-kernel ns/packet (the `duration` BPF_PROG_TEST_RUN reports, averaged
over each round's calls; the median over the rounds, so a burst of other work on this 2-core
machine moves one round, not the figure) and the cost above the floor; wall-clock ns/call (incl. the syscall and Python)
is printed for reference. Targets: established <= 120 ns above the floor, new flow <= 280 ns.
Katran, measured the same way on this kind of machine: ~149 and ~347 ns above its floor.

    .venv/bin/python bench/forwarder.py [--calls 200000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from ipaddress import ip_address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.forwarder import build, libbpf, packets  # noqa: E402
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
    def __init__(self, name: str, prog_fd: int, frame: bytes, vary: bool = False):
        self.name = name
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
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/forwarder.py needs root (BPF)", file=sys.stderr)
        return 1
    cpu = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {cpu})  # one CPU: per-CPU maps and caches stay put

    per_round = max(1, args.calls // args.rounds)
    ct_size = args.conntrack_size
    floor_obj = libbpf.BpfObject(build.build("xdp_floor"))
    floor_obj.set_max_entries("lru_probe", ct_size)
    floor_obj.load()
    try:
        with temp_forwarder(table_capacity=1 << 18, conntrack_size=ct_size) as fwd:
            fwd.sync(vips())
            est = packets.flow_packet("192.0.2.1", VIP, 40000, 80, tcp_flags=0x10, size=60)
            syn = packets.flow_packet("198.18.0.0", VIP, 1, 80, tcp_flags=0x02, size=60)
            other = packets.flow_packet("192.0.2.1", "10.9.9.9", 40000, 80, size=60)
            assert len(est) == len(syn) == len(other) == 60
            fwd.test_run(est)  # the established flow's conntrack entry
            cases = [Case("floor", floor_obj.prog_fd("xdp_floor"), est),
                     Case("established", fwd.prog_fd, est),
                     Case("new flow", fwd.prog_fd, syn, vary=True),
                     Case("SYN, same", fwd.prog_fd, syn),
                     Case("non-VIP", fwd.prog_fd, other),
                     Case("LRU insert", floor_obj.prog_fd("xdp_lru_insert"), syn, vary=True)]
            for c in cases:
                c.round(2000)  # warm up, then forget the warm-up
                c.kernel_ns = c.wall_ns = c.calls = 0
                c.rounds_ns.clear()
            for _ in range(args.rounds):
                for c in cases:
                    c.round(per_round)
            counters = fwd.counters()["vips"]["bench"]
    finally:
        floor_obj.close()

    floor = cases[0].ns
    print(f"forwarder bench: {cases[0].calls} repeat=1 BPF_PROG_TEST_RUN calls per case "
          f"(median of {args.rounds} rounds), 64-byte TCP frames, CPU {cpu}, kernel {os.uname().release}")
    print(f"{'case':<12} {'ns/pkt':>8} {'above floor':>12} {'target':>8} {'Katran':>8} {'wall ns/call':>13}  verdict")
    ok = True
    for c in cases:
        above = c.ns - floor
        tgt = TARGETS.get(c.name)
        kat = KATRAN.get(c.name)
        verdict = ",".join(libbpf.VERDICTS[v] for v in sorted(c.verdicts))
        print(f"{c.name:<12} {c.ns:8.1f} {above:12.1f} {tgt if tgt else '':>8} {kat if kat else '':>8} "
              f"{c.wall:13.1f}  {verdict}")
        if tgt is not None:
            ok &= above <= tgt
    for name in ("established", "new flow"):
        c = next(x for x in cases if x.name == name)
        print(f"{name}: {c.ns - floor:.1f} ns above floor = {(c.ns - floor) / KATRAN[name]:.2f} x Katran "
              f"({KATRAN[name]:.0f} ns); target <= {TARGETS[name]:.0f} ns: {'met' if c.ns - floor <= TARGETS[name] else 'MISSED'}")
    lru = next(x for x in cases if x.name == "LRU insert")
    new = next(x for x in cases if x.name == "new flow")
    print(f"kernel LRU hash insert alone (not used; for scale): {lru.ns - floor:.1f} ns above floor; "
          f"the whole new-flow path: {new.ns - floor:.1f} ns")
    print(f"VIP counters: {counters['ct_hits']} conntrack hits, {counters['new_flows']} new flows")
    # Figures are the product; a missed target is reported above, not as a failure exit, so
    # `make bench` still runs every bench.
    if not ok:
        print("note: a target was missed (see above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
