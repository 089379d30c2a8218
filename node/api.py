"""The node's HTTP API (aiohttp): status, VIPs, operator actions, config objects, metrics.

Reads are open (the API listens on 127.0.0.1 by default); every write needs the bearer token
from the node's token file. A bad request changes nothing and gets a 4xx with the reason, in
JSON: ``{"error": "...", "problems": [...]}``.

VIP writes (PUT, DELETE) are serialised by one lock and check the whole VIP set the write would
produce with the same checks a reload runs (capacity included) before anything touches the
disk; files are written by temp file and rename, and a write the reload still rejects (the
directory changed by hand meanwhile) is rolled back. Bodies are parsed with bounds (size,
nesting, digits), so malformed JSON of any shape is a 400, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import stat
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from node import observe
from node.api_server import BODY_TIMEOUT, GUARD, MAX_BODY
from node.config import (
    MAX_INT_DIGITS,
    NAME_MAX,
    NAME_RE,
    ConfigError,
    Deadline,
    load_vip_file,
    load_vip_sources,
    parse_vip_object,
    validate_vip_set,
)
from node.controller import Controller
from node.files import atomic_write
from node.vip_reader import READ_BUDGET

API = "/api/v1"
CONTROLLER = web.AppKey("controller", Controller)
TOKEN = web.AppKey("token", str)
WRITE_LOCK = web.AppKey("write_lock", asyncio.Lock)
API_FILE_HEADER = "# Written by the maglev API; edits by hand are fine.\n"
MAX_JSON_DEPTH = 32  # a VIP object is 4 levels deep; deeper is malformed or hostile


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


def token_file_warnings(path: Path | None) -> list[str]:
    """A token every local user can read (or rewrite) lets any of them change the node's VIPs."""
    if path is None:
        return []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        return [f"api.token_file {path} is readable or writable by every local user (mode {mode:04o}): "
                f"anyone on this host can change the node's VIPs; chmod o-rw {path}"]
    return []


@web.middleware
async def guard_middleware(request: web.Request, handler):
    """No connection deadline while a request is being handled; the idle deadline after."""
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.request_started(request.transport)
    try:
        return await handler(request)
    finally:
        if guard is not None:
            guard.request_done(request.transport)


@web.middleware
async def body_middleware(request: web.Request, handler):
    """Read a body (after auth: no unauthenticated client gets a MAX_BODY buffer) within a time
    bound, so a client trickling bytes cannot hold a connection and a handler forever."""
    if request.can_read_body:
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                await request.read()  # cached for the handler; over MAX_BODY raises 413
        except TimeoutError:
            return error(408, f"request body not received within {BODY_TIMEOUT:g} s")
    return await handler(request)


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
    app = web.Application(middlewares=[guard_middleware, auth_middleware, body_middleware],
                          client_max_size=MAX_BODY)
    app[CONTROLLER] = controller
    app[TOKEN] = token
    app[WRITE_LOCK] = asyncio.Lock()
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
            web.get(f"{API}/fleet", get_fleet),
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


class BadJson(ValueError):
    pass


def parse_json_body(raw: bytes) -> Any:
    """JSON with bounds: no NaN/Infinity, no integer longer than MAX_INT_DIGITS, no nesting
    deeper than MAX_JSON_DEPTH. Any malformed body raises BadJson (a 400), whatever its shape."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant,
                          parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:
        raise BadJson(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError and our own bounds
        raise BadJson(str(exc)) from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise BadJson(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _depth(data: Any) -> int:
    """Nesting depth, iteratively (a recursive walk is what the limit protects against)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest


def bad_vip_name(name: str) -> web.Response | None:
    """The URL's name becomes a file name: check it before anything touches the disk."""
    if NAME_RE.fullmatch(name):
        return None
    return error(400, f"invalid VIP name {name[:80]!r}: 1-{NAME_MAX} characters of letters, digits, "
                      "'.', '_' or '-', starting with a letter or digit")


