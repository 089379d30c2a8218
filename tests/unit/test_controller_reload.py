"""Reloads that keep traffic, a reload boundary that catches everything, self-test glitches,
supervised tasks (issue 11), with the fake components of test_controller."""

from __future__ import annotations

import asyncio
import threading

import pytest

from healthcheck import State
from node import metrics, vip_reader
from node.config import ConfigError
from node.handover import handover
from node.reconcile import Health
from node.supervisor import Supervisor
from tests.unit.test_controller import Env, FakeResult, vip

ALL = ("10.0.1.1", "10.0.1.2", "10.0.1.3")


async def serving_env(tmp_path, vips=None) -> Env:
    e = Env(tmp_path, vips or [vip()])
    await e.start()
    for a in ALL:
        e.health.set(a, State.UP)
    await e.c.reconcile()
    assert e.speaker.prefixes == ["10.100.0.1/32"]
    return e


def check(**over):
    return {"type": "tcp", "interval": 1, "timeout": 0.5, **over}


@pytest.mark.parametrize("new_check", [
    check(interval=1.2),
    check(rise=5, fall=1),
    check(port=8080),
    {"type": "http", "path": "/healthz", "interval": 2, "timeout": 1},
])
async def test_changing_the_check_keeps_verdicts_tables_and_route(tmp_path, new_check):
    e = await serving_env(tmp_path)
    e.health.set("10.0.1.3", State.DOWN)
    await e.c.reconcile()
    table, syncs = e.forwarder.last["web"]["table"], len(e.forwarder.syncs)
    old_targets = set(e.health.targets)
    e.write("main.yaml", [vip(check=False, health_check=new_check)])
    result = await e.c.reload("test")
    assert result.ok and result.changed == ["web"]
    assert not (old_targets & e.health.targets)  # every target is new...
    d = await e.c.reconcile()
    # ...and took over its backend's verdict: nothing moved, nothing was reprogrammed.
    assert [b.health for b in d.vips["web"].backends] == [Health.UP, Health.UP, Health.DOWN]
    assert d.vips["web"].announce and e.speaker.prefixes == ["10.100.0.1/32"]
    assert len(e.forwarder.syncs) == syncs and e.forwarder.last["web"]["table"] == table
    assert all(h == ["10.100.0.1/32"] for h in e.speaker.history)


async def test_adding_a_check_to_a_static_pool_keeps_it_serving(tmp_path):
    e = Env(tmp_path, [vip(check=False)])
    await e.start()
    await e.c.reconcile()
    assert e.speaker.prefixes == ["10.100.0.1/32"]
    e.write("main.yaml", [vip()])
    assert (await e.c.reload("test")).ok
    d = await e.c.reconcile()
    assert d.vips["web"].announce and len(d.vips["web"].serving) == 3


async def test_a_new_backend_waits_for_up_while_the_others_keep_their_entries(tmp_path):
    e = await serving_env(tmp_path)
    table = e.forwarder.last["web"]["table"]
    e.write("main.yaml", [vip(backends=ALL + ("10.0.1.4",), check=False, health_check=check(interval=3))])
    assert (await e.c.reload("test")).ok
    d = await e.c.reconcile()
    new = next(b for b in d.vips["web"].backends if b.key == "10.0.1.4")
    assert new.health is Health.UNKNOWN and not new.serving
    assert e.forwarder.last["web"]["table"] == table and e.speaker.prefixes == ["10.100.0.1/32"]
    e.health.set("10.0.1.4", State.UP)
    await e.c.reconcile()
    assert set(e.forwarder.last["web"]["table"]) == {*ALL, "10.0.1.4"}


def test_handover_prefers_the_cautious_verdict_of_a_shared_target():
    class S:
        def __init__(self, state):
            self.state = state

    probed = {"tA": S(State.UP), "tB": S(State.DOWN), "kept": S(State.UP)}
    old = {("a", "x"): "tA", ("b", "x"): "tB", ("c", "y"): "kept"}
    health = {("a", "x"): Health.UP, ("b", "x"): Health.DOWN, ("c", "y"): Health.UP, ("d", "z"): Health.UP}
    new = {("a", "x"): "shared", ("b", "x"): "shared", ("c", "y"): "kept", ("d", "z"): "tD", ("e", "w"): "tE"}
    assert handover(old, health, new, probed) == {"shared": "tB", "tD": State.UP}


