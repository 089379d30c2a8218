"""`maglev trace`: which backend a new flow goes to, computed exactly as the data path does.

The flow hash and the table index come from the forwarder's reference model (the same functions
the differential tests hold equal to the BPF program), applied to the table the controller
programmed. A flow already in connection tracking stays on its backend even if this says
otherwise; the answer says so.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from node.forwarder.model import Flow, flow_hash, table_index


class TraceError(ValueError):
    pass


def parse_source(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """'10.0.0.2:40000' or '[fd00::2]:40000' -> (address, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        raise TraceError(f"source {text!r} must be IP:PORT (IPv6 as [ADDR]:PORT)")
    host = host.removeprefix("[").removesuffix("]")
    try:
        addr = ipaddress.ip_address(host)
        sport = int(port)
    except ValueError:
        raise TraceError(f"source {text!r} must be IP:PORT (IPv6 as [ADDR]:PORT)") from None
    if not 0 <= sport <= 65535:
        raise TraceError(f"source port {sport} must be 0-65535")
    return addr, sport


def trace_flow(controller: Any, name: str, source: str, dst_port: str | None) -> dict[str, Any]:
    vip = controller.vips[name]
    addr, sport = parse_source(source)
    if addr.version != vip.address.version:
        raise TraceError(f"source {addr} is IPv{addr.version} but VIP {name} is IPv{vip.address.version}")
    if dst_port is not None:
        try:
            dport = int(dst_port)
        except ValueError:
            raise TraceError(f"dst_port {dst_port!r} is not a port number") from None
    elif isinstance(vip.port, int):
        dport = vip.port
    else:
        raise TraceError(f"VIP {name} serves all ports: give the destination port (dst_port)")
    decision = controller.desired.vips.get(name) if controller.desired else None
    table = decision.table if decision else None
    flow = Flow.of(addr, vip.address, sport, dport, vip.protocol)
    h = flow_hash(flow)
    result: dict[str, Any] = {
        "vip": name,
        "flow": f"{vip.protocol} {_hostport(addr, sport)} -> {_hostport(vip.address, dport)}",
        "hash": h,
        "table_size": vip.table_size,
        "digest": table.digest() if table else None,
        "note": "a flow already in connection tracking keeps its backend while that backend is in service",
    }
    if table is None or not table.backends:
        result.update(index=None, backend=None,
                      note="no table programmed (warming up or no serving backend): new flows are dropped")
        return result
    index = table_index(h, table.size)
    backend = table.backends[table.entries[index]]
    live = live_backend(controller.forwarder, name, index)
    result.update(index=index, backend=backend, live_backend=live)
    if live is not None and live != backend:
        result["note"] = (f"the kernel's live table says {live} but the controller computed {backend}: "
                          "the forwarder has not been programmed with this table yet, or is out of sync")
    return result


def live_backend(forwarder: Any, vip: str, index: int) -> str | None:
    """The backend at `index` of the table the kernel is using now (read back from the map), or
    None when the forwarder cannot tell (not programmed, or a forwarder without read-back)."""
    try:
        ids = forwarder.table_ids(forwarder.vip_id(vip))
        by_id = {bid: key for (v, key), bid in forwarder.backend_ids.items() if v == vip}
        return by_id.get(ids[index]) if index < len(ids) else None
    except (AttributeError, KeyError, IndexError, OSError):
        return None


def _hostport(addr, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"
