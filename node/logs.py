"""The node's one logging pipeline: stdlib ``logging``, text or JSON lines, journald-friendly.

Every line the node writes goes through here: operator events (``node.events.EventLog``),
the BGP and BFD session changes of ``bgp/``, health transitions, forwarder warnings, and
Python tracebacks. ``configure()`` installs one handler on the root logger, so a library that
logs (or a ``log.exception``) cannot slip a raw line into a JSON stream.

A record may carry an event name and fields (``extra=event("bgp_session_up", peer=...)``);
records without one get their logger's name as the event (``maglev.bfd`` -> ``bfd``).

Under systemd, stderr is a journald stream (``JOURNAL_STREAM`` names it): each line then starts
with its syslog priority (``<3>`` error ... ``<7>`` debug). journald strips that prefix and files
the line at that priority, so `journalctl -p warning` works and the stored message of a JSON
line is still exactly one JSON object.

The children's own output (ExaBGP, bfdd) is not the node's log: ``ChildOutput`` drains it into a
size-bounded file that rotates while the child runs (a chatty ExaBGP writes ~19 MiB a day).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
# syslog priorities (sd-daemon.h's SD_* prefixes) for journald's level parsing
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# A child's output file rotates at this size; BACKUPS older files are kept.
CHILD_LOG_MAX_BYTES = 4 * 1024 * 1024
CHILD_LOG_BACKUPS = 2


def event(name: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log call: the record's event name and its structured fields."""
    return {"event": name, "fields": fields}


def _event_of(record: logging.LogRecord) -> str:
    name = getattr(record, "event", None)
    if name:
        return str(name)
    return record.name.removeprefix("maglev.").replace(".", "_") or "log"


def _fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _level_name(record: logging.LogRecord) -> str:
    return record.levelname.lower()


class JsonFormatter(logging.Formatter):
    """One JSON object per record, always on one line (json.dumps escapes newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": _level_name(record),
                               "event": _event_of(record), "msg": record.getMessage()}
        for key, value in _fields_of(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00Z INFO  event: message [key=value ...]``; a traceback follows
    on indented lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        fields = _fields_of(record)
        extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        line = f"{stamp} {record.levelname:5} {_event_of(record)}: {record.getMessage()}"
        if extra:
            line += f" [{extra}]"
        if record.exc_info:
            line += "\n" + "\n".join("    " + s for s in self.formatException(record.exc_info).splitlines())
        return line


def _text(value: Any) -> str:
    s = str(value)
    return json.dumps(s) if (" " in s or not s) else s


class _Handler(logging.StreamHandler):
    """A stream handler that prefixes each line with its syslog priority under journald."""

    def __init__(self, stream: TextIO, journald: bool) -> None:
        super().__init__(stream)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journald:
            return text
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def is_journald(stream: TextIO, env: dict[str, str] | None = None) -> bool:
    """True if stream is the journald stream systemd connected (JOURNAL_STREAM=dev:inode)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure(fmt: str = "text", level: str = "info", stream: TextIO | None = None,
              env: dict[str, str] | None = None) -> logging.Handler:
    """Send every logger's records through one handler on ``stream`` (stderr by default),
    replacing any handler an earlier call installed. Returns the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    stream = stream if stream is not None else sys.stderr
    handler = _Handler(stream, is_journald(stream, env))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is off; its other loggers stay at warning (a client's broken request
    # is not the operator's news).
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler


# -- the children's own output ---------------------------------------------------------------


class RotatingFile:
    """Append-only file that rotates at max_bytes: path -> path.1 -> ... -> path.BACKUPS."""

    def __init__(self, path: Path, max_bytes: int = CHILD_LOG_MAX_BYTES, backups: int = CHILD_LOG_BACKUPS):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._f = None

    def write(self, data: bytes) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "ab")
        if self._f.tell() and self._f.tell() + len(data) > self.max_bytes:
            self._rotate()
        self._f.write(data)
        self._f.flush()

    def _rotate(self) -> None:
        self.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self._f = open(self.path, "ab")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class ChildOutput:
    """Drains a child's stdout (with its stderr) into a RotatingFile and keeps its last lines
    for error messages. The child never blocks on a full pipe: the node always reads, and a
    line it cannot write (disk full) is dropped with one warning."""

    def __init__(self, path: Path, what: str, *, max_bytes: int = CHILD_LOG_MAX_BYTES,
                 backups: int = CHILD_LOG_BACKUPS) -> None:
        self.file = RotatingFile(path, max_bytes, backups)
        self.what = what
        self.last: collections.deque[str] = collections.deque(maxlen=5)
        self._warned = False

    @property
    def path(self) -> Path:
        return self.file.path

    def drain(self, reader: asyncio.StreamReader) -> asyncio.Task:
        return asyncio.create_task(self._drain(reader), name=f"{self.what}-output")

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line over the reader's limit (64 KiB): asyncio dropped it
                line = b"[maglev: an over-long output line was cut here]\n"
            if not line:
                return
            self.last.append(line.decode(errors="replace").rstrip())
            try:
                self.file.write(line)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    logging.getLogger("maglev.logs").warning(
                        "cannot write %s's output to %s (%s); dropping it until the node restarts",
                        self.what, self.path, exc, extra=event("child_log_unwritable", path=str(self.path)))

    def tail(self, lines: int = 3) -> str:
        return " | ".join(list(self.last)[-lines:]) or "(no output)"