async def test_a_reload_that_raises_anything_is_caught_and_reported(tmp_path, monkeypatch):
    e = await serving_env(tmp_path)

    def boom(*args, **kwargs):
        raise RuntimeError("out of file handles")

    monkeypatch.setattr(vip_reader, "load_node_vips", boom)
    result = await e.c.reload("test")
    assert not result.ok and "reload failed unexpectedly: RuntimeError('out of file handles')" in result.problems[0]
    assert str(e.c.vip_dir) in result.problems[0]
    assert e.c.status()["last_reload"]["ok"] is False
    text = metrics.render(e.c, {})
    assert "maglev_config_last_reload_successful 0" in text
    monkeypatch.undo()
    assert (await e.c.reload("test")).ok
    assert "maglev_config_last_reload_successful 1" in metrics.render(e.c, {})


@pytest.mark.parametrize("content", [
    b"vips:\n  - name: caf\xe9\n",
    b"vips: " + b"[" * 20000 + b"]" * 20000,
    b"vips:\n  - {name: web, address: 10.100.0.1, port: " + b"9" * 5000 + b"}\n",
    b"vips:\n  - {name: web, address: 10.100.0.1, port: 80, table_size: 2305843009213693951}\n",
])
async def test_hostile_files_are_rejected_with_the_file_named(tmp_path, content):
    e = await serving_env(tmp_path)
    (e.vip_dir / "hostile.yaml").write_bytes(content)
    result = await e.c.reload("test")
    assert not result.ok and result.problems[0].startswith(str(e.vip_dir / "hostile.yaml") + ": ")
    await e.c.reconcile()
    assert e.speaker.prefixes == ["10.100.0.1/32"]


async def test_the_watcher_survives_a_bad_file_and_applies_the_next_good_one(tmp_path, monkeypatch):
    monkeypatch.setattr("node.controller.WATCH_INTERVAL", 0.01)
    e = await serving_env(tmp_path)
    e.c.supervisor.spawn("vip-dir-watch", e.c._watch_loop)
    try:
        (e.vip_dir / "hostile.yaml").write_bytes(b"\xff\xfe")
        while e.c.last_reload.source != "VIP directory changed":
            await asyncio.sleep(0.01)
        assert not e.c.last_reload.ok and "not valid UTF-8" in e.c.last_reload.problems[0]
        (e.vip_dir / "hostile.yaml").unlink()
        e.write("api.yaml", [vip("api", "10.100.0.2")])
        while "api" not in e.c.vips:
            await asyncio.sleep(0.01)
        assert e.c.last_reload.ok and e.c.supervisor.restarts() == {"vip-dir-watch": 0}
    finally:
        await e.c.supervisor.stop()


async def test_the_read_runs_off_the_event_loop(tmp_path, monkeypatch):
    """The read blocks until a coroutine on the loop lets it go: it completes only if the loop
    kept running beside it."""
    e = await serving_env(tmp_path)
    release = threading.Event()
    real = vip_reader.load_node_vips

    def blocking(*args, **kwargs):
        if not release.wait(30):
            raise ConfigError([])
        return real(*args, **kwargs)

    monkeypatch.setattr(vip_reader, "load_node_vips", blocking)

    async def meanwhile():
        await e.c.reconcile()  # the loop's other work goes on
        release.set()

    result, _ = await asyncio.gather(e.c.reload("test"), meanwhile())
    assert result.ok


async def test_a_single_self_test_glitch_is_reported_not_acted_on(tmp_path):
    e = await serving_env(tmp_path)
    outcomes = [FakeResult(False, "VIP web: output differs"), FakeResult(True, "1 VIP(s) checked")]
    e.forwarder.self_test = lambda: outcomes.pop(0)
    st = await e.c.run_self_test()
    assert st.ok and outcomes == []
    await e.c.reconcile()
    assert e.speaker.prefixes == ["10.100.0.1/32"]
    assert "forwarder_self_test_glitch" in e.event_names()
    assert "maglev_forwarder_self_test_glitches_total 1" in metrics.render(e.c, {})


async def test_a_self_test_failure_confirmed_by_a_fresh_run_withdraws(tmp_path):
    e = await serving_env(tmp_path)
    e.forwarder.result = FakeResult(False, "VIP web: verdict XDP_PASS")
    st = await e.c.run_self_test()
    assert not st.ok
    await e.c.reconcile()
    assert e.speaker.prefixes == []


def vip_result(failing: dict[str, str], vips=("api", "web"), node_wide=False):
    from node.forwarder.loader import SelfTestResult, VipCheck

    checks = tuple(VipCheck(v, v not in failing, failing.get(v, "GRE to 10.0.1.1")) for v in vips)
    ok = not failing and not node_wide
    return SelfTestResult(ok, "; ".join(f"VIP {v}: {r}" for v, r in failing.items()) or "ok", checks, node_wide)