async def put_vip(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["name"]
    if (bad := bad_vip_name(name)) is not None:
        return bad
    if c.vip_source is not None:
        return _not_here(c)
    try:
        data = parse_json_body(await request.read())
    except BadJson as exc:
        return error(400, f"body is not valid JSON: {exc}; nothing was changed")
    if not isinstance(data, dict):
        return error(400, f"body must be a JSON object (one VIP), not {type(data).__name__}; nothing was changed")
    data.setdefault("name", name)
    if data["name"] != name:
        return error(400, f"body name {str(data['name'])[:80]!r} does not match the URL's {name!r}")
    source = f"PUT {API}/vips/{name}"
    target = c.vip_dir / f"{name}.yaml"
    async with request.app[WRITE_LOCK]:
        # Parsing and loading the directory can take a while on a big set: off the event loop.
        plan = await asyncio.to_thread(_plan_put, c, name, data, source, target)
        if isinstance(plan, web.Response):
            return plan
        vip, previous = plan
        try:
            atomic_write(target, _vip_yaml(vip))
        except OSError as exc:
            return error(500, f"cannot write {target}: {exc.strerror or exc} (a full disk, a read-only "
                              "directory?); nothing was changed")
        result = await c.reload(source)
        if not result.ok:
            try:
                _restore(target, previous)
            except OSError as exc:
                return error(500, f"the reload rejected the resulting VIP set and {target} could not be "
                                  f"rolled back ({exc.strerror or exc}): fix or remove it by hand; the node "
                                  "keeps serving its last good config", result.problems)
            await c.reload(f"{source} (rolled back)")
            return error(409, "the reload rejected the resulting VIP set (was the directory edited "
                              "meanwhile?); the write was rolled back, nothing was changed", result.problems)
    return web.json_response(c.vip_view(name), status=200 if previous is not None else 201, dumps=_dumps)


def _plan_put(c: Controller, name: str, data: dict, source: str,
              target: Path) -> web.Response | tuple[Any, bytes | None]:
    """Validate the VIP, then the whole set the write would produce (the other files as they
    are now, this file replaced) with a reload's checks. Returns (vip, previous file bytes) or
    the 4xx answer."""
    try:
        vip = parse_vip_object(data, source)
    except ConfigError as exc:
        return error(400, "invalid VIP object; nothing was changed", [str(p) for p in exc.problems])
    previous = None
    if target.exists() and not target.is_file():
        return error(409, f"{target} exists and is not a regular file; remove it by hand")
    if target.is_file():
        previous = target.read_bytes()
        refusal = _not_ours(target, name, previous)
        if refusal:
            return refusal
    try:
        others = load_vip_sources(c.vip_dir, Deadline(READ_BUDGET), skip=target)
    except ConfigError as exc:
        return error(409, "the VIP directory is invalid right now (a reload would reject it too); "
                          "fix it first, nothing was changed", [str(p) for p in exc.problems])
    if name in others:
        return error(409, f"VIP {name!r} is defined in {others[name][0]}; edit that file instead")
    found = [(str(path), v) for path, v in others.values()] + [(str(target), vip)]
    problems = validate_vip_set(found, c.config, source, c.fixed_table_capacity())
    if problems:
        return error(409, "the VIP set after this change would be rejected by a reload; nothing was changed",
                     [str(p) for p in problems])
    return vip, previous


def _not_ours(target: Path, name: str, raw: bytes) -> web.Response | None:
    """The API edits only <name>.yaml files that it wrote or that hold just that one VIP; a
    broken file it wrote is still its own (so it can always be deleted or replaced)."""
    if raw.startswith(API_FILE_HEADER.encode()):
        return None
    try:
        names = [v.name for v in load_vip_file(target)]
    except ConfigError as exc:
        return error(409, f"{target} was not written by the API and is invalid; fix or remove it by hand",
                     [str(p) for p in exc.problems])
    if any(n != name for n in names):
        return error(409, f"{target} also holds VIP(s) {', '.join(n for n in names if n != name)}; edit it by hand")
    return None


def _restore(target: Path, previous: bytes | None) -> None:
    if previous is None:
        target.unlink(missing_ok=True)
    else:
        atomic_write(target, previous.decode())


async def delete_vip(request: web.Request) -> web.Response:
    c = request.app[CONTROLLER]
    name = request.match_info["name"]
    if (bad := bad_vip_name(name)) is not None:
        return bad
    if c.vip_source is not None:
        return _not_here(c)
    source = f"DELETE {API}/vips/{name}"
    target = c.vip_dir / f"{name}.yaml"
    async with request.app[WRITE_LOCK]:
        # Only this one file is read: a broken file elsewhere must not make a VIP undeletable.
        refusal = await asyncio.to_thread(_check_delete, c, name, target)
        if refusal:
            return refusal
        try:
            target.unlink()
        except OSError as exc:
            return error(500, f"cannot delete {target}: {exc.strerror or exc}; nothing was changed")
        result = await c.reload(source)
    body: dict[str, Any] = {"deleted": name, "file": str(target),
                            "reload": {"ok": result.ok, "problems": result.problems}}
    if not result.ok:
        body["warning"] = ("the file is deleted, but the VIP directory is still invalid: the node keeps "
                           "serving its last good config until the problems listed are fixed")
    return web.json_response(body)


def _check_delete(c: Controller, name: str, target: Path) -> web.Response | None:
    if not target.is_file():
        if name in c.vips:
            return error(409, f"VIP {name!r} is defined in {c.vip_sources.get(name)}; edit that file instead")
        return error(404, f"no VIP named {name!r} (and no {target})")
    return _not_ours(target, name, target.read_bytes())


def _not_here(c: Controller) -> web.Response:
    """A fleet node's VIPs are etcd's: a file written here would be ignored, and a node that
    differs from the others breaks the fleet's one table per VIP."""
    return error(409, f"this node takes its VIPs from {c.vip_source.label}: change them for the "
                      "whole fleet with `maglev fleet apply FILE` / `maglev fleet delete NAME`; "
                      "nothing was changed")


async def get_fleet(request: web.Request) -> web.Response:
    """Every live node of the fleet and the VIPs whose digests differ (node/fleet/view.py)."""
    from node.fleet.etcd import EtcdError

    c = request.app[CONTROLLER]
    if c.vip_source is None:
        return error(404, "this node is not in a fleet (config_source: directory)")
    try:
        return web.json_response(await c.vip_source.view(), dumps=_dumps)
    except EtcdError as exc:
        return error(503, f"cannot read the fleet registry from etcd: {exc}")


def _vip_yaml(vip) -> str:
    data = vip.model_dump(mode="json", exclude_none=True)
    return API_FILE_HEADER + yaml.safe_dump({"vips": [data]}, sort_keys=False)


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
    async with request.app[WRITE_LOCK]:
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
