"""`maglev node` as a whole, with its real components: ExaBGP peering with a real FRR router,
the XDP forwarder attached to the node's interface (its self-test gates announcements), and
HTTP health checks against real backend servers.

Topology (unique prefix, removed even on failure):

    router ns (FRR, AS 65000) 10.97.0.1 ── veth ── 10.97.0.2 node ns (maglev node, AS 65001)
                                                    backends: HTTP servers on 10.97.1.1/.2 (lo)

The backends live inside the node's namespace: this test is about the controller's decisions
as the router sees them (the data path to real backends is proven by the forwarder's live test
and the lab's end-to-end tests).
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lab.frr import FrrRouter, Neighbor, render_config
from lab.netns import Netns, cleanup_prefix, mount_bpffs, umount, unique_prefix, veth
from lab.nssocket import in_netns
from node.client import ApiError, Client

pytestmark = [pytest.mark.root, pytest.mark.integration]

ROUTER, NODE = "10.97.0.1", "10.97.0.2"
BACKENDS = ["10.97.1.1", "10.97.1.2"]
VIP, VIP2 = "10.97.100.1", "10.97.100.2"
TOKEN = "node-test-token"
# The node runs with a common default file limit, so API load that could exhaust it would.
NODE_FILE_LIMIT = 1024


def _node_file_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NODE_FILE_LIMIT, NODE_FILE_LIMIT))


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def vip_obj(name: str, address: str, **extra) -> dict:
    return {
        "name": name,
        "address": address,
        "port": 80,
        "table_size": 251,
        "backends": [{"address": b, "port": 8080} for b in BACKENDS],
        "health_check": {"type": "http", "path": "/", "interval": 0.3, "timeout": 0.2, "rise": 1, "fall": 1},
        **extra,
    }


class NodeLab:
    """The router, the node's namespace and its backends; the node started as `maglev node`.
    Subclasses (tests/integration/test_service.py) change how the node runs by overriding
    node_settings(), node_argv() and node_env()."""

    bfd = False  # BFD on the router's neighbor (the node enables bgp.bfd to match)

    def __init__(self) -> None:
        self.prefix = unique_prefix("mlbn")
        # Short paths: ExaBGP's API socket must fit in a UNIX socket path.
        self.dir = Path(tempfile.mkdtemp(prefix="mlbn"))
        self.vip_dir = self.dir / "vips"
        self.vip_dir.mkdir()
        self.backends: dict[str, subprocess.Popen] = {}
        self.node_proc: subprocess.Popen | None = None
        self.router: FrrRouter | None = None

    def build(self) -> None:
        p = self.prefix
        self.r = Netns.create(f"{p}-r")
        self.n = Netns.create(f"{p}-n")
        self.if_node = f"{p}n0"
        veth(self.r, f"{p}r0", self.n, self.if_node)
        self.r.add_address(f"{p}r0", f"{ROUTER}/24")
        self.n.add_address(self.if_node, f"{NODE}/24")
        for b in BACKENDS:
            self.n.add_address("lo", f"{b}/32")
        self.router_mac = json.loads(self.r.ip("-j", "link", "show", f"{p}r0").stdout)[0]["address"]
        self.r.sysctl("net.ipv4.ip_forward", 1)
        self.router = FrrRouter(self.r, render_config(asn=65000, router_id=ROUTER,
                                                      neighbors=[Neighbor(NODE, 65001, bfd=self.bfd)]), bfd=self.bfd)
        self.router.start()
        for b in BACKENDS:
            self.start_backend(b)
        self.bpffs = mount_bpffs(self.dir / "bpffs")
        (self.dir / "token").write_text(TOKEN + "\n")
        (self.dir / "token").chmod(0o644)  # readable by others on purpose: the node must warn
        (self.vip_dir / "main.yaml").write_text(yaml.safe_dump({"vips": [vip_obj("web", VIP)]}))
        self.node_file = self.dir / "node.yaml"
        self.node_file.write_text(yaml.safe_dump(self.node_settings()))
        self.start_node()

    def node_settings(self) -> dict:
        return {
            "node_id": "itest-node",
            "vip_dir": str(self.vip_dir),
            "run_dir": str(self.dir / "run"),
            "warmup": 5,
            "bgp": {"local_as": 65001, "router_id": NODE, "local_address": NODE, "withdraw_delay": 0.5,
                    "min_change_interval": 0, "flap_hold_down": 0,
                    "peers": [{"address": ROUTER, "peer_as": 65000}]},
            "forwarder": {"interfaces": [self.if_node], "xdp_mode": "native", "encap_source_v4": NODE,
                          "next_hop_mac": self.router_mac, "bpffs": str(self.bpffs), "self_test_interval": 1,
                          "conntrack_size": 4096},
            "api": {"token_file": str(self.dir / "token")},
        }

    def node_argv(self) -> list[str]:
        return [sys.executable, "-m", "node.cli", "node", "--config", str(self.node_file)]

    def node_env(self) -> dict[str, str] | None:
        return None  # the test's own environment

    def node_preexec(self) -> Callable[[], None] | None:
        return _node_file_limit

    def start_node(self) -> None:
        self.log = open(self.dir / "node.log", "a")
        self.node_proc = self.n.popen(self.node_argv(), stdout=self.log, stderr=subprocess.STDOUT,
                                      cwd=Path(__file__).parents[2], env=self.node_env(),
                                      preexec_fn=self.node_preexec())

    def start_backend(self, addr: str) -> None:
        www = self.dir / "www"
        www.mkdir(exist_ok=True)
        self.backends[addr] = self.n.popen(
            [sys.executable, "-m", "http.server", "--bind", addr, "8080", "--directory", str(www)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_backend(self, addr: str) -> None:
        proc = self.backends.pop(addr)
        proc.kill()
        proc.wait()

    def client(self, token: bool = True) -> "NsClient":
        return NsClient(self.n.name, Client("http://127.0.0.1:9180", TOKEN if token else None))

    def routes(self) -> set[str]:
        out = self.r.run("ip", "-4", "route", "show", "proto", "bgp").stdout
        return {line.split()[0] for line in out.splitlines() if line.strip()}

    def log_text(self) -> str:
        self.log.flush()
        return (self.dir / "node.log").read_text()

    def teardown(self) -> None:
        if self.node_proc and self.node_proc.poll() is None:
            self.node_proc.send_signal(signal.SIGTERM)
            try:
                self.node_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.node_proc.kill()
        for proc in self.backends.values():
            proc.kill()
        if self.router:
            self.router.stop()
        cleanup_prefix(self.prefix)
        if hasattr(self, "bpffs"):
            umount(self.bpffs)
        shutil.rmtree(self.dir, ignore_errors=True)


class NsClient:
    """The node's API, reached from inside its namespace (it listens on the node's 127.0.0.1)."""

    def __init__(self, ns: str, client: Client):
        self.ns, self.c = ns, client

    def __getattr__(self, name):
        method = getattr(self.c, name)

        def call(*args, **kwargs):
            with in_netns(self.ns):
                return method(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def lab():
    lab = NodeLab()
    try:
        lab.build()
        wait_for(lambda: VIP + " " in " ".join(r + " " for r in lab.routes()), 30,
                 "the VIP to be announced to the router")
        yield lab
    except BaseException:
        if lab.node_proc is not None:
            print(lab.log_text())
        raise
    finally:
        lab.teardown()


def test_announced_after_warmup(lab):
    status = lab.client().get("/api/v1/status")
    assert status["warmup_over"] and status["forwarder"]["ok"], status
    assert status["forwarder"]["mode"] == "native"
    assert status["vips"]["web"]["announced"] and status["vips"]["web"]["serving"] == 2
    assert lab.router.nexthops(f"{VIP}/32") == {NODE}
    log = lab.log_text()
    # The order an operator reads in the log: health verdicts, warm-up over, table, announce.
    assert log.index("warmup_over") < log.index("vip_announced: VIP web")
    assert "table_rebuilt: VIP web" in log


def test_api_writes_need_the_token(lab):
    with pytest.raises(ApiError) as info:
        lab.client(token=False).post("/api/v1/node/drain")
    assert info.value.status == 401
    assert lab.client().get("/api/v1/status")["node_drained"] is False


def test_metrics_parse(lab):
    text = lab.client().get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["vip"]: s.value for s in families["maglev_vip_announced"].samples} == {"web": 1.0}
    assert families["maglev_forwarder_up"].samples[0].value == 1.0
    states = {(s.labels["peer"], s.labels["state"]): s.value for s in families["maglev_bgp_session_state"].samples}
    assert states[(ROUTER, "established")] == 1.0


def test_all_backends_down_withdraws_then_comes_back(lab):
    for b in list(BACKENDS):
        lab.stop_backend(b)
    took = wait_for(lambda: f"{VIP}" not in lab.routes(), 10, "the router to lose the VIP")
    print(f"[node] all backends down -> VIP withdrawn at the router in {took:.2f} s")
    view = lab.client().get("/api/v1/vips/web")
    assert not view["announced"] and "fewer than min_healthy 1" in view["reason"]
    assert all(b["health"] == "down" for b in view["backends"])
    for b in BACKENDS:
        lab.start_backend(b)
    took = wait_for(lambda: f"{VIP}" in lab.routes(), 15, "the VIP to come back")
    print(f"[node] backends back -> VIP announced again in {took:.2f} s")
    assert "backend_down: backend 10.97.1.1:8080 of VIP web is DOWN" in lab.log_text()


def test_reload_adds_a_vip_and_a_bad_reload_changes_nothing(lab):
    (lab.vip_dir / "extra.yaml").write_text(yaml.safe_dump({"vips": [vip_obj("extra", VIP2)]}))
    wait_for(lambda: VIP2 in lab.routes(), 15, "the new VIP to be announced (directory watch)")
    digest = lab.client().get("/api/v1/vips/web")["digest"]
    (lab.vip_dir / "broken.yaml").write_text(yaml.safe_dump({"vips": [vip_obj("broken", "10.97.100.3", table_size=100)]}))
    os.kill(lab.node_proc.pid, signal.SIGHUP)
    wait_for(lambda: (lab.client().get("/api/v1/status")["last_reload"] or {}).get("ok") is False, 10,
             "the broken file to be rejected")
    status = lab.client().get("/api/v1/status")
    assert any("broken.yaml" in p and "table_size 100 is not prime" in p for p in status["last_reload"]["problems"])
    assert sorted(status["vips"]) == ["extra", "web"]
    assert lab.routes() >= {VIP, VIP2}
    assert lab.client().get("/api/v1/vips/web")["digest"] == digest
    (lab.vip_dir / "broken.yaml").unlink()


def test_put_vip_over_the_api_then_delete(lab):
    body = vip_obj("api-made", "10.97.100.4")
    result = lab.client().request("PUT", "/api/v1/vips/api-made", body=body)
    assert result["name"] == "api-made"
    assert (lab.vip_dir / "api-made.yaml").exists()
    wait_for(lambda: "10.97.100.4" in lab.routes(), 15, "the API-made VIP to be announced")
    lab.client().request("DELETE", "/api/v1/vips/api-made")
    wait_for(lambda: "10.97.100.4" not in lab.routes(), 15, "the API-made VIP to be withdrawn")


def test_node_drain_withdraws_everything(lab):
    lab.client().post("/api/v1/node/drain")
    wait_for(lambda: not lab.routes(), 10, "every VIP to be withdrawn")
    lab.client().post("/api/v1/node/undrain")
    wait_for(lambda: VIP in lab.routes(), 10, "the VIPs to come back")


def test_disable_file_de_prefers_every_vip_at_the_router_without_the_api(lab):
    """The maintenance switch (issue 14): `touch run_dir/disable` and the router sees the
    node's routes de-preferred (longer AS path, worse MED); `rm` and they are plain again."""
    disable = lab.dir / "run" / "disable"
    cfg = str(lab.node_file)

    def path() -> dict:
        (p,) = lab.router.bgp_paths(f"{VIP}/32")
        return p

    assert path()["aspath"]["string"] == "65001"
    disable.touch()
    try:
        wait_for(lambda: path()["aspath"]["string"] == "65001 65001 65001 65001", 10,
                 "the router to see the node's route de-preferred")
        assert path()["metric"] == 1000
        assert VIP in lab.routes()  # still reachable: this is the only node
        status = lab.client().get("/api/v1/status")
        assert status["disable"]["active"] and status["disable"]["path"] == str(disable)
        assert status["vips"]["web"]["state"] == "depreferred"
        assert str(disable) in status["vips"]["web"]["reason"]
        r = maglev(lab, "status", "--config", cfg)
        assert f"DISABLED by {disable}: every VIP de-preferred" in r.stdout, r.stdout
        assert "depreferred" in r.stdout
        assert metric_samples(lab, "maglev_node_disabled") == {(): 1.0}
        states = metric_samples(lab, "maglev_vip_announce_state")
        assert states[(("reason", "disabled"), ("state", "depreferred"), ("vip", "web"))] == 1.0
        assert 'id="disabled"' in lab.client().get("/")
        assert "node_disabled: disable file" in lab.log_text()
    finally:
        disable.unlink(missing_ok=True)
    wait_for(lambda: path()["aspath"]["string"] == "65001", 10, "plain routes once the file is gone")
    assert lab.client().get("/api/v1/status")["vips"]["web"]["state"] == "announced"
    assert metric_samples(lab, "maglev_node_disabled") == {(): 0.0}


