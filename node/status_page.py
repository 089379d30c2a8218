"""The node's status page at ``/``: one HTML document rendered on the server, in the spirit of
HAProxy's stats page.

Where the config comes from (the directory, or etcd: revision, stale, refused), every VIP with
its announce state and the reason, its backends with health, last check and latency, table
share against the expected share (bars), packet and flow rates, the conntrack fill, the BGP and
BFD sessions and the recent events. It refreshes itself with a meta refresh
(``?refresh=N`` seconds, 0 to stop): no script, no framework, and every asset comes from the
package, since a load balancer's management network rarely reaches a CDN. Read-only: writes
stay on the token API.
"""

from __future__ import annotations

import html
import time
from importlib import resources
from typing import Any

EVENTS_SHOWN = 30
DEFAULT_REFRESH = 5
ASSETS = {"status.css": "text/css"}


def asset(name: str) -> tuple[str, str]:
    """(text, content type) of a packaged asset."""
    kind = ASSETS[name]
    return resources.files("node").joinpath("static", name).read_text(), kind


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _si(value: float | None, unit: str = "") -> str:
    """1234567 -> '1.23 M': rates and totals an operator reads at a glance."""
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}".rstrip() if float(value).is_integer() else f"{value:.1f} {unit}".rstrip()


def _badge(ok: bool | None, yes: str, no: str, unknown: str = "UNKNOWN") -> str:
    cls, text = ("ok", yes) if ok else (("unknown", unknown) if ok is None else ("bad", no))
    return f'<span class="badge {cls}">{_e(text)}</span>'


def _announce_badge(v: dict[str, Any]) -> str:
    """announced / de-preferred / withdrawn (node.announce_policy)."""
    state = v.get("state") or ("announced" if v.get("announced") else "withdrawn")
    cls = {"announced": "ok", "depreferred": "warn"}.get(state, "bad")
    text = {"depreferred": "DE-PREFERRED"}.get(state, state.upper())
    return f'<span class="badge {cls} announce-state">{_e(text)}</span>'


def _bar(share: float, expected: float) -> str:
    """The table share as a bar, the expected share as a tick on the same scale."""
    width = max(0.0, min(1.0, share)) * 100
    tick = max(0.0, min(1.0, expected)) * 100
    return (f'<div class="bar" title="table {share:.1%}, expected {expected:.1%}">'
            f'<div class="fill" style="width:{width:.2f}%"></div>'
            f'<div class="tick" style="left:{tick:.2f}%"></div></div>'
            f'<span class="num">{share:.1%} / {expected:.1%}</span>')


def render(data: dict[str, Any], refresh: int = DEFAULT_REFRESH, rates: dict[str, Any] | None = None) -> str:
    """The whole page from the /api/v1/page data."""
    s = data["status"]
    rates = rates or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh > 0 else "",
        f"<title>maglev {_e(s['node_id'])}</title>",
        '<link rel="stylesheet" href="/status.css"></head><body>',
        _header(s, data),
        _sessions(s.get("bgp") or {}),
        *(_vip(v, rates.get(v["name"], {})) for v in data["vips"]),
        _events(s.get("recent_events") or []),
        f'<footer>maglev-lb · generated {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}'
        f'{f" · refreshes every {int(refresh)} s" if refresh > 0 else " · auto-refresh off"}'
        ' · JSON: <a href="/api/v1/page">/api/v1/page</a> · <a href="/metrics">/metrics</a></footer>',
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _header(s: dict[str, Any], data: dict[str, Any]) -> str:
    f = s["forwarder"]
    reload = s.get("last_reload") or {}
    rows = [
        ("forwarder", _badge(f["ok"], "OK", "FAILING") + f" {_e(f.get('mode'))} on {_e(', '.join(f['interfaces']))}: "
         f"{_e(f.get('error') or f['last_self_test']['reason'])}"),
        ("warm-up", "over" if s["warmup_over"] else "in progress (nothing announced yet)"),
        ("node", _badge(not s["node_drained"], "IN SERVICE", "DRAINED")),
        ("disable file", _disable(s.get("disable") or {})),
        ("config source", _config_source(s.get("config_source") or {})),
        ("last reload", (_badge(reload.get("ok"), "OK", "FAILED") + " " + _e(reload.get("source", ""))
                         + (": " + _e("; ".join(reload.get("problems") or [])) if reload.get("problems") else ""))
         if reload else "none"),
    ]
    ct = data.get("conntrack")
    if ct:
        fill = ct["entries"] / ct["capacity"] if ct["capacity"] else 0.0
        rows.append(("conntrack", f'<div class="bar ct"><div class="fill{" warn" if fill > 0.8 else ""}" '
                     f'style="width:{fill * 100:.2f}%"></div></div><span class="num">{ct["entries"]} of '
                     f'{ct["capacity"]} ({fill:.1%}, {_e(data.get("conntrack_design"))})</span>'))
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<header><h1>maglev node <span class="node">{_e(s["node_id"])}</span></h1>'
            f'<span class="uptime">up {_e(s["uptime"])} s</span></header>'
            f'<table class="summary" id="summary">{body}</table>')


