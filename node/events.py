"""Operator-facing event log: one record per meaningful event, through the node's logging
pipeline (node.logs: text or JSON lines).

Events say what happened, to which VIP or backend, and (where it helps) what to do. The same
event feeds the log and a short in-memory history the API shows, so an operator looking at
`maglev status` sees the last things that happened without grepping logs.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from node.logs import event as _extra

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class EventLog:
    def __init__(self, history: int = 200, logger: logging.Logger | None = None) -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self.log = logger or logging.getLogger("maglev.events")

    def emit(self, event: str, message: str, level: str = "info", **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "level": level, "event": event, "msg": message, **fields}
        self.recent.append(record)
        self.log.log(LEVELS.get(level, logging.INFO), "%s", message, extra=_extra(event, **fields))
