"""The node's HTTP API (aiohttp): status, VIPs, operator actions, config objects, metrics.

Reads are open (the API listens on 127.0.0.1 by default); every write needs the bearer token
from the node's token file. A bad request changes nothing and gets a 4xx with the reason, in
JSON: ``{"error": "...", "problems": [...]}``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from node import observe
from node.config import ConfigError, check_vip_set, load_vip_sources, parse_vip_object
from node.controller import Controller, atomic_write

API = "/api/v1"
CONTROLLER = web.AppKey("controller", Controller)
TOKEN = web.AppKey("token", str)


def error(status: int, message: str, problems: list[str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if problems:
        body["problems"] = problems
    return web.json_response(body, status=status)


def read_token(path: Path | None) -> str:
    if path is None:
        return ""
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


@web.middleware
async def auth_middleware(request: web.Request, handler):
    if request.method in ("GET", "HEAD"):
        return await handler(request)
    expected = request.app[TOKEN]
    if not expected:
        return error(403, "writes are disabled on this node: set api.token_file in the node file")
    given = request.headers.get("Authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip(), expected):
        return web.json_response(
            {"error": "missing or wrong bearer token (Authorization: Bearer <token from api.token_file>)"},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return await handler(request)


def make_app(controller: Controller, token: str) -> web.Application:
    app = web.Application(middlewares=[auth_middleware])
    app[CONTROLLER] = controller
    app[TOKEN] = token
    app.add_routes(
        [
            web.get(f"{API}/status", get_status),
            web.get(f"{API}/vips", get_vips),
            web.get(f"{API}/vips/{{name}}", get_vip),
            web.get(f"{API}/vips/{{name}}/trace", get_trace),
            web.put(f"{API}/vips/{{name}}", put_vip),
            web.delete(f"{API}/vips/{{name}}", delete_vip),
            web.post(f"{API}/vips/{{name}}/backends/{{backend}}/{{action}}", post_backend_action),
            web.post(f"{API}/node/{{action}}", post_node_action),
            web.post(f"{API}/reload", post_reload),
        ]
    )
    observe.register(app, controller)  # read-only: /metrics, the status page at /, events, conntrack
    return app


async def _counters(c: Controller) -> dict[str, Any]:
    try:
        return await asyncio.to_thread(c.forwarder.counters)
    except Exception as exc:  # counters are best effort: the rest of the view still helps
        c.events.emit("counters_failed", f"reading forwarder counters failed: {exc}", level="warning")
        return {}


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTROLLER].status(), dumps=_dumps)


async def get_vips(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    counters = await _counters(c)
    return web.json_response({"vips": [c.vip_view(n, counters) for n in sorted(c.vips)]}, dumps=_dumps)


async def get_vip(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["name"]
    if name not in c.vips:
        return error(404, f"no VIP named {name!r} (known: {', '.join(sorted(c.vips)) or 'none'})")
    return web.json_response(c.vip_view(name, await _counters(c)), dumps=_dumps)


async def get_trace(request: web.Request) -> web.Response:
    """Which backend a new flow from SRC goes to, by the same hash and table as the data path."""
    from node.trace import TraceError, trace_flow

    c = request.app[CONTROLLER]
    name = request.match_info["name"]
    if name not in c.vips:
        return error(404, f"no VIP named {name!r}")
    try:
        result = trace_flow(c, name, request.query.get("src", ""), request.query.get("dst_port"))
    except TraceError as exc:
        return error(400, str(exc))
    return web.json_response(result, dumps=_dumps)


async def put_vip(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["name"]
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error(400, f"body is not valid JSON: {exc}")
    if isinstance(data, dict):
        data.setdefault("name", name)
        if data["name"] != name:
            return error(400, f"body name {data['name']!r} does not match the URL's {name!r}")
    source = f"PUT {API}/vips/{name}"
    try:
        vip = parse_vip_object(data, source)
    except ConfigError as exc:
        return error(400, "invalid VIP object; nothing was changed", [str(p) for p in exc.problems])
    target = c.vip_dir / f"{name}.yaml"
    conflict, found = _own_file_check(c, name, target)
    if conflict:
        return conflict
    found.append((source, vip))
    problems = check_vip_set(found)
    if problems:
        return error(409, "VIP conflicts with the current configuration; nothing was changed",
                     [str(p) for p in problems])
    existed = target.exists()
    atomic_write(target, _vip_yaml(vip))
    result = await c.reload(source)
    if not result.ok:
        return error(500, "written but the reload failed", result.problems)
    return web.json_response(c.vip_view(name), status=200 if existed else 201, dumps=_dumps)


async def delete_vip(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["name"]
    if name not in c.vips:
        return error(404, f"no VIP named {name!r}")
    target = c.vip_dir / f"{name}.yaml"
    conflict, _ = _own_file_check(c, name, target)
    if conflict:
        return conflict
    target.unlink()
    result = await c.reload(f"DELETE {API}/vips/{name}")
    if not result.ok:
        return error(500, "deleted but the reload failed", result.problems)
    return web.json_response({"deleted": name})


def _own_file_check(c: Controller, name: str, target: Path) -> tuple[web.Response | None, list]:
    """The API only edits files it owns: <vip_dir>/<name>.yaml holding that one VIP. Returns the
    other VIPs (source, vip) for the duplicate check."""
    try:
        sources = load_vip_sources(c.vip_dir)
    except ConfigError as exc:
        return error(409, "the VIP directory is invalid right now; fix it first", [str(p) for p in exc.problems]), []
    current = sources.get(name)
    if current and current[0].resolve() != target.resolve():
        return error(409, f"VIP {name!r} is defined in {current[0]}; edit that file instead"), []
    in_target = [n for n, (p, _) in sources.items() if p.resolve() == target.resolve() and n != name]
    if in_target:
        return error(409, f"{target} also holds VIP(s) {', '.join(in_target)}; edit it by hand"), []
    others = [(str(p), v) for n, (p, v) in sources.items() if n != name]
    return None, others


def _vip_yaml(vip) -> str:
    data = vip.model_dump(mode="json", exclude_none=True)
    return "# Written by the maglev API; edits by hand are fine.\n" + yaml.safe_dump({"vips": [data]}, sort_keys=False)


async def post_backend_action(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name, backend, action = (request.match_info[k] for k in ("name", "backend", "action"))
    if action not in ("drain", "undrain", "disable", "enable"):
        return error(400, f"unknown action {action!r}: use drain, undrain, disable or enable")
    if name not in c.vips:
        return error(404, f"no VIP named {name!r}")
    vip = c.vips[name]
    match = next((b for b in vip.backends if b.key == backend or str(b.address) == backend), None)
    if match is None:
        keys = ", ".join(b.key for b in vip.backends)
        return error(404, f"VIP {name!r} has no backend {backend!r} (backends: {keys})")
    if action == "drain":
        state = "drain"
    elif action == "disable":
        state = "disabled"
    else:  # back to serving; no override needed when the config already says active
        state = None if match.state == "active" else "active"
    c.set_backend_state(name, match.key, state)
    await c.reconcile()
    return web.json_response(c.vip_view(name), dumps=_dumps)


async def post_node_action(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    action = request.match_info["action"]
    if action not in ("drain", "undrain"):
        return error(400, f"unknown node action {action!r}: use drain or undrain")
    c.set_node_drained(action == "drain")
    await c.reconcile()
    return web.json_response(c.status(), dumps=_dumps)


async def post_reload(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    result = await c.reload(f"POST {API}/reload")
    return web.json_response(result.__dict__, status=200 if result.ok else 400, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_default)


def _default(obj: Any) -> Any:
    if isinstance(obj, (ipaddress.IPv4Address, ipaddress.IPv6Address, Path)):
        return str(obj)
    if hasattr(obj, "__dict__"):
        return obj.__dict__
    if hasattr(obj, "name"):
        return obj.name
    return str(obj)