def maglev(lab, *args: str) -> subprocess.CompletedProcess:
    """The operator CLI, run inside the node's namespace as an operator would on the node."""
    return lab.n.run(sys.executable, "-m", "node.cli", *args, check=False)


def test_operator_cli(lab):
    cfg = str(lab.node_file)
    r = maglev(lab, "status", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "node itest-node" in r.stdout and "forwarder: OK (native)" in r.stdout
    assert f"{ROUTER}  established" in r.stdout
    r = maglev(lab, "vips", "web", "--config", cfg, "--json")
    view = json.loads(r.stdout)
    assert view["announced"] and {b["key"] for b in view["backends"]} == {f"{b}:8080" for b in BACKENDS}
    r = maglev(lab, "drain", f"{BACKENDS[0]}:8080", "--vip", "web", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert f"{BACKENDS[0]}:8080  drain" in r.stdout
    r = maglev(lab, "trace", "--vip", "web", "192.0.2.9:40000", "--config", cfg, "--json")
    t = json.loads(r.stdout)
    assert t["backend"] == f"{BACKENDS[1]}:8080"  # the only active backend now
    assert t["live_backend"] == t["backend"]  # read back from the kernel's table
    assert t["digest"] == lab.client().get("/api/v1/vips/web")["digest"]
    r = maglev(lab, "undrain", f"{BACKENDS[0]}:8080", "--vip", "web", "--config", cfg)
    assert r.returncode == 0 and f"{BACKENDS[0]}:8080  active" in r.stdout
    # Without the token file the write is refused, with the reason.
    r = maglev(lab, "node-drain", "--api", "http://127.0.0.1:9180")
    assert r.returncode == 2 and "bearer token" in r.stderr


def metric_samples(lab, name: str) -> dict[tuple, float]:
    families = {f.name: f for f in text_string_to_metric_families(lab.client().get("/metrics"))}
    family = families.get(name.removesuffix("_total"))
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples} if family else {}


def test_idle_api_connections_cannot_starve_the_node(lab):
    """1000 idle connections to the API (no token needed to open one), kept up for longer than
    the header deadline, several probe intervals (0.3 s) and self-tests (1 s): the node keeps
    its file handles for its own sockets, no verdict changes and nothing is withdrawn."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    assert "WARNING token_file_unsafe" in lab.log_text()  # the lab's token file is 0644
    wait_for(lambda: lab.routes() >= {VIP}, 15, "the VIP to be announced")
    view = lab.client().get("/api/v1/vips/web")
    assert view["announced"] and all(b["health"] == "up" for b in view["backends"])
    transitions = metric_samples(lab, "maglev_backend_transitions_total")
    self_tests_failed = metric_samples(lab, "maglev_forwarder_self_tests_total").get((("result", "fail"),), 0)
    log_start = len(lab.log_text())
    pid = lab.node_proc.pid  # `ip netns exec` execs the node: same PID

    sel = selectors.DefaultSelector()

    def connect() -> None:
        with in_netns(lab.n.name):
            s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", 9180))
        sel.register(s, selectors.EVENT_READ)

    for _ in range(1000):
        connect()
    routes_seen, node_files, replaced = [], [], 0
    end = time.monotonic() + 12
    try:
        while time.monotonic() < end:
            # A connection the node cut (no request head by the deadline) is replaced at once:
            # the pressure stays at 1000 for the whole period.
            for key, _ in sel.select(timeout=0.2):
                sel.unregister(key.fileobj)
                key.fileobj.close()
                connect()
                replaced += 1
            routes_seen.append(VIP in lab.routes())
            node_files.append(len(os.listdir(f"/proc/{pid}/fd")))
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()
    print(f"[node] 1000 idle API connections for 12 s: {replaced} cut by the node and replaced; "
          f"node file handles max {max(node_files)} of {NODE_FILE_LIMIT}")
    assert all(routes_seen), "the router lost the VIP while the API was under load"
    assert max(node_files) < NODE_FILE_LIMIT // 2
    assert replaced >= NODE_FILE_LIMIT // 8  # the node cut the idle ones it had accepted
    log = lab.log_text()[log_start:]
    for event in ("backend_down", "vip_withdrawn", "forwarder_self_test_failed"):
        assert event not in log, log
    assert metric_samples(lab, "maglev_backend_transitions_total") == transitions
    assert metric_samples(lab, "maglev_forwarder_self_tests_total").get((("result", "fail"),), 0) == self_tests_failed
    guard = {name: metric_samples(lab, name).get((), 0) for name in (
        "maglev_api_connection_limit", "maglev_api_connection_limit_reached_total",
        "maglev_api_connections_timed_out_total")}
    assert guard["maglev_api_connection_limit"] == NODE_FILE_LIMIT // 8
    assert guard["maglev_api_connection_limit_reached_total"] > 0
    assert guard["maglev_api_connections_timed_out_total"] >= NODE_FILE_LIMIT // 8
    view = lab.client().get("/api/v1/vips/web")
    assert view["announced"] and all(b["health"] == "up" for b in view["backends"])


def test_sigterm_withdraws_then_exits_cleanly(lab):
    lab.node_proc.send_signal(signal.SIGTERM)
    took = wait_for(lambda: not lab.routes(), 10, "routes withdrawn on SIGTERM")
    assert lab.node_proc.wait(timeout=15) == 0
    log = lab.log_text()
    assert "node_stopping" in log and "forwarder_detached" in log and "node_stopped" in log
    print(f"[node] SIGTERM -> routes gone in {took:.2f} s, exit 0")
    # Detached: no XDP program left on the interface.
    assert "xdp" not in lab.n.ip("link", "show", lab.if_node).stdout
