"""Just enough of the DNS wire format (RFC 1035) to ask one A/AAAA question and judge the reply.

A health check needs a query, the reply's id, flags, rcode and whether an answer of the asked type
is present: a hundred lines, not a resolver library.
"""

from __future__ import annotations

import struct

QTYPES = {"A": 1, "AAAA": 28}
CLASS_IN = 1
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_HEADER = struct.Struct("!HHHHHH")


class DnsFormatError(ValueError):
    """A reply we cannot parse; the probe reports it as a failure."""


def encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split("."):
        if not label:
            if name.strip(".") == "":
                break  # the root name
            raise ValueError(f"query name {name!r} has an empty label")
        raw = label.encode("idna") if not label.isascii() else label.encode()
        if len(raw) > 63:
            raise ValueError(f"query name {name!r}: label {label!r} is longer than 63 bytes")
        out += bytes([len(raw)]) + raw
    out += b"\0"
    if len(out) > 255:
        raise ValueError(f"query name {name!r} is longer than 255 bytes")
    return bytes(out)


def build_query(query_id: int, name: str, qtype: str) -> bytes:
    """A standard query with recursion desired (a recursive resolver backend needs RD)."""
    header = _HEADER.pack(query_id, 0x0100, 1, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", QTYPES[qtype], CLASS_IN)


def _skip_name(msg: bytes, pos: int) -> int:
    """Position after a (possibly compressed) name; a pointer ends the name in 2 bytes."""
    while True:
        if pos >= len(msg):
            raise DnsFormatError("name runs past the end of the reply")
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        if length & 0xC0:
            raise DnsFormatError("unsupported label type")
        pos += 1 + length
        if length == 0:
            return pos


def judge_reply(msg: bytes, query_id: int, qtype: str) -> tuple[bool, str]:
    """(healthy, reason) for a reply to our query."""
    if len(msg) < _HEADER.size:
        return False, "DNS reply too short"
    rid, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(msg)
    if rid != query_id or not flags & 0x8000:
        return False, "DNS reply does not match the query"
    rcode = flags & 0x000F
    if rcode != 0:
        return False, f"DNS {RCODES.get(rcode, f'rcode {rcode}')}"
    if flags & 0x0200:
        return False, "DNS reply truncated"
    try:
        pos = _HEADER.size
        for _ in range(qdcount):
            pos = _skip_name(msg, pos) + 4
        wanted = QTYPES[qtype]
        for _ in range(ancount):
            pos = _skip_name(msg, pos)
            rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", msg, pos)
            pos += 10 + rdlen
            if pos > len(msg):
                raise DnsFormatError("record runs past the end of the reply")
            if rtype == wanted:
                return True, f"DNS NOERROR, {ancount} answer(s)"
    except (struct.error, DnsFormatError) as exc:
        return False, f"DNS reply malformed: {exc}"
    return False, f"DNS NOERROR but no {qtype} answer"
