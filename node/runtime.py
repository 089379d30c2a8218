"""Wires the real components into a Controller (the unit tests wire fakes instead)."""

from __future__ import annotations

from pathlib import Path

from node.config import NodeConfig
from node.controller import Controller
from node.dirs import node_dirs
from node.events import EventLog
from node.vip_source import make_source


def build_controller(config: NodeConfig, base_dir: Path) -> Controller:
    from bgp import BgpSpeaker
    from healthcheck import HealthMonitor
    from node.forwarder.hc_tunnel import HealthTunnel
    from node.forwarder.loader import Forwarder

    dirs = node_dirs(config, base_dir)
    run_dir = dirs.run
    events = EventLog()
    controller_ref: list[Controller] = []
    # etcd's last good VIP set lives with the operator's state: it must survive a reboot.
    vip_source = make_source(config, dirs.state, base_dir, events)

    def on_bgp_change() -> None:
        if controller_ref:
            controller_ref[0].mark_dirty()

    def on_probe(*probe) -> None:  # every probe feeds the latency histogram and verdict counts
        if controller_ref:
            controller_ref[0].metrics.on_probe(*probe)

    # With bgp.bfd enabled the speaker also runs bfdd (own files in run_dir/bfd, owned by frr).
    # ExaBGP's and bfdd's own output go to size-bounded files in the logs directory.
    speaker = BgpSpeaker(config.bgp, run_dir / "bgp", on_change=on_bgp_change, bfd_dir=run_dir / "bfd",
                         log_dir=dirs.logs)
    # Tunnel health checks (health_check.via: tunnel): the probes' marks and GRE (hc_tunnel.py).
    tunnel = HealthTunnel.from_config(config.forwarder)
    controller = Controller(
        config,
        health_factory=lambda cb: HealthMonitor(on_transition=cb, on_probe=on_probe, tunnel=tunnel),
        tunnel=tunnel,
        speaker=speaker,
        forwarder=Forwarder(config.forwarder, table_capacity=config.forwarder.table_capacity),
        events=events,
        base_dir=base_dir,
        vip_source=vip_source,
    )
    controller_ref.append(controller)
    return controller