def _disable(d: dict[str, Any]) -> str:
    if d.get("active"):
        what = "every VIP de-preferred" if d.get("action") == "deprefer" else "every VIP withdrawn"
        return (f'<span class="badge warn" id="disabled">DISABLED</span> {_e(d.get("path"))} present '
                f'({_e(what)}; remove it to announce again)')
    return f'absent ({_e(d.get("path"))})' + (f' · {_e(d["error"])}' if d.get("error") else "")


def _config_source(src: dict[str, Any]) -> str:
    """Where the VIPs come from: the directory, or etcd with the revision served, whether etcd
    answers (stale: the last good config keeps serving), a revision this node refused."""
    if src.get("type") != "etcd":
        return f'directory {_e(src.get("dir"))}'
    text = (f'etcd {_e(src.get("endpoint"))} {_e(src.get("prefix"))} · revision '
            f'<span id="config-revision">{_e(src.get("revision"))}</span> ')
    if src.get("stale"):
        text += (f'<span class="badge warn" id="config-stale">STALE</span> for {_e(src.get("stale_for"))} s '
                 f'({_e(src.get("stale_reason"))}): serving the last good config, nothing withdrawn for it')
    else:
        text += '<span class="badge ok" id="config-stale">FRESH</span>'
    if src.get("served_from_cache"):
        text += " · served from the local cache"
    rejected = src.get("rejected")
    if rejected:
        text += (f' · <span class="badge bad">REFUSED</span> revision {_e(rejected.get("revision"))}: '
                 f'{_e("; ".join(rejected.get("problems") or []))} (fix it with `maglev fleet apply`)')
    return text


def _sessions(bgp: dict[str, Any]) -> str:
    sessions = bgp.get("sessions") or {}
    bfd = bgp.get("bfd") or {}
    bfd_peers = bfd.get("peers") or {} if bfd.get("enabled") else {}
    rows = []
    for peer, info in sorted(sessions.items()):
        state = info.get("state")
        b = bfd_peers.get(peer)
        rows.append(
            f'<tr><td>{_e(peer)}</td><td>{_badge(state == "established", str(state).upper(), str(state).upper())}</td>'
            f'<td>{_badge(b.get("status") == "up", "UP", str(b.get("status")).upper()) if b else "-"}</td>'
            f'<td>{_e(info.get("last_error") or "")}</td></tr>')
    head = (f'<h2>BGP sessions</h2><p class="meta">ExaBGP {_badge(bgp.get("healthy"), "RUNNING", "FAILING")} '
            f'restarts {_e(bgp.get("restarts", 0))} · announced {_e(", ".join(bgp.get("announced") or []) or "none")}'
            + (f' · bfdd restarts {_e(bfd.get("restarts", 0))}' if bfd.get("enabled") else "") + "</p>")
    table = ('<table class="grid" id="sessions"><tr><th>peer</th><th>BGP</th><th>BFD</th><th>last error</th></tr>'
             + "".join(rows) + "</table>") if rows else "<p>no BGP peers configured</p>"
    return f"<section>{head}{table}</section>"


