"""Targets (identity, ports, de-duplication), the DNS wire format, and the check command's
argument handling, without any network."""

from __future__ import annotations

import argparse
import ipaddress
import struct

import pytest
from pydantic import TypeAdapter

from healthcheck import Target
from healthcheck import dns
from healthcheck.monitor import first_offset
from healthcheck.probes import decode_bytes_option, status_ok
from node.commands.check import ArgumentProblem, build_check
from node.config import HealthCheck

_checks = TypeAdapter(HealthCheck)
A = ipaddress.ip_address("10.0.0.1")


def check(**data: object):
    return _checks.validate_python(data)


def test_identical_targets_are_equal_and_hash_alike():
    a = Target(A, 80, check(type="http", path="/h", expect_status=["200"]))
    b = Target(A, 80, check(type="http", path="/h", expect_status=["200"]))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1


def test_check_port_overrides_the_backend_port_and_dedups():
    # Two VIPs (ports 80 and 443) checking the same backend on 8080 probe one thing.
    a = Target(A, 80, check(type="tcp", port=8080))
    b = Target(A, 443, check(type="tcp", port=8080))
    assert a.probe_port == b.probe_port == 8080
    assert a == b and len({a, b}) == 1


def test_different_checks_or_ports_are_different_targets():
    base = Target(A, 80, check(type="tcp"))
    assert base != Target(A, 81, check(type="tcp"))
    assert base != Target(A, 80, check(type="tcp", rise=3))
    assert base != Target(ipaddress.ip_address("10.0.0.2"), 80, check(type="tcp"))


def test_default_ports():
    assert Target(A, None, check(type="https")).probe_port == 443
    assert Target(A, None, check(type="dns", query_name="x.test")).probe_port == 53
    assert Target(A, None, check(type="tcp")).probe_port is None


def test_describe_names_the_backend_and_check():
    t = Target(ipaddress.ip_address("2001:db8::1"), 80, check(type="http", path="/healthz"))
    assert t.describe() == "[2001:db8::1]:80 (http /healthz)"


def test_first_offset_is_stable_and_inside_the_interval():
    offsets = [first_offset(Target(A, p, check(type="tcp", interval=1.0, timeout=0.5))) for p in range(1, 501)]
    assert offsets == [first_offset(Target(A, p, check(type="tcp", interval=1.0, timeout=0.5))) for p in range(1, 501)]
    assert all(0 <= o < 1.0 for o in offsets)
    # Spread: every tenth of the interval holds some of the 500 targets, none holds a burst.
    buckets = [0] * 10
    for o in offsets:
        buckets[int(o * 10)] += 1
    assert min(buckets) > 25 and max(buckets) < 80


def test_status_ranges_and_payloads():
    assert status_ok(204, [(200, 299)]) and not status_ok(503, [(200, 399)])
    assert decode_bytes_option("hex:00ff") == b"\x00\xff"
    assert decode_bytes_option("ping") == b"ping"


def test_dns_query_layout():
    q = dns.build_query(0x1234, "www.example.test", "AAAA")
    assert q[:12] == struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    assert q[12:] == b"\x03www\x07example\x04test\x00" + struct.pack("!HH", 28, 1)


def test_dns_rejects_bad_names():
    with pytest.raises(ValueError, match="longer than 63"):
        dns.encode_name("a" * 64 + ".test")
    with pytest.raises(ValueError, match="empty label"):
        dns.encode_name("a..test")


def _reply(qid: int, rcode: int, answers: list[tuple[int, bytes]], flags: int = 0x8180) -> bytes:
    question = dns.encode_name("ok.test") + struct.pack("!HH", 1, 1)
    out = struct.pack("!HHHHHH", qid, flags | rcode, 1, len(answers), 0, 0) + question
    for rtype, rdata in answers:
        out += b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata
    return out


def test_dns_judge_reply():
    assert dns.judge_reply(_reply(7, 0, [(1, bytes([127, 0, 0, 1]))]), 7, "A")[0]
    # A CNAME then the A record: still healthy.
    assert dns.judge_reply(_reply(7, 0, [(5, b"\xc0\x0c"), (1, b"\x7f\0\0\1")]), 7, "A")[0]
    assert dns.judge_reply(_reply(7, 3, []), 7, "A") == (False, "DNS NXDOMAIN")
    assert dns.judge_reply(_reply(7, 2, []), 7, "A") == (False, "DNS SERVFAIL")
    assert dns.judge_reply(_reply(7, 0, []), 7, "A") == (False, "DNS NOERROR but no A answer")
    assert dns.judge_reply(_reply(7, 0, [(1, b"\x7f\0\0\1")]), 7, "AAAA")[1] == "DNS NOERROR but no AAAA answer"
    assert dns.judge_reply(_reply(8, 0, [(1, b"\x7f\0\0\1")]), 7, "A") == (False, "DNS reply does not match the query")
    assert not dns.judge_reply(_reply(7, 0, [(1, b"\x7f\0\0\1")])[:-3], 7, "A")[0]
    assert not dns.judge_reply(b"\0\7", 7, "A")[0]


def _args(**kw: object) -> argparse.Namespace:
    base = dict(type="tcp", timeout=1.0, port=None, path=None, method=None, host=None,
                expect_status=None, body=None, body_regex=None, no_tls_verify=False,
                payload=None, expect=None, query_name=None, query_type=None, command=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_check_command_builds_the_config_object():
    data = build_check(_args(type="https", path="/h", no_tls_verify=True, expect_status=["200"], port=8443))
    assert data == {"type": "https", "timeout": 1.0, "interval": 2.0, "path": "/h",
                    "expect_status": ["200"], "tls_verify": False, "port": 8443}
    check(**data)  # and the model accepts it


def test_check_command_refuses_options_of_another_type():
    with pytest.raises(ArgumentProblem, match="--path does not apply to --type tcp"):
        build_check(_args(path="/x"))
    with pytest.raises(ArgumentProblem, match="needs a command"):
        build_check(_args(type="exec"))
    with pytest.raises(ArgumentProblem, match="only --type exec"):
        build_check(_args(command=["true"]))
