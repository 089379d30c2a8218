"""`maglev backend setup|teardown|status`: make this host a DSR backend of the load balancer.

Run on each backend (as root). See node/forwarder/backend.py for what each step is for.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from node.forwarder import tc
from node.forwarder.build import BuildError
from node.forwarder.backend import (
    DEFAULT_BPFFS,
    DEFAULT_STATE_DIR,
    BackendOptions,
    BackendSetupError,
    decap_metrics,
    setup,
    status,
    teardown,
)


def _vip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backend",
        help="set up or tear down this host as a DSR backend (VIPs on lo, ARP sysctls, GRE decap)",
        description="Prepare a backend for direct server return: VIPs on lo, arp_ignore/"
        "arp_announce/rp_filter, and GRE decapsulation (tc-BPF, or a kernel gre/ip6gre device).",
    )
    bsub = p.add_subparsers(dest="backend_command", metavar="ACTION", required=True)

    s = bsub.add_parser("setup", help="serve the given VIPs (idempotent: the list replaces the last one)")
    s.add_argument("--vip", action="append", type=_vip, required=True, metavar="ADDR",
                   help="a VIP this backend serves; repeat for more")
    _common(s)
    s.add_argument("--decap", choices=("bpf", "kernel"), default="bpf",
                   help="bpf: tc-BPF program (kernels without GRE); kernel: gre/ip6gre devices")
    s.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    s.set_defaults(func=run_setup)

    t = bsub.add_parser("teardown", help="undo setup (only the given VIPs with --vip)")
    t.add_argument("--vip", action="append", type=_vip, metavar="ADDR",
                   help="stop serving only this VIP; repeat for more")
    _common(t)
    t.set_defaults(func=run_teardown)

    st = bsub.add_parser("status", help="show the decap program, its VIPs and counters")
    _common(st)
    st.add_argument("--metrics", action="store_true",
                    help="print the counters in the Prometheus text format instead")
    st.set_defaults(func=run_status)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", required=True, metavar="IF", help="interface the GRE packets arrive on")
    p.add_argument("--bpffs", type=Path, default=DEFAULT_BPFFS, metavar="DIR",
                   help=f"directory on a bpffs for the decap maps' pins (default {DEFAULT_BPFFS})")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"where setup records what to undo (default {DEFAULT_STATE_DIR})")


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def run_setup(args: argparse.Namespace) -> int:
    opts = BackendOptions(
        interface=args.interface, vips=tuple(dict.fromkeys(args.vip)), decap=args.decap,
        bpffs=args.bpffs, state_dir=args.state_dir,
    )
    try:
        setup(opts, dry_run=args.dry_run)
    except (BackendSetupError, tc.BpfError, BuildError) as exc:
        return _fail(exc)
    return 0


def run_teardown(args: argparse.Namespace) -> int:
    try:
        teardown(args.interface, args.vip, bpffs=args.bpffs, state_dir=args.state_dir)
    except (BackendSetupError, tc.BpfError, BuildError) as exc:
        return _fail(exc)
    return 0


def run_status(args: argparse.Namespace) -> int:
    try:
        st = status(args.interface, bpffs=args.bpffs)
    except (BackendSetupError, tc.BpfError, BuildError) as exc:
        return _fail(exc)
    if args.metrics:
        print(decap_metrics(args.interface, st), end="")
        return 0
    attached = f"program id {st.prog_id}" if st.prog_id is not None else "not attached"
    print(f"{args.interface}: decap {attached}; VIPs: {', '.join(map(str, st.vips)) or 'none'}")
    for name, (packets, nbytes) in st.counters.items():
        print(f"  {name:16} {packets:>12} packets {nbytes:>14} bytes")
    return 0
