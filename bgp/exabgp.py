"""ExaBGP 5.0 configuration and environment generated from the node's BGP section.

Every value written comes from a validated object (``ipaddress`` types, ints, a checked path),
never from config text. One neighbor block per peer, carrying the peer's own address family
(IPv4 peers: ``ipv4 unicast``, IPv6 peers: ``ipv6 unicast``), so a route command without a
``neighbor`` selector reaches exactly the sessions that can carry it. One API process (the
helper) with the JSON encoder and ``neighbor-changes`` so session state arrives as events.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path

from node.config import BgpConfig

PROCESS_NAME = "maglev"
HELPER_PATH = Path(__file__).with_name("helper.py")
# ExaBGP splits the `run` line on spaces and has no quoting we want to rely on.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+-]+$")


class ExabgpConfigError(ValueError):
    pass


def _safe_path(p: Path | str, what: str) -> str:
    s = str(p)
    if not _SAFE_PATH.match(s):
        raise ExabgpConfigError(
            f"{what} {s!r} must be an absolute path of letters, digits and _ . / + - only "
            "(ExaBGP's process `run` line cannot quote); choose another run directory"
        )
    return s


def render_config(config: BgpConfig, socket_path: Path, python: str = sys.executable) -> str:
    run = " ".join([_safe_path(python, "python interpreter"), _safe_path(HELPER_PATH, "helper"),
                    _safe_path(socket_path, "API socket")])
    out = [
        f"process {PROCESS_NAME} {{",
        f"    run {run};",
        "    encoder json;",
        # A dead helper means a dead channel: the controller restarts ExaBGP as a whole.
        "    respawn false;",
        "}",
        "",
    ]
    router_id = ipaddress.IPv4Address(config.router_id)
    for peer in config.peers:
        addr = ipaddress.ip_address(peer.address)
        local = config.local_for(peer)
        hold = peer.hold_time if peer.hold_time is not None else config.hold_time
        family = "ipv4 unicast" if addr.version == 4 else "ipv6 unicast"
        out += [
            f"neighbor {addr} {{",
            f"    router-id {router_id};",
            f"    local-address {ipaddress.ip_address(local)};",
            f"    local-as {int(config.local_as)};",
            f"    peer-as {int(peer.peer_as)};",
            f"    hold-time {int(hold)};",
        ]
        if peer.passive:
            out += ["    passive true;", "    listen 179;"]
        out += _graceful_restart(config)
        out += [
            "    family {",
            f"        {family};",
            "    }",
            "    api {",
            f"        processes [ {PROCESS_NAME} ];",
            "        neighbor-changes;",
            *_router_open(config),
            "    }",
            "}",
            "",
        ]
    return "\n".join(out)


def _graceful_restart(config: BgpConfig) -> list[str]:
    """RFC 4724 capability, with the End-of-RIB ours to send (``manual-eor``).

    ExaBGP on its own sends End-of-RIB as soon as a session is up, before the controller has
    announced anything: a router helping a restart would take that as "this node has no
    routes" and drop them all. The speaker sends it once the controller's first decision after
    warm-up is announced (bgp.speaker). With the capability negotiated ExaBGP also closes its
    sessions without a NOTIFICATION when stopped, which is what lets the router keep the routes.
    """
    gr = config.graceful_restart
    if not gr.enabled:
        return []
    return ["    manual-eor true;", "    capability {", f"        graceful-restart {int(gr.restart_time)};", "    }"]


def _router_open(config: BgpConfig) -> list[str]:
    """With graceful restart, the router's OPEN goes to the speaker: whether it offers the
    capability is whether restart is negotiated (ExaBGP reports nothing else of it)."""
    if not config.graceful_restart.enabled:
        return []
    return ["        receive {", "            parsed;", "            open;", "        }"]


def environment(run_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """ExaBGP's settings, passed as environment variables (they override its defaults)."""
    env = dict(os.environ if base is None else base)
    env.update({
        # Started as root ExaBGP drops to `nobody` by default; the helper then cannot reach the
        # controller's socket and dies silently. Stay root (the controller is root anyway).
        "exabgp_daemon_user": "root",
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_daemonize": "false",
        "exabgp_daemon_pid": "",
        # No named-pipe CLI: our channel is the helper.
        "exabgp_api_cli": "false",
        "exabgp_api_ack": "true",
        "exabgp_api_encoder": "json",
        "exabgp_log_destination": "stdout",
        "exabgp_log_level": "INFO",
        "exabgp_log_short": "true",
        # Reconnect at once after a session reset.
        "exabgp_tcp_delay": "0",
    })
    return env
