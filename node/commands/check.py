"""`maglev check --type TYPE --address ADDR [...]`: one health probe, for a human at a terminal.

It builds the same check object a VIP file would (so the same validation and defaults apply),
runs one probe and prints the verdict with its reason and latency. Exit 0 healthy, 1 unhealthy,
2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from typing import Any

from pydantic import TypeAdapter, ValidationError

from node.config import HealthCheck

TYPES = ("tcp", "http", "https", "udp", "dns", "exec")
# Option name -> (check field, types it applies to)
_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "path": ("path", ("http", "https")),
    "method": ("method", ("http", "https")),
    "host": ("host", ("http", "https")),
    "expect_status": ("expect_status", ("http", "https")),
    "body": ("body", ("http", "https")),
    "body_regex": ("body_regex", ("http", "https")),
    "payload": ("payload", ("udp",)),
    "expect": ("expect", ("udp",)),
    "query_name": ("query_name", ("dns",)),
    "query_type": ("query_type", ("dns",)),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="run one health probe against a backend and print the verdict",
        description="Run one probe of the given type. Exit 0 healthy, 1 unhealthy, 2 bad "
        "arguments. For exec, give the command after '--': "
        "maglev check --type exec --address 10.0.0.1 --port 80 -- /usr/local/bin/probe arg",
    )
    p.add_argument("--type", required=True, choices=TYPES)
    p.add_argument("--address", required=True, help="backend IPv4 or IPv6 address")
    p.add_argument("--port", type=int, help="port (default: 80 http, 443 https, 53 dns)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds (default 1)")
    http = p.add_argument_group("http / https")
    http.add_argument("--path", help="request path (default /)")
    http.add_argument("--method", help="request method (default GET)")
    http.add_argument("--host", help="Host header (and TLS name to verify)")
    http.add_argument("--expect-status", action="append", metavar="RANGE",
                      help="accepted status or range, e.g. 200 or 200-399; repeatable")
    http.add_argument("--body", help="text the body must contain")
    http.add_argument("--body-regex", help="regular expression the body must match")
    http.add_argument("--no-tls-verify", action="store_true", help="accept any TLS certificate")
    udp = p.add_argument_group("udp")
    udp.add_argument("--payload", help="datagram to send (text, or hex:..)")
    udp.add_argument("--expect", help="bytes the reply must contain (text, or hex:..)")
    dns = p.add_argument_group("dns")
    dns.add_argument("--query-name", help="name to ask for")
    dns.add_argument("--query-type", choices=("A", "AAAA"), help="default A")
    p.add_argument("command", nargs="*", help="exec: argv to run (after --), without a shell")
    p.set_defaults(func=run)


class ArgumentProblem(Exception):
    pass


def build_check(args: argparse.Namespace) -> dict[str, Any]:
    """The check object as a VIP file would hold it; refuses options of another type."""
    data: dict[str, Any] = {"type": args.type, "timeout": args.timeout}
    # One probe has no interval, but the model insists timeout < interval.
    data["interval"] = max(2.0, args.timeout * 2)
    for option, (field, types) in _FIELDS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if args.type not in types:
            raise ArgumentProblem(f"--{option.replace('_', '-')} does not apply to --type {args.type}")
        data[field] = value
    if args.no_tls_verify:
        if args.type != "https":
            raise ArgumentProblem(f"--no-tls-verify does not apply to --type {args.type}")
        data["tls_verify"] = False
    if args.type == "exec":
        if not args.command:
            raise ArgumentProblem("--type exec needs a command after '--'")
        data["command"] = args.command
    elif args.command:
        raise ArgumentProblem(f"unexpected arguments {args.command!r} (only --type exec takes a command)")
    if args.port is not None:
        data["port"] = args.port
    return data


def run(args: argparse.Namespace) -> int:
    # Imported here so `maglev --help` does not pay for aiohttp.
    from healthcheck import Target, probe

    try:
        address = ipaddress.ip_address(args.address)
    except ValueError:
        print(f"error: --address {args.address!r} is not an IPv4 or IPv6 address", file=sys.stderr)
        return 2
    try:
        check = TypeAdapter(HealthCheck).validate_python(build_check(args))
    except ArgumentProblem as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"][1:])
            where = f"--{field.replace('_', '-')}" if field else "check"
            msg = err["msg"].removeprefix("Value error, ")
            print(f"error: {where}: {msg}", file=sys.stderr)
        return 2
    target = Target(address, None, check)
    if target.probe_port is None and check.type in ("tcp", "udp"):
        print(f"error: --type {check.type} needs --port", file=sys.stderr)
        return 2
    result = asyncio.run(probe(target))
    verdict = "healthy" if result.ok else "unhealthy"
    print(f"{verdict}: {target.describe()}: {result.reason} ({result.latency * 1000:.1f} ms)")
    return 0 if result.ok else 1
