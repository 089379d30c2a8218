"""The control plane at fleet scale (issue 12): a real `maglev node`, its XDP forwarder attached,
in private namespaces, as a user runs it. Not a test: it prints figures.

For each scale (VIPs x backends per VIP) it starts the node several times from clean pins and
measures, reading the kernel's maps itself (the pinned vip_meta/tables maps, from this process):

- start: node process spawned -> every VIP's live table in the kernel (full size);
- idle CPU: the node process's CPU over a quiet window (health checks keep running);
- RSS now and peak (VmRSS / VmHWM of the node process);
- reload: one backend of one VIP changed in its file + SIGHUP -> that VIP's new table live;
- shared down: a backend that every VIP has stops answering, timed from the controller's first
  backend_down event (controller time, not detection) -> out of service: no VIP's data path
  sends it new flows any more (its entry in the backends map no longer active: the data path
  hands a draining or down backend's table entries to the next active entry, maglev.h
  STOP_GAP_STEPS; or its id gone from the live table) -> tables: no VIP's live table holds
  its id any more (patched in place or flipped);
- drain: POST .../backends/KEY/drain -> answered, and -> that VIP's table live.

Figures are medians over the runs of one invocation. VIPs are written ten per file (a vips.d
directory as a fleet keeps it). Health checks are TCP every 2 s on a pool of backend addresses
shared by the VIPs (the monitor probes each distinct target once).

    sudo .venv/bin/python bench/controlplane_scale.py [--scales 1000x10,100x100] [--runs 3]
        [--table-capacity N]   (old code: its table_capacity had to be raised by hand)
        [--baseline DIR]       (another checkout, e.g. `git archive main`: its node runs in
                                the same namespaces, interleaved with this one run by run, so
                                both tables come from the same invocation and the same load)

The node runs from this checkout (or DIR) with this interpreter; a C extension not built in
DIR makes its node fall back to the pure-Python loops, so build it there first.
"""

from __future__ import annotations

import argparse
import ctypes as C
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.netns import Netns, cleanup_prefix, mount_bpffs, umount, unique_prefix, veth  # noqa: E402
from lab.nssocket import http_get  # noqa: E402
from node.forwarder import libbpf  # noqa: E402

TOKEN = "bench-token"
NODE, PEER = "10.98.0.2", "10.98.0.1"
POOL_NET, SHARED = "10.98.1.", "10.98.2.1"
POOL_PORT, SHARED_PORT = 8080, 8081
VIPS_PER_FILE = 10
META_SIZE = 48
BACKEND_SIZE, BACKEND_STATE, BE_STATE_ACTIVE = 24, 17, 1  # maglev.h: struct backend, its state byte
TABLE_SIZE = 65537

LISTENER = r"""
import socket, sys, selectors
sel = selectors.DefaultSelector()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4096); s.setblocking(False)
sel.register(s, selectors.EVENT_READ)
while True:
    for _ in sel.select():
        try:
            c, _ = s.accept(); c.close()
        except BlockingIOError:
            pass
"""


