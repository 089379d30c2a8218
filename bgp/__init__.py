"""BGP: announce and withdraw VIPs through ExaBGP (a supervised child), proven against FRR.

Public API: ``BgpSpeaker``, ``Route``, ``SessionInfo``, ``Reconciler`` (the pure state machine),
``BfdDaemon`` (FRR's bfdd next to ExaBGP, run by the speaker when ``bgp.bfd.enabled``).
"""

from bgp.bfd import BfdDaemon, BfdError
from bgp.reconciler import Command, Reconciler
from bgp.routes import GRACEFUL_SHUTDOWN, Route, RouteError
from bgp.speaker import BgpError, BgpSpeaker, SessionInfo

__all__ = ["BgpSpeaker", "BgpError", "Route", "RouteError", "SessionInfo", "Reconciler", "Command",
           "GRACEFUL_SHUTDOWN", "BfdDaemon", "BfdError"]
