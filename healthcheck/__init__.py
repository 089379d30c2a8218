"""Health checking for maglev-lb: probes (tcp, http/https, udp, dns, exec), a per-backend state
machine with flap dampening, and an asyncio monitor the node controller drives.

Public API:
- ``Target``, ``State``, ``ProbeResult``, ``Transition``, ``TargetStatus`` (healthcheck.types)
- ``HealthMonitor(on_transition=None, *, clock=time.monotonic, on_probe=None)`` with
  ``start()``, ``stop()``, ``update(targets, inherit=None)`` (a new target may take over an old
  one's verdict), ``snapshot()``, ``events()``
- ``probe(target) -> ProbeResult``: one probe, for ``maglev check``; ``ProbeResult.inconclusive``
  marks a timeout caused by a stall of this process (not counted by the state machine)
- ``StateMachine``: the pure rise/fall/dampening logic
- ``Prober.start(target, done)``: start a probe without awaiting it (what the monitor's schedule
  uses; tcp and http run as callbacks on one epoll set, see healthcheck.lean)
"""

from healthcheck.monitor import HealthMonitor
from healthcheck.probes import Prober, probe
from healthcheck.state import StateMachine
from healthcheck.types import ProbeResult, State, Target, TargetStatus, Transition

__all__ = [
    "HealthMonitor",
    "ProbeResult",
    "Prober",
    "State",
    "StateMachine",
    "Target",
    "TargetStatus",
    "Transition",
    "probe",
]
