"""Operator-facing event log: one line per meaningful event, as text or JSON lines.

Events say what happened, to which VIP or backend, and (where it helps) what to do. The same
event feeds the log and a short in-memory history the API shows, so an operator looking at
`maglev status` sees the last things that happened without grepping logs.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("maglev")


class EventLog:
    def __init__(self, fmt: str = "text", history: int = 200, stream=None) -> None:
        self.fmt = fmt
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self.stream = stream if stream is not None else sys.stderr

    def emit(self, event: str, message: str, level: str = "info", **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "level": level, "event": event, "msg": message, **fields}
        self.recent.append(record)
        if self.fmt == "json":
            line = json.dumps(record, default=str, sort_keys=False)
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record["ts"]))
            extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
            line = f"{stamp} {level.upper():5} {event}: {message}" + (f" [{extra}]" if extra else "")
        print(line, file=self.stream, flush=True)


def _text(value: Any) -> str:
    s = str(value)
    return json.dumps(s) if (" " in s or not s) else s
