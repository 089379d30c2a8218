"""BGP graceful restart (RFC 4724) on the node's side: who still owes the router an End-of-RIB.

A router helping a restart keeps the restarting node's routes (marked stale, still forwarding)
until that node's new session sends End-of-RIB, then drops every stale route the node did not
announce again. So End-of-RIB means "this is all I announce", and it must wait until the
controller has made its first decision after warm-up and the speaker has sent it: sent earlier
(ExaBGP's default, as soon as the session is up) it would drop every route of a node that is
still warming up. After that first decision every session that comes up again gets its
End-of-RIB as soon as the routes it must carry have been handed to ExaBGP.

Pure bookkeeping (no I/O): the speaker asks ``next_command()`` when it has nothing else to
send, sends the line, and reports the answer with ``on_result``.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Callable

from node.config import BgpConfig

RETRY_AFTER = 1.0  # an End-of-RIB ExaBGP refused is tried again after this long


@dataclass(frozen=True)
class EorCommand:
    peer: str
    text: str


def eor_text(peer: str) -> str:
    family = "ipv4 unicast" if ipaddress.ip_address(peer).version == 4 else "ipv6 unicast"
    return f"neighbor {peer} announce eor {family}"


class EndOfRib:
    def __init__(self, config: BgpConfig, clock: Callable[[], float] = time.monotonic) -> None:
        gr = config.graceful_restart
        self.enabled = gr.enabled
        self.restart_time = gr.restart_time
        self.clock = clock
        self.ready = False  # the controller's first decision after warm-up was handed over
        self._owed: dict[str, float] = {}  # peer -> not before (clock): sessions up, no EOR yet
        self.sent_at: dict[str, float] = {}  # peer -> wall-clock time of its last End-of-RIB
        self.sent_total = 0
        # peer -> the restart time its router's OPEN offered (None: it did not offer graceful
        # restart, so a restart of this node withdraws at that router). Known once its OPEN came.
        self.router_offer: dict[str, int | None] = {}

    def routes_ready(self) -> None:
        """The controller handed over its first decision after warm-up (idempotent)."""
        self.ready = True

    def session_up(self, peer: str) -> None:
        if self.enabled:
            self._owed[peer] = -float("inf")

    def session_down(self, peer: str) -> None:
        self._owed.pop(peer, None)

    def router_open(self, peer: str, capability: dict | None) -> None:
        """The router's OPEN on this session: its graceful restart capability, or None."""
        if not self.enabled:
            return
        if capability is None:
            self.router_offer[peer] = None
            return
        try:
            self.router_offer[peer] = int(capability.get("time", 0))
        except (TypeError, ValueError):
            self.router_offer[peer] = 0

    def next_command(self) -> EorCommand | None:
        """The End-of-RIB to send now, if any (call only when no route is left to send)."""
        if not self.ready:
            return None
        now = self.clock()
        for peer, not_before in sorted(self._owed.items()):
            if not_before <= now:
                return EorCommand(peer, eor_text(peer))
        return None

    def next_wakeup(self) -> float | None:
        if not self.ready or not self._owed:
            return None
        return min(self._owed.values())

    def on_result(self, cmd: EorCommand, ok: bool) -> None:
        if cmd.peer not in self._owed:
            return  # the session went down meanwhile; its next start owes one again
        if ok:
            del self._owed[cmd.peer]
            self.sent_at[cmd.peer] = time.time()
            self.sent_total += 1
        else:
            self._owed[cmd.peer] = self.clock() + RETRY_AFTER

    def status(self) -> dict:
        return {
            "enabled": self.enabled,
            "restart_time": self.restart_time,
            # Until the first decision after warm-up, a router helping a restart keeps the
            # node's previous routes: say so.
            "initial_routes_ready": self.ready,
            "end_of_rib_owed": sorted(self._owed),
            "end_of_rib_sent_at": dict(sorted(self.sent_at.items())),
            "end_of_rib_sent_total": self.sent_total,
            # Negotiated = offered by both sides (RFC 4724): ours is in the config, the
            # router's in the OPEN of the session's last start.
            "negotiated_with": sorted(p for p, t in self.router_offer.items() if t is not None),
            "not_negotiated_with": sorted(p for p, t in self.router_offer.items() if t is None),
        }


def keeps_routes_on_stop(on_stop: str, config: BgpConfig) -> bool:
    """A stop with ``forwarder.on_stop: keep`` and graceful restart is a planned restart: the
    XDP forwarder stays attached with its pinned tables and keeps forwarding, so the routes may
    stay too. Any other stop withdraws first (``detach``: nothing would forward)."""
    return on_stop == "keep" and config.graceful_restart.enabled
