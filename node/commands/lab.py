"""`maglev lab ...`: a whole cluster (router, client, nodes, backends) in namespaces on this
machine, and the demo. Needs root. See lab/lab.py for what each action does."""

from __future__ import annotations

import argparse
import json
import sys

from lab.plan import MAX_BACKENDS, MAX_NODES, RUN_DIR, LabPlan


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lab",
        help="run a whole cluster in network namespaces on this machine (root)",
        description="A router (FRR, ECMP), a client, N maglev nodes and M backends in network "
        "namespaces: `up`, `status`, crash/stop/start nodes, kill/start backends, `exec`, "
        "`down`, and `demo` (up, traffic, failures, summary, down).",
    )
    lab_sub = p.add_subparsers(dest="lab_command", metavar="ACTION")
    up = lab_sub.add_parser("up", help="build the lab (removes an earlier one first)")
    _sizes(up)
    up.add_argument("--config-source", choices=("directory", "etcd"), default="directory",
                    help="where nodes read VIPs: each its own directory (default), or a 3-member "
                         "etcd cluster the lab starts (`maglev fleet ...` manages the VIPs)")
    up.set_defaults(func=_up)
    st = lab_sub.add_parser("status", help="router nexthops, node state and VIPs, backend health")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)
    for name, index, helptext, fn in (
        ("kill-node", "I", "crash node I: links down, SIGKILL its processes", _kill_node),
        ("stop-node", "I", "stop node I gracefully (SIGTERM: withdraw, wait, exit)", _stop_node),
        ("start-node", "I", "start node I again (links up)", _start_node),
        ("kill-backend", "J", "kill backend J's server (a backend failure)", _kill_backend),
        ("start-backend", "J", "start backend J's server again", _start_backend),
        ("kill-etcd", "K", "SIGKILL etcd member K (--config-source etcd)", _kill_etcd),
        ("start-etcd", "K", "start etcd member K again", _start_etcd),
        ("cut-etcd", "I", "take node I's links to etcd down (its data path stays up)", _cut_etcd),
        ("reconnect-etcd", "I", "bring node I's links to etcd back", _reconnect_etcd),
    ):
        sp = lab_sub.add_parser(name, help=helptext)
        sp.add_argument("index", type=int, metavar=index)
        sp.set_defaults(func=fn)
    web = lab_sub.add_parser("web", help="open node I's status page from the host: relay 127.0.0.1:PORT to its API")
    web.add_argument("index", type=int, metavar="I")
    web.add_argument("--port", type=int, default=9180, help="port on the host's loopback (default 9180)")
    web.set_defaults(func=_web)
    ex = lab_sub.add_parser("exec", help="run a command in a lab namespace: exec ROLE -- CMD...")
    ex.add_argument("role", help="router, client, node-I or backend-J")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command (after --)")
    ex.set_defaults(func=_exec)
    dn = lab_sub.add_parser("down", help="remove every namespace, process, pin, mount and file")
    dn.set_defaults(func=_down)
    demo = lab_sub.add_parser("demo", help="up, traffic, a node crash, a backend failure, a graceful stop, down")
    _sizes(demo)
    demo.add_argument("--config-source", choices=("directory", "etcd"), default="directory",
                      help="etcd: the nodes follow a 3-member etcd cluster, and the demo adds the fleet steps")
    demo.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    demo.set_defaults(func=_demo)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _sizes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=3, help=f"maglev nodes, 1-{MAX_NODES} (default 3)")
    p.add_argument("--backends", type=int, default=3, help=f"backends, 1-{MAX_BACKENDS} (default 3)")


def _say(msg: str) -> None:
    print(f"[lab] {msg}", flush=True)