def _vip(v: dict[str, Any], rates: dict[str, Any]) -> str:
    c = v.get("counters") or {}
    head = (f'<h2 id="vip-{_e(v["name"])}">VIP {_e(v["name"])} '
            f'{_announce_badge(v)}'
            + (' <span class="badge warn">FALLBACK POOL</span>' if v.get("fallback_in_use") else "") + '</h2>'
            f'<p class="meta">{_e(v["protocol"])} {_e(v["address"])} port {_e(v["port"] or "all")} · '
            f'table {_e(v["table_size"])} digest <code>{_e(v["digest"])}</code> · {_e(v["reason"])}'
            + (f' · health checks {_e(v["health_path"])}' if v.get("health_path") else "") + '<br>'
            f'packets {_si(c.get("packets"))} ({_si(rates.get("packets"), "pps")}) · '
            f'bytes {_si(c.get("bytes"), "B")} ({_si(_bits(rates.get("bytes")), "bit/s")}) · '
            f'new flows {_si(c.get("new_flows"))} ({_si(rates.get("new_flows"), "/s")}) · '
            f'conntrack hits {_si(c.get("ct_hits"))}</p>')
    rows = []
    backend_rates = rates.get("backends") or {}
    for b in v["backends"]:
        bc = b.get("counters") or {}
        br = backend_rates.get(b["key"], {})
        health = b["health"]
        latency = b.get("last_latency")
        rows.append(
            f'<tr class="backend {_e(health)}"><td>{_e(b["key"])}{" (fallback)" if b.get("fallback") else ""}</td><td>{_e(b["state"])}</td>'
            f'<td>{_badge(True if health == "up" else (None if health == "unknown" else False), "UP", "DOWN")}</td>'
            f'<td>{_e(b.get("last_reason") or "")}</td>'
            f'<td class="r">{"-" if latency is None else f"{latency * 1000:.1f} ms"}</td>'
            f'<td class="r">{_e(b["weight"])}</td><td class="share">{_bar(b["table_share"], b["expected_share"])}</td>'
            f'<td class="r">{_si(bc.get("packets"))}</td><td class="r">{_si(br.get("packets"), "pps")}</td>'
            f'<td class="r">{_si(bc.get("new_flows"))}</td><td class="r">{_si(bc.get("ct_hits"))}</td></tr>')
    table = ('<table class="grid backends"><tr><th>backend</th><th>admin</th><th>health</th><th>last check</th>'
             '<th>latency</th><th>weight</th><th>table share / expected</th><th>packets</th><th>rate</th>'
             '<th>new flows</th><th>ct hits</th></tr>' + "".join(rows) + "</table>")
    return f'<section class="vip">{head}{table}</section>'


def _bits(byte_rate: float | None) -> float | None:
    return None if byte_rate is None else byte_rate * 8


def _events(events: list[dict[str, Any]]) -> str:
    rows = []
    for e in reversed(events[-EVENTS_SHOWN:]):
        stamp = time.strftime("%H:%M:%S", time.gmtime(e.get("ts", 0)))
        rows.append(f'<tr class="{_e(e.get("level"))}"><td>{stamp}</td><td>{_e(e.get("level"))}</td>'
                    f'<td>{_e(e.get("event"))}</td><td>{_e(e.get("msg"))}</td></tr>')
    return ('<section><h2>Recent events</h2><table class="grid events" id="events">'
            '<tr><th>time (UTC)</th><th>level</th><th>event</th><th>what happened</th></tr>'
            + "".join(rows) + "</table></section>")
