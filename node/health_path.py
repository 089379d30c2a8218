"""Which path a VIP's health checks take (health_check.via), and the controller's side of the
node's tunnel for them (node/forwarder/hc_tunnel.py).

direct: the probe goes to the backend's own address and port, as it always did: it proves the
host and its service, not that the backend will answer traffic sent to the VIP.
tunnel: the probe goes to the VIP's address and port, GRE-encapsulated by the node to the ONE
backend under test, which answers straight back (DSR). A backend that lost the VIP on lo or its
decapsulation then fails its check, where a direct check would keep it in the table to eat its
share of every flow.

The controller calls ``health_target`` for every (VIP, backend), ``sync_tunnel`` before it hands
the targets to the monitor (so every tunnel probe finds its mark), ``open_tunnel`` at start or
at the first reload that brings a tunnel check, and ``close_tunnel`` when it stops. A tunnel that cannot be set up is no crash: its probes fail
with the reason (an operator sees it on every tunnel-checked backend), direct checks go on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

from node.config import Backend, VipConfig

log = logging.getLogger("maglev.controller")


def health_target(vip: VipConfig, backend: Backend) -> Any:
    """The Target probing this backend for this VIP. A tunnel check probes the VIP's port (a
    DSR backend serves the VIP's own port: GRE does not rewrite it), unless check.port says
    otherwise; a direct check the backend's port, as before."""
    from healthcheck import Target

    check = vip.health_check
    if check is not None and check.via == "tunnel":
        port = vip.port if isinstance(vip.port, int) else None
        return Target(backend.address, port, check, vip=vip.address)
    return Target(backend.address, vip.backend_port(backend), check)


def path_of(vip: VipConfig) -> str | None:
    """'direct', 'tunnel', or None for a VIP without health checks (a static pool)."""
    return vip.health_check.via if vip.health_check is not None else None


def tunnel_addresses(targets: Iterable[Any]) -> set[Any]:
    """The backend addresses the tunnel must steer probes to."""
    return {t.address for t in targets if getattr(t, "tunnel", False)}


def sync_tunnel(tunnel: Any, targets: Iterable[Any], events: Any) -> bool:
    """Give the tunnel the backends of the new targets (before the monitor probes them). True
    when tunnel checks are wanted and the tunnel was never opened: the caller opens it then.
    A failure (more backend addresses than the map holds) is reported; the probes of the
    backends left without a mark then say so."""
    if tunnel is None:
        return False
    wanted = tunnel_addresses(targets)
    try:
        tunnel.set_targets(wanted)
    except Exception as exc:  # noqa: BLE001 - a config must never crash the reload
        events.emit("health_tunnel_error", f"tunnel health checks: {exc}", level="error")
    return bool(wanted) and not tunnel.opened


async def open_tunnel(tunnel: Any, events: Any, targets: Iterable[Any]) -> None:
    """Set up the node's tunnel (probe device, routing, hc_tunnel.c) when some check needs it:
    a node without tunnel checks adds no device, rule or route. Failure is an error event, not
    a failed start: direct checks and the data path are unaffected, and the tunnel checks fail
    with the reason."""
    if tunnel is None or tunnel.opened or not tunnel_addresses(targets):
        return
    try:
        await asyncio.to_thread(tunnel.open)
    except Exception as exc:  # noqa: BLE001 - TunnelError, BpfError, a missing ip/clang
        events.emit("health_tunnel_error", str(exc), level="error")
        return
    events.emit("health_tunnel_ready", "tunnel health checks ready: probes to VIPs are marked and "
                "GRE-encapsulated to the backend under test (probe device mlbhc0)")


async def close_tunnel(tunnel: Any) -> None:
    if tunnel is None:
        return
    try:
        await asyncio.to_thread(tunnel.close)
    except Exception:  # noqa: BLE001 - stopping must go on
        log.exception("health: removing the tunnel for health checks failed")


def tunnel_status(tunnel: Any) -> dict[str, Any] | None:
    """The tunnel's state and counters; None while no tunnel check made the node set it up."""
    if tunnel is None or not getattr(tunnel, "opened", False):
        return None
    try:
        return tunnel.status()
    except Exception as exc:  # noqa: BLE001 - a status view never raises
        return {"ok": False, "error": f"status unavailable: {exc}"}
