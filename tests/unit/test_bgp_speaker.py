"""BgpSpeaker's supervision and channel, with a fake ExaBGP program (no root, no network).

The fake reads the generated config like ExaBGP does, starts the real helper from its `run`
line, reports every neighbor up in ExaBGP's JSON, and answers commands with done/error. It
logs what it receives to a file, so the tests see exactly what reached "ExaBGP".
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import sys
from pathlib import Path

import pytest

import bgp.speaker as speaker_mod
from bgp import BgpSpeaker, Route
from node.config import BgpConfig

FAKE = r'''
import json, os, re, subprocess, sys
mode, log, conf = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
if mode == "crash":
    sys.exit(3)
run = re.search(r"run (.+);", conf).group(1).split()
peers = re.findall(r"^neighbor (\S+) \{", conf, re.M)
helper = subprocess.Popen(run, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
out = open(log, "a")

def emit(peer, state, reason=None):
    nb = {"address": {"local": "192.0.2.1", "peer": peer}, "state": state}
    if reason:
        nb["reason"] = reason
    helper.stdin.write((json.dumps({"exabgp": "5.0.15", "type": "state", "neighbor": nb}) + "\n").encode())
    helper.stdin.flush()

for p in peers:
    emit(p, "connected")
    emit(p, "up")
for raw in helper.stdout:
    line = raw.decode().strip()
    out.write(f"{os.getpid()} {line}\n")
    out.flush()
    bad = "10.99." in line
    helper.stdin.write(b"error\n" if bad else b"done\n")
    helper.stdin.flush()
    if "10.98.0.1/32" in line:  # simulate a session flap
        for p in peers:
            emit(p, "down", "peer reset")
            emit(p, "up")
'''

A = Route(ipaddress.ip_network("10.77.100.1/32"))
V6 = Route(ipaddress.ip_network("fd77:100::1/128"))


def config(**kw) -> BgpConfig:
    data = {"local_as": 65101, "router_id": "192.0.2.1", "local_address": "192.0.2.1",
            "local_address_v6": "2001:db8::1",
            "peers": [{"address": "192.0.2.254", "peer_as": 65000},
                      {"address": "2001:db8::fe", "peer_as": 65000}],
            "min_change_interval": 0, "flap_hold_down": 0, "withdraw_delay": 0.1}
    data.update(kw)
    return BgpConfig.model_validate(data)


@pytest.fixture
def env(tmp_path: Path):
    run_dir = Path(f"/tmp/mlbt-bgpunit-{os.getpid()}-{tmp_path.name[-12:]}")
    fake = tmp_path / "fake_exabgp.py"
    fake.write_text(FAKE)
    log = tmp_path / "received.log"
    log.touch()
    yield run_dir, fake, log
    import shutil
    shutil.rmtree(run_dir, ignore_errors=True)


def received(log: Path) -> list[tuple[int, str]]:
    out = []
    for line in log.read_text().splitlines():
        pid, text = line.split(" ", 1)
        out.append((int(pid), text))
    return out


async def until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def make(env, mode: str = "ok", **kw) -> BgpSpeaker:
    run_dir, fake, log = env
    return BgpSpeaker(config(**kw), run_dir, exabgp_argv=[sys.executable, str(fake), mode, str(log)])


async def test_announces_tracks_sessions_and_withdraws_on_graceful_stop(env):
    changes = []
    run_dir, fake, log = env
    sp = BgpSpeaker(config(), run_dir, exabgp_argv=[sys.executable, str(fake), "ok", str(log)],
                    on_change=lambda: changes.append(1))
    await sp.start()
    try:
        await until(lambda: {s.state for s in sp.sessions().values()} == {"established"}, what="sessions up")
        sp.set_desired([A, V6])
        await until(lambda: sp.announced() == {"10.77.100.1/32", "fd77:100::1/128"}, what="announced")
        assert [t for _, t in received(log)] == ["announce route 10.77.100.1/32 next-hop self",
                                                 "announce route fd77:100::1/128 next-hop self"]
        st = sp.status()
        json.dumps(st)
        assert st["healthy"] and st["channel"] and st["pending"] == {} and changes
        pid = sp.proc.pid
    finally:
        await sp.stop(graceful=True)
    lines = [t for _, t in received(log)]
    assert sorted(lines[-2:]) == ["withdraw route 10.77.100.1/32", "withdraw route fd77:100::1/128"]
    assert sp.proc.returncode is not None
    assert not os.path.exists(f"/proc/{pid}/stat") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]
    assert {s.state for s in sp.sessions().values()} == {"idle"}


async def test_session_down_up_resends_everything(env):
    sp = make(env)
    await sp.start()
    try:
        sp.set_desired([A, Route(ipaddress.ip_network("10.98.0.1/32"))])
        await until(lambda: len(sp.announced()) == 2, what="announced")
        log = env[2]
        # the fake flaps the sessions after 10.98.0.1; `up` makes the speaker send all again
        await until(lambda: [t for _, t in received(log)].count("announce route 10.77.100.1/32 next-hop self") >= 2,
                    what="re-announce after session up")
        assert sp.sessions()["192.0.2.254"].last_error == "peer reset"
    finally:
        await sp.stop(graceful=False)


async def test_refused_command_is_retried(env):
    sp = make(env)
    await sp.start()
    try:
        sp.set_desired([Route(ipaddress.ip_network("10.99.0.1/32"))])
        # The second refusal is answered after the fake logs the command: wait for the speaker
        # to have taken it (back in "retry"), not just for the fake to have seen it.
        await until(lambda: sum("10.99.0.1" in t for _, t in received(env[2])) >= 2
                    and "retry" in sp.status()["pending"].get("10.99.0.1/32", ""), what="a retry")
        st = sp.status()
        assert sp.announced() == set()
        assert "retry" in st["pending"]["10.99.0.1/32"] and "10.99.0.1/32" in st["last_error"]
    finally:
        await sp.stop(graceful=False)


async def test_dead_exabgp_is_restarted_and_gets_all_routes(env):
    sp = make(env)
    await sp.start()
    try:
        sp.set_desired([A])
        await until(lambda: sp.announced() == {"10.77.100.1/32"}, what="announced")
        first = sp.proc.pid
        os.kill(first, signal.SIGKILL)
        await until(lambda: any(pid != first for pid, _ in received(env[2])), timeout=10,
                    what="the restarted ExaBGP to receive the route")
        assert sp.restarts == 1 and sp.healthy
        assert [t for pid, t in received(env[2]) if pid != first] == ["announce route 10.77.100.1/32 next-hop self"]
        assert "exited" in sp.status()["last_error"]
    finally:
        await sp.stop(graceful=False)


async def test_exabgp_that_keeps_dying_makes_the_speaker_unhealthy(env, monkeypatch):
    monkeypatch.setattr(speaker_mod.BgpSpeaker, "backoff_initial", 0.01)
    monkeypatch.setattr(speaker_mod, "CONNECT_TIMEOUT", 0.2)
    sp = make(env, mode="crash")
    await sp.start()
    try:
        await until(lambda: not sp.healthy, timeout=10, what="unhealthy")
        assert sp.restarts >= speaker_mod.MAX_FAILURES
        assert "exited with status 3" in sp.status()["last_error"]
    finally:
        await sp.stop(graceful=False)


async def test_missing_exabgp_binary_fails_start(env):
    run_dir, _, _ = env
    sp = BgpSpeaker(config(), run_dir, exabgp_argv=["/nonexistent/exabgp"])
    with pytest.raises(FileNotFoundError):
        await sp.start()
    await sp.stop(graceful=False)


PARENT = r'''
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print(helper.pid, flush=True)
time.sleep(30)
'''


async def test_helper_stops_exabgp_when_the_controller_channel_closes(tmp_path: Path):
    """The helper is the second line of defence (after PDEATHSIG): a closed channel stops ExaBGP."""
    from bgp.exabgp import HELPER_PATH
    sock = f"/tmp/mlbt-helper-{os.getpid()}.sock"
    hello: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_client(reader, writer):
        hello.set_result(json.loads(await reader.readline()))
        writer.close()  # the "controller" goes away

    server = await asyncio.start_unix_server(on_client, path=sock)
    try:
        parent = await asyncio.create_subprocess_exec(sys.executable, "-c", PARENT, str(HELPER_PATH), sock,
                                                      stdout=asyncio.subprocess.PIPE)
        msg = await asyncio.wait_for(hello, 5)
        assert msg == {"hello": parent.pid}
        rc = await asyncio.wait_for(parent.wait(), 5)
        assert rc == -signal.SIGTERM
    finally:
        server.close()
        os.unlink(sock)
        if parent.returncode is None:
            parent.kill()