def _guard(fn):
    """Turn lab errors into one clear line and exit code 1 (no traceback for expected failures)."""

    def wrapper(args: argparse.Namespace) -> int:
        from lab.lab import LabError
        from lab.netns import NetnsError

        try:
            return int(fn(args) or 0)
        except (LabError, NetnsError, ValueError) as exc:
            print(f"maglev lab: error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def _loaded():
    from lab.lab import Lab

    return Lab.load(RUN_DIR, _say)


@_guard
def _up(args: argparse.Namespace) -> int:
    from lab.lab import Lab

    Lab(LabPlan(nodes=args.nodes, backends=args.backends, config_source=args.config_source), _say).up()
    _say("try: maglev lab status; maglev lab exec client -- curl -s http://10.100.0.1/")
    if args.config_source == "etcd":
        _say("fleet: maglev lab exec node-1 -- maglev fleet status --config /run/maglev-lab/node-1/node.yaml")
    return 0


@_guard
def _status(args: argparse.Namespace) -> int:
    from lab.lab import format_status

    st = _loaded().status()
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0


@_guard
def _web(args: argparse.Namespace) -> int:
    import asyncio

    from lab.plan import API_PORT
    from lab.web import relay

    host = _loaded().plan.node(args.index)

    def ready(port: int) -> None:
        _say(f"{host.name}'s status page: http://127.0.0.1:{port}/  (metrics: /metrics; Ctrl-C stops)")

    try:
        asyncio.run(relay(host.ns, API_PORT, "127.0.0.1", args.port, ready))
    except KeyboardInterrupt:
        pass
    return 0


def _on_index(act, said):
    """An action on the loaded lab's node, backend or etcd member ``args.index``: ``act(lab, i)``
    does it, ``said(i, result)`` is the line the operator reads."""
    @_guard
    def run(args: argparse.Namespace) -> int:
        _say(said(args.index, act(_loaded(), args.index)))
        return 0
    return run


_kill_node = _on_index(lambda lab, i: lab.kill_node(i), lambda i, pids: (
    f"node-{i} crashed: links down, SIGKILL to pids {', '.join(map(str, pids)) or 'none'}; "
    "the router drops it when its 3 s hold timer expires"))
_stop_node = _on_index(lambda lab, i: lab.stop_node(i),
                       lambda i, took: f"node-{i} stopped gracefully in {took:.1f} s (VIPs withdrawn first)")
_start_node = _on_index(lambda lab, i: lab.start_node(i),
                        lambda i, pid: f"node-{i} started (pid {pid}); it announces its VIPs after warm-up")
_kill_backend = _on_index(lambda lab, i: lab.kill_backend(i), lambda i, pid: (
    f"backend-{i}'s server killed (pid {pid}); health checks take it out of the tables"))
_start_backend = _on_index(lambda lab, i: lab.start_backend(i),
                           lambda i, pid: f"backend-{i}'s server started (pid {pid})")
_kill_etcd = _on_index(lambda lab, i: lab.kill_etcd(i), lambda i, pid: (
    f"etcd-{i} killed (pid {pid}); the other two keep the quorum, nodes move to them"))
_start_etcd = _on_index(lambda lab, i: lab.start_etcd(i),
                        lambda i, pid: f"etcd-{i} started again (pid {pid}) on its data directory")
_cut_etcd = _on_index(lambda lab, i: lab.set_etcd_link(i, False), lambda i, _: (
    f"node-{i} cut off from etcd: it keeps serving its last good config and reports stale"))
_reconnect_etcd = _on_index(lambda lab, i: lab.set_etcd_link(i, True), lambda i, _: (
    f"node-{i} reconnected to etcd: it re-reads the config and catches up"))


@_guard
def _exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return _loaded().exec(args.role, cmd)


@_guard
def _down(args: argparse.Namespace) -> int:
    from lab.lab import Lab

    try:
        lab = Lab.load(RUN_DIR, _say)
    except Exception:  # noqa: BLE001 - no or broken state file: still sweep namespaces and mounts
        lab = Lab(LabPlan(), _say)
    lab.down()
    return 0


@_guard
def _demo(args: argparse.Namespace) -> int:
    from lab.demo import run_demo

    return run_demo(LabPlan(nodes=args.nodes, backends=args.backends, config_source=args.config_source),
                    keep=args.keep)