async def two_vip_env(tmp_path):
    e = Env(tmp_path, [vip(), vip("api", address="10.100.0.2")])
    await e.start()
    for a in ALL:
        e.health.set(a, State.UP)
    await e.c.reconcile()
    assert sorted(e.speaker.prefixes) == ["10.100.0.1/32", "10.100.0.2/32"]
    return e


async def test_a_confirmed_failure_of_one_vip_withdraws_that_vip_alone(tmp_path):
    e = await two_vip_env(tmp_path)
    e.forwarder.self_test = lambda vips=None: vip_result({"web": "verdict XDP_PASS"})
    st = await e.c.run_self_test()
    assert st.ok and st.faults == {"web": "verdict XDP_PASS"}
    await e.c.reconcile()
    assert e.speaker.prefixes == ["10.100.0.2/32"]
    assert "this VIP failed: verdict XDP_PASS" in e.c.status()["vips"]["web"]["reason"]
    assert "vip_self_test_failed" in e.event_names()
    # Periodic rounds keep checking the failing VIP; once it passes it is announced again.
    e.forwarder.self_test = lambda vips=None: vip_result({}, vips=tuple(vips or ("api", "web")))
    seen = []
    real = e.forwarder.self_test
    e.forwarder.self_test = lambda vips=None: (seen.append(vips), real(vips))[1]
    await e.c.run_self_test(["api"], sample=False)
    assert "web" in seen[-1] and e.c.self_test.faults == {}
    await e.c.reconcile()
    assert sorted(e.speaker.prefixes) == ["10.100.0.1/32", "10.100.0.2/32"]


async def test_a_node_wide_failure_still_withdraws_every_vip(tmp_path):
    e = await two_vip_env(tmp_path)
    e.forwarder.self_test = lambda vips=None: vip_result({}, node_wide=True)
    st = await e.c.run_self_test()
    assert not st.ok
    await e.c.reconcile()
    assert e.speaker.prefixes == []


async def test_one_vip_failing_once_is_a_glitch(tmp_path):
    e = await two_vip_env(tmp_path)
    outcomes = [vip_result({"web": "output differs"}), vip_result({})]
    e.forwarder.self_test = lambda vips=None: outcomes.pop(0)
    st = await e.c.run_self_test()
    assert st.ok and st.faults == {} and outcomes == []
    await e.c.reconcile()
    assert sorted(e.speaker.prefixes) == ["10.100.0.1/32", "10.100.0.2/32"]
    assert "forwarder_self_test_glitch" in e.event_names()


async def test_overlapping_self_tests_run_one_at_a_time(tmp_path):
    e = await serving_env(tmp_path)
    inside, most = [0], [0]
    gate = threading.Lock()

    def self_test():
        with gate:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        threading.Event().wait(0.01)
        with gate:
            inside[0] -= 1
        return FakeResult(True, "ok")

    e.forwarder.self_test = self_test
    await asyncio.gather(*(e.c.run_self_test() for _ in range(10)))
    assert most[0] == 1


class Events:
    def __init__(self):
        self.seen = []

    def emit(self, event, message, level="info", **fields):
        self.seen.append((event, message, fields))


async def test_supervisor_restarts_a_crashed_or_ended_task_and_counts_it():
    events = Events()
    sup = Supervisor(events, backoff_initial=0.001, backoff_max=0.002)
    runs = []
    done = asyncio.Event()

    async def flaky():
        runs.append(1)
        if len(runs) == 1:
            raise ValueError("bad input")
        if len(runs) == 2:
            return  # ended although it should run forever
        done.set()
        await asyncio.Event().wait()

    sup.spawn("watch", flaky)
    sup.spawn("warmup", lambda: asyncio.sleep(0), once=True)
    await done.wait()
    assert sup.restarts() == {"warmup": 0, "watch": 2}
    msgs = [m for ev, m, f in events.seen if ev == "task_restarted" and f["task"] == "watch"]
    assert "crashed: ValueError('bad input')" in msgs[0] and "should run until the node stops" in msgs[1]
    assert sup.status()["watch"]["running"] is True
    await sup.stop()
    assert sup.status()["watch"]["running"] is False


async def test_task_restarts_are_a_metric_per_task(tmp_path):
    e = await serving_env(tmp_path)
    e.c.supervisor.tasks["self-test"] = type("I", (), {"restarts": 3})()
    text = metrics.render(e.c, {})
    assert 'maglev_task_restarts_total{task="self-test"} 3' in text
