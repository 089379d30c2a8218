"""`maglev node --config NODE.yaml`: run a load-balancer node until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from node import logs, sd_notify
from node.config import ConfigError, load_node_file

log = logging.getLogger("maglev.node")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "node",
        help="run a node: health checks, forwarder, BGP, HTTP API",
        description="Runs until SIGTERM/SIGINT (graceful: withdraw, wait, stop). SIGHUP reloads "
        "the VIP directory.",
    )
    p.add_argument("--config", "-c", type=Path, required=True, metavar="NODE.yaml")
    p.add_argument("--log-format", choices=logs.FORMATS, default=None,
                   help="text or json lines on stderr (default: the node file's log_format)")
    p.add_argument("--log-level", choices=logs.LEVELS, default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Configured before the node file is read, so even its errors come out in the chosen format.
    logs.configure(args.log_format or "text", args.log_level)
    try:
        config = load_node_file(args.config)
    except ConfigError as exc:
        _config_error(exc)
        return 2
    if args.log_format is None and config.log_format != "text":
        logs.configure(config.log_format, args.log_level)
    return asyncio.run(serve(config, args.config.resolve().parent))


def _config_error(exc: ConfigError) -> None:
    for p in exc.problems:
        log.error("%s", p, extra=logs.event("config_invalid", file=p.file, field=p.field))


async def serve(config, base_dir: Path) -> int:
    from node.api import make_app, read_token, token_file_warnings
    from node.api_server import FileLimitError, api_connection_cap, reserve_file_handles, start_api
    from node.runtime import build_controller
    from node.vip_source import source_label

    try:
        file_limit = reserve_file_handles()
    except FileLimitError as exc:
        log.error("%s", exc, extra=logs.event("file_limit_too_low"))
        return 2
    token_path = _resolve(config.api.token_file, base_dir)
    try:
        token = read_token(token_path)
        token_warnings = token_file_warnings(token_path)
    except (OSError, ValueError) as exc:
        log.error("api.token_file: %s", exc, extra=logs.event("config_invalid", field="api.token_file"))
        return 2
    # Tables are built and written, and the forwarder self-tested, in worker threads that make
    # many short calls into C and the kernel, each giving the GIL up; the default 5 ms switch
    # interval would let the busy event loop keep it 5 ms per call (1000 VIPs: seconds).
    sys.setswitchinterval(0.0005)
    try:
        controller = build_controller(config, base_dir)
    except ValueError as exc:  # a file the node file names cannot be used (etcd's password, TLS)
        log.error("%s", exc, extra=logs.event("config_invalid"))
        return 2
    for warning in token_warnings:
        controller.events.emit("token_file_unsafe", warning, level="warning")
    try:
        await controller.start()
    except ConfigError as exc:
        _config_error(exc)
        log.error("the VIP set (%s) is invalid at start; fix it and start again", source_label(controller),
                  extra=logs.event("node_failed"))
        await _abort(controller)
        return 2
    except Exception as exc:
        log.error("node failed to start: %s", exc, exc_info=exc, extra=logs.event("node_failed"))
        await _abort(controller)
        return 1

    # Everything loaded at start is long-lived: keep it out of the collector's full passes,
    # whose pauses would otherwise make health probes late on a big pool.
    gc.freeze()
    cap = api_connection_cap(file_limit)
    api = await start_api(make_app(controller, token), config.api.listen, config.api.port, cap,
                          on_error=lambda msg: controller.events.emit("api_accept_failed", msg, level="error"))
    controller.events.emit("api_listening", f"HTTP API on {config.api.listen}:{config.api.port} "
                           f"(at most {cap} connections; open-file limit {file_limit})")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, controller.request_reload)
    spawn_systemd_tasks(controller)
    await stop.wait()
    sd_notify.notify("STOPPING=1")
    await api.close()
    await controller.stop()
    return 0


def spawn_systemd_tasks(controller) -> None:
    """READY and the watchdog pings run under the controller's supervisor like every other
    background task: a crash is reported and the task started again (a dead ping task would
    get a healthy node restarted by systemd, silently). Both are ``once``: READY is sent once,
    and the watchdog returns on purpose when a controller loop stops, to stop the pings.
    controller.stop() ends them with the rest."""
    controller.supervisor.spawn("systemd-ready", lambda: _ready_when_reconciled(controller), once=True)
    if (interval := sd_notify.watchdog_interval()) is not None:
        controller.supervisor.spawn("systemd-watchdog", lambda: sd_notify.watchdog(interval, controller.alive),
                                    once=True)


async def _ready_when_reconciled(controller) -> None:
    """READY=1 once the controller has decided (and applied) what to announce."""
    await controller.reconciled.wait()
    if sd_notify.notify(f"READY=1\nSTATUS=node {controller.config.node_id}: reconciled, {len(controller.vips)} VIP(s)"):
        log.info("told systemd the node is ready", extra=logs.event("systemd_ready"))


async def _abort(controller) -> None:
    try:
        await controller.speaker.stop(graceful=False)
        await controller.health.stop()
        controller.forwarder.detach()
        controller.forwarder.close()
    except Exception:
        pass


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    return path if path.is_absolute() else base / path