class KernelView:
    """The node's pinned maps, read from this process: which table is live for each VIP."""

    def __init__(self, pin_dir: Path):
        self.fds = {n: libbpf.obj_get(pin_dir / n)
                    for n in ("vip_meta", "tables", "vip_names", "be_names", "backends")}
        self.nmeta = libbpf.map_info(self.fds["vip_meta"]).max_entries
        self.ntab = libbpf.map_info(self.fds["tables"]).max_entries * 8
        page = mmap.PAGESIZE
        self.meta = mmap.mmap(self.fds["vip_meta"], -(-self.nmeta * META_SIZE // page) * page,
                              mmap.MAP_SHARED, mmap.PROT_READ)
        self.tab = mmap.mmap(self.fds["tables"], -(-self.ntab * 4 // page) * page, mmap.MAP_SHARED, mmap.PROT_READ)
        self.names: dict[str, int] = {}

    def close(self) -> None:
        self.meta.close()
        self.tab.close()
        for fd in self.fds.values():
            os.close(fd)

    def fields(self, vid: int) -> tuple[int, int, int, int]:
        """(active, in_use, live offset, live size)."""
        active, in_use, o0, s0, o1, s1 = array("I", self.meta[vid * META_SIZE:vid * META_SIZE + 24])
        return (active, in_use, o1, s1) if active & 1 else (active, in_use, o0, s0)

    def live_count(self, size: int) -> int:
        n = 0
        for vid in range(self.nmeta):
            _, in_use, _, s = self.fields(vid)
            n += bool(in_use and s == size)
        return n

    def snapshot(self) -> bytes:
        return bytes(self.meta[:self.nmeta * META_SIZE])

    def actives(self) -> list[int]:
        return [self.meta[v * META_SIZE] for v in range(self.nmeta)]

    def _name(self, map_name: str, idx: int) -> str:
        buf = (C.c_char * 256)()
        libbpf.lookup(self.fds[map_name], C.c_uint32(idx), buf)
        return bytes(buf).rstrip(b"\0").decode()

    def vip_ids(self) -> dict[str, int]:
        if not self.names:
            self.names = {self._name("vip_names", v): v for v in range(self.nmeta) if self.fields(v)[1]}
        return self.names

    def backend_id(self, vip: str, key: str) -> int | None:
        want = vip + "\0" + key
        for bid in range(1, libbpf.map_info(self.fds["be_names"]).max_entries):
            if self._name("be_names", bid) == want:
                return bid
        return None

    def backend_ids_of(self, key: str) -> dict[str, int]:
        """vip name -> the id its backend ``key`` has (one pass over be_names)."""
        out = {}
        for bid in range(1, libbpf.map_info(self.fds["be_names"]).max_entries):
            vip, _, k = self._name("be_names", bid).partition("\0")
            if k == key:
                out[vip] = bid
        return out

    def active(self, bid: int) -> bool:
        """Whether backend id bid is active (takes new flows) in the backends map."""
        value = (C.c_uint8 * BACKEND_SIZE)()
        libbpf.lookup(self.fds["backends"], C.c_uint32(bid), value)
        return value[BACKEND_STATE] == BE_STATE_ACTIVE

    def holds(self, vid: int, bid: int) -> bool:
        """Whether the VIP's live table holds backend id bid (a search in the mapping, no copy)."""
        _, _, off, size = self.fields(vid)
        pat, start, end = array("I", [bid]).tobytes(), off * 4, (off + size) * 4
        pos = self.tab.find(pat, start, end)
        while pos != -1 and (pos - start) % 4:
            pos = self.tab.find(pat, pos + 1, end)
        return pos != -1

    def table(self, vid: int) -> array:
        _, _, off, size = self.fields(vid)
        a = array("I")
        a.frombytes(self.tab[off * 4:(off + size) * 4])
        return a


def wait(cond, timeout: float, what: str, step: float = 0.002) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)
    return time.monotonic()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mem_mb(pid: int) -> tuple[float, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out["VmRSS"], out["VmHWM"]


class Bench:
    def __init__(self, nvips: int, nback: int, table_capacity: int | None):
        self.nvips, self.nback, self.table_capacity = nvips, nback, table_capacity
        self.pool = max(20, nback + 10)  # pool addresses (the shared backend comes on top)
        self.prefix = unique_prefix("s12")
        self.dir = Path(tempfile.mkdtemp(prefix="mlbcp"))
        self.vip_dir = self.dir / "vips"
        self.procs: list[subprocess.Popen] = []
        self.shared: subprocess.Popen | None = None
        self.node: subprocess.Popen | None = None

    # ---- setup --------------------------------------------------------------------------
    def build(self) -> None:
        p = self.prefix
        self.r = Netns.create(f"{p}-r")
        self.n = Netns.create(f"{p}-n")
        self.ifname = f"{p}n0"
        veth(self.r, f"{p}r0", self.n, self.ifname)
        self.r.add_address(f"{p}r0", f"{PEER}/24")
        self.n.add_address(self.ifname, f"{NODE}/24")
        batch = "".join(f"addr add {POOL_NET}{i}/32 dev lo\n" for i in range(1, self.pool + 1))
        self.n.run("ip", "-batch", "-", input=batch + f"addr add {SHARED}/32 dev lo\n")
        self.peer_mac = json.loads(self.r.ip("-j", "link", "show", f"{p}r0").stdout)[0]["address"]
        self.procs.append(self.n.popen([sys.executable, "-c", LISTENER, "0.0.0.0", str(POOL_PORT)]))
        self.start_shared()
        self.bpffs = mount_bpffs(self.dir / "bpffs")
        (self.dir / "token").write_text(TOKEN + "\n")

    def start_shared(self) -> None:
        self.shared = self.n.popen([sys.executable, "-c", LISTENER, SHARED, str(SHARED_PORT)])

    def stop_shared(self) -> None:
        if self.shared:
            self.shared.kill()
            self.shared.wait()
            self.shared = None

    def backends_of(self, i: int) -> list[dict]:
        """The shared backend plus nback - 1 of the pool, a different choice per VIP (seeded),
        so each VIP has its own table: no table is shared by two VIPs' caches."""
        picks = random.Random(i).sample(range(1, self.pool + 1), self.nback - 1)
        others = [{"address": f"{POOL_NET}{n}", "port": POOL_PORT} for n in sorted(picks)]
        return [{"address": SHARED, "port": SHARED_PORT}] + others

    def vip_obj(self, i: int) -> dict:
        return {"name": f"vip-{i:04d}", "address": f"10.{99 + i // 65536}.{i // 256 % 256}.{i % 256}",
                "port": 80, "backends": self.backends_of(i),
                "health_check": {"type": "tcp", "interval": 2, "timeout": 1, "rise": 1, "fall": 1}}

    def write_vips(self) -> None:
        shutil.rmtree(self.vip_dir, ignore_errors=True)
        self.vip_dir.mkdir()
        for f in range(0, self.nvips, VIPS_PER_FILE):
            vips = [self.vip_obj(i) for i in range(f, min(f + VIPS_PER_FILE, self.nvips))]
            (self.vip_dir / f"vips-{f // VIPS_PER_FILE:04d}.yaml").write_text(yaml.safe_dump({"vips": vips}))

    def node_file(self) -> Path:
        fwd = {"interfaces": [self.ifname], "xdp_mode": "native", "encap_source_v4": NODE,
               "next_hop_mac": self.peer_mac, "bpffs": str(self.bpffs), "conntrack_size": 65536}
        if self.table_capacity:
            fwd["table_capacity"] = self.table_capacity
        node = {"node_id": "bench", "vip_dir": str(self.vip_dir), "run_dir": str(self.dir / "run"),
                "warmup": 30, "log_format": "json",
                # A peer that never answers (nothing listens in its namespace): ExaBGP takes the
                # routes and keeps trying to connect, as on a node whose router is down.
                "bgp": {"local_as": 65001, "router_id": NODE, "local_address": NODE, "withdraw_delay": 0,
                        "peers": [{"address": PEER, "peer_as": 65000}]},
                "forwarder": fwd, "api": {"token_file": str(self.dir / "token")}}
        path = self.dir / "node.yaml"
        path.write_text(yaml.safe_dump(node))
        return path

    def teardown(self) -> None:
        self.stop_node()
        self.stop_shared()
        for proc in self.procs:
            proc.kill()
            proc.wait()
        cleanup_prefix(self.prefix)
        if hasattr(self, "bpffs"):
            umount(self.bpffs)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- one run --------------------------------------------------------------------------
    def stop_node(self) -> None:
        if self.node and self.node.poll() is None:
            self.node.send_signal(signal.SIGTERM)
            try:
                self.node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.node.kill()
                self.node.wait()
        self.node = None

    def events(self, name: str) -> list[dict]:
        out = []
        for line in (self.dir / "node.log").read_text().splitlines():
            if f'"event": "{name}"' in line:
                out.append(json.loads(line))
        return out

    def api(self, method: str, path: str) -> tuple[int, bytes]:
        return http_get(self.n.name, "127.0.0.1", 9180, path, method=method, body=b"" if method == "POST" else None,
                        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def run_once(self, code: Path = ROOT) -> dict:
        for pin in self.bpffs.iterdir():  # a cold start: the previous run's pins go
            if pin.is_file() and not pin.name.endswith(".debug"):
                pin.unlink()
        shutil.rmtree(self.dir / "run", ignore_errors=True)  # no drain overrides from the last run
        self.write_vips()
        if self.shared is None:
            self.start_shared()
        node_file = self.node_file()
        log = open(self.dir / "node.log", "w")
        t0 = time.monotonic()
        profile = ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]] if os.environ.get("BENCH_PROFILE") else []
        self.node = self.n.popen([sys.executable, *profile, "-m", "node.cli", "node", "--config", str(node_file)],
                                 stdout=log, stderr=subprocess.STDOUT, cwd=code)
        pid = self.node.pid

        def pinned() -> bool:
            if self.node.poll() is not None:
                raise RuntimeError("node exited: " + (self.dir / "node.log").read_text()[-1500:])
            return (self.bpffs / "tables").exists()
        wait(pinned, 120, "the forwarder's pins", 0.01)
        kv = KernelView(self.bpffs)
        res: dict = {}
        try:
            def programmed() -> bool:
                if self.node.poll() is not None:
                    raise RuntimeError("node exited: " + (self.dir / "node.log").read_text()[-1500:])
                return kv.live_count(TABLE_SIZE) >= self.nvips
            res["start"] = wait(programmed, 600, "every table programmed", 0.01) - t0
            wait(lambda: self._all_announced(), 300, "every VIP announced and its route in ExaBGP", 0.5)
            time.sleep(6)  # let the first self-test rounds and health checks settle
            c0, w0 = cpu_seconds(pid), time.monotonic()
            time.sleep(10)
            res["idle_cpu"] = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
            res["rss"], res["rss_peak"] = mem_mb(pid)
            res["reload"] = self.reload_one(kv, pid)
            res["shared_out"], res["shared_down"] = self.shared_down(kv)
            self.start_shared()  # back up, and every table exact again, before the drain
            wait(lambda: self._all_serving(), 300, "every VIP serving all its backends again", 0.5)
            time.sleep(3)
            res["drain_answer"], res["drain_live"] = self.drain(kv)
            res["rss_after"], res["rss_peak"] = mem_mb(pid)
        except Exception:
            shutil.copy(self.dir / "node.log", Path(tempfile.gettempdir()) / "controlplane_scale-failed-node.log")
            raise
        finally:
            kv.close()
            self.stop_node()
            log.close()
            shutil.copy(self.dir / "node.log", Path(tempfile.gettempdir()) / "controlplane_scale-node.log")
        return res

    def _all_announced(self) -> bool:
        code, body = self.api("GET", "/api/v1/status")
        if code != 200:
            return False
        status = json.loads(body)
        vips = status["vips"]
        return (len(vips) == self.nvips and all(v["announced"] for v in vips.values())
                and len(status["bgp"]["announced"]) == self.nvips)

    def _all_serving(self) -> bool:
        code, body = self.api("GET", "/api/v1/status")
        vips = json.loads(body)["vips"] if code == 200 else {}
        return len(vips) == self.nvips and all(v["serving"] == self.nback for v in vips.values())

    def reload_one(self, kv: KernelView, pid: int) -> float:
        """Change one backend of vip-0000 (its last one moves to the next pool address)."""
        vid = kv.vip_ids()["vip-0000"]
        path = self.vip_dir / "vips-0000.yaml"
        data = yaml.safe_load(path.read_text())
        have = {b["address"] for b in data["vips"][0]["backends"]}
        new_addr = next(f"{POOL_NET}{n}" for n in range(1, self.pool + 1) if f"{POOL_NET}{n}" not in have)
        data["vips"][0]["backends"][-1]["address"] = new_addr
        path.write_text(yaml.safe_dump(data))
        before = kv.fields(vid)[0]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGHUP)
        t1 = wait(lambda: kv.fields(vid)[0] != before, 60, "vip-0000's new table")
        bid = kv.backend_id("vip-0000", f"{new_addr}:{POOL_PORT}")
        if bid is None or bid not in kv.table(vid):
            raise RuntimeError("vip-0000's live table does not hold the new backend")
        return t1 - t0

    def shared_down(self, kv: KernelView) -> tuple[float, float]:
        """(out of service, tables), see the module's docstring. Out of service: the states
        of the VIPs not yet seen out are read each poll (a lookup each); a VIP whose table
        lost the id first (a version that flips tables before states) counts when the table
        poll below sees it. Tables: the VIP the node programs last (both versions go in name
        order) is watched alone, since a scan of every table per poll made this process fall
        behind a fast node on two busy CPUs (it measured itself); then every table is
        checked, and one still holding the id is waited for, the time being when the last
        one is seen live."""
        ids = kv.vip_ids()
        shared = kv.backend_ids_of(f"{SHARED}:{SHARED_PORT}")
        self.stop_shared()
        last = max(ids)
        serving = dict(ids)
        out_at: list[float] = []

        def tables_of_last_done() -> bool:
            for name in [n for n in serving if not kv.active(shared[n])]:
                del serving[name]
            if not serving and not out_at:
                out_at.append(time.monotonic())
            return not kv.holds(ids[last], shared[last])
        t_live_mono = wait(tables_of_last_done, 120, f"{last}'s table without the shared backend", 0.001)
        if not out_at:  # some VIPs still active: out of service when their tables lost it
            out_at.append(t_live_mono)
        for name, vid in ids.items():
            sid = shared[name]
            if kv.holds(vid, sid):
                t_live_mono = wait(lambda: not kv.holds(vid, sid), 120,
                                   f"{name}'s table without the shared backend", 0.001)
        t_live = time.time() - (time.monotonic() - t_live_mono)
        time.sleep(0.5)  # the log line is flushed after the event
        t_out = time.time() - (time.monotonic() - min(out_at[0], t_live_mono))
        downs = [e for e in self.events("backend_down") if e.get("backend") == f"{SHARED}:{SHARED_PORT}"]
        first = min(e["ts"] for e in downs)
        return t_out - first, t_live - first

    def drain(self, kv: KernelView) -> tuple[float, float]:
        vid = kv.vip_ids()["vip-0001"]
        key = f"{self.backends_of(1)[1]['address']}:{POOL_PORT}"
        bid = kv.backend_ids_of(key)["vip-0001"]
        assert bid in kv.table(vid)
        live: list[float] = []

        def watch() -> None:  # the table may be live before the answer arrives
            live.append(wait(lambda: not kv.holds(vid, bid), 30, "vip-0001's drained table", 0.001))
        watcher = threading.Thread(target=watch)
        t0 = time.monotonic()
        watcher.start()
        code, body = self.api("POST", f"/api/v1/vips/vip-0001/backends/{key}/drain")
        t_answer = time.monotonic()
        watcher.join()
        if code != 200:
            raise RuntimeError(f"drain answered {code}: {body[:300]!r}")
        return t_answer - t0, live[0] - t0


def fmt_s(v: float) -> str:
    return f"{v:.2f} s" if v >= 1 else f"{v * 1000:.0f} ms"


def print_table(rows: list) -> None:
    print("| VIPs x backends | start -> programmed | idle CPU | RSS (peak) | 1-backend reload -> live "
          "| shared backend down -> out of service / tables (controller) | API drain answer / live |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for scale, runs in rows:
        if not runs:
            print(f"| {scale} | refused / failed | | | | | |")
            continue

        def med(k: str) -> float:
            return statistics.median(r[k] for r in runs)
        print(f"| {scale} | {fmt_s(med('start'))} | {med('idle_cpu'):.1f} % | {med('rss'):.0f} MB "
              f"({max(r['rss_peak'] for r in runs):.0f}) | {fmt_s(med('reload'))} | {fmt_s(med('shared_out'))} / {fmt_s(med('shared_down'))} "
              f"| {fmt_s(med('drain_answer'))} / {fmt_s(med('drain_live'))} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="1000x10,100x100")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--table-capacity", type=int, default=None,
                    help="forwarder.table_capacity (default: the node's default)")
    ap.add_argument("--baseline", default=None, help="another checkout whose node runs interleaved with this one")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, XDP)", file=sys.stderr)
        return 2
    codes = [("this checkout", ROOT)]
    if args.baseline:
        codes.insert(0, ("baseline " + str(args.baseline), Path(args.baseline).resolve()))
    rows: dict[str, list] = {label: [] for label, _ in codes}
    for scale in args.scales.split(","):
        nv, nb = (int(x) for x in scale.split("x"))
        cap = args.table_capacity
        if cap == -1:  # old code: size the flat tables map by hand, as its error message asked
            cap = -(-2 * TABLE_SIZE * nv // 8) * 8
        bench = Bench(nv, nb, cap)
        runs: dict[str, list] = {label: [] for label, _ in codes}
        failed: set[str] = set()
        try:
            bench.build()
            for i in range(args.runs):
                for label, code in codes:  # interleaved: both see the same load, run by run
                    if label in failed:
                        continue
                    try:
                        r = bench.run_once(code)
                    except Exception as exc:  # report and go on: the old code refuses big configs
                        print(f"{scale} [{label}] run {i + 1}: FAILED: {exc}", flush=True)
                        failed.add(label)
                        continue
                    print(f"{scale} [{label}] run {i + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in r.items()),
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
                    runs[label].append(r)
        finally:
            bench.teardown()
        for label, _ in codes:
            rows[label].append((scale, runs[label]))
    for label, _ in codes:
        print(f"\n{label}:")
        print_table(rows[label])
    print(f"\nmedians of {args.runs} run(s) per scale; peak RSS is the max over runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
