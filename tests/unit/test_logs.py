"""The node's logging pipeline (node.logs): JSON lines that stay JSON whatever logs, journald
priority prefixes, and the children's output bounded on disk."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

from node import logs
from node.events import EventLog


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])
    logging.captureWarnings(False)


def emit_everything() -> None:
    """What a node's stderr carries: events, library loggers, a traceback, a Python warning."""
    EventLog().emit("vip_announced", "VIP web announced", vip="web", backends=2)
    EventLog().emit("backend_down", 'backend 10.0.0.1:80 of VIP web is DOWN: "connect refused"\nsecond line',
                    level="warning", vip="web", backend="10.0.0.1:80")
    logging.getLogger("maglev.bgp").info("BGP session with %s established", "192.0.2.1",
                                         extra=logs.event("bgp_session_up", peer="192.0.2.1"))
    logging.getLogger("maglev.bfd").warning("bfdd did not answer vtysh within 10 s")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("maglev.health").exception("the probe hook failed for %s", "10.0.0.1:80")
    warnings.warn("something deprecated", DeprecationWarning, stacklevel=1)
    logging.getLogger("aiohttp.server").info("noise an operator does not need")


def test_json_mode_every_line_is_one_json_object(restore_logging):
    out = io.StringIO()
    logs.configure("json", "info", stream=out, env={})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        emit_everything()
    lines = out.getvalue().splitlines()
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert len(records) == 6, lines
    by_event = {r["event"]: r for r in records}
    assert by_event["vip_announced"] == {**by_event["vip_announced"], "level": "info", "vip": "web", "backends": 2}
    assert by_event["backend_down"]["level"] == "warning" and "second line" in by_event["backend_down"]["msg"]
    assert by_event["bgp_session_up"]["peer"] == "192.0.2.1"
    assert by_event["bfd"]["level"] == "warning"  # no event given: the logger's name
    assert "RuntimeError: boom" in by_event["health"]["exception"]
    assert "something deprecated" in by_event["py_warnings"]["msg"]
    assert all(isinstance(r["ts"], float) for r in records)


def test_text_mode_reads_as_event_message_fields(restore_logging):
    out = io.StringIO()
    logs.configure("text", "info", stream=out, env={})
    logging.getLogger("maglev.bgp").warning("BGP session with %s down: %s", "192.0.2.1", "hold timer",
                                            extra=logs.event("bgp_session_down", peer="192.0.2.1", reason="hold timer"))
    line = out.getvalue().strip()
    assert line.endswith('WARNING bgp_session_down: BGP session with 192.0.2.1 down: hold timer '
                         '[peer=192.0.2.1 reason="hold timer"]'), line


def test_debug_is_filtered_at_info_and_kept_at_debug(restore_logging):
    out = io.StringIO()
    logs.configure("json", "info", stream=out, env={})
    logging.getLogger("maglev.bgp").debug("ExaBGP API: done")
    assert out.getvalue() == ""
    logs.configure("json", "debug", stream=out, env={})
    logging.getLogger("maglev.bgp").debug("ExaBGP API: done")
    assert json.loads(out.getvalue())["level"] == "debug"


def test_under_journald_each_line_carries_its_priority(restore_logging, tmp_path):
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        logs.configure("json", "info", stream=stream, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        emit_everything()
        stream.seek(0)
        lines = stream.read().splitlines()
    prios = {"info": "<6>", "warning": "<4>", "error": "<3>"}
    for line in lines:
        prefix, rest = line[:3], line[3:]
        assert prefix == prios[json.loads(rest)["level"]], line  # after journald strips it: JSON


def test_a_stream_that_is_not_the_journal_gets_no_prefix(tmp_path):
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.is_journald(a, env) and not logs.is_journald(b, env)
        assert not logs.is_journald(a, {}) and not logs.is_journald(a, {"JOURNAL_STREAM": "junk"})


def test_bad_format_or_level_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="text, json"):
        logs.configure("xml")
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        logs.configure("text", "loud")


def test_rotating_file_stays_within_its_bound(tmp_path):
    f = logs.RotatingFile(tmp_path / "exabgp.log", max_bytes=1000, backups=2)
    line = b"x" * 99 + b"\n"
    for _ in range(200):  # 20 KB through a 3 x 1 KB budget
        f.write(line)
    f.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["exabgp.log", "exabgp.log.1", "exabgp.log.2"]
    assert all((tmp_path / n).stat().st_size <= 1000 for n in files)
    assert (tmp_path / "exabgp.log.1").read_bytes().count(b"\n") == 10


async def test_child_output_drains_a_real_child_into_bounded_files(tmp_path):
    out = logs.ChildOutput(tmp_path / "logs" / "bfdd.log", "bfdd", max_bytes=4096, backups=1)
    script = "import sys\nfor i in range(2000): print(f'line {i}', flush=i % 100 == 0)\nsys.exit(3)"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    task = out.drain(proc.stdout)
    assert await proc.wait() == 3
    await asyncio.wait_for(task, 5)
    sizes = [p.stat().st_size for p in (tmp_path / "logs").iterdir()]
    assert len(sizes) == 2 and all(s <= 4096 for s in sizes)
    assert out.tail(2) == "line 1998 | line 1999"
    assert (tmp_path / "logs" / "bfdd.log").read_text().endswith("line 1999\n")


async def test_child_output_keeps_draining_when_its_file_cannot_be_written(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = logs.ChildOutput(blocker / "exabgp.log", "ExaBGP")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "print('x' * 100000)\nprint('last')",
                                                stdout=asyncio.subprocess.PIPE)
    task = out.drain(proc.stdout)
    assert await asyncio.wait_for(proc.wait(), 10) == 0  # never blocked on a full pipe
    await asyncio.wait_for(task, 5)
    assert out.tail(1) == "last"
    assert any("over-long output line was cut" in line for line in out.last)  # 100 KB > the 64 KiB limit
    assert [r.event for r in caplog.records if hasattr(r, "event")] == ["child_log_unwritable"]
