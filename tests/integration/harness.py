"""What the namespace tests with a forwarder process on a node and one decapsulating backend
share (test_forwarder_live.py, test_health_tunnel.py): the backend set up and read by the real
`maglev backend` command, child processes in namespaces, and a teardown that leaves nothing
behind (processes stopped by PID, the backend's decap removed, namespaces and bpffs mounts gone)
whatever the test did. Also the flags of the real browser the status page tests use. Each test's tmp directory holds node-bpffs/, backend-bpffs/ and
backend-state/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# A real headless Chromium for the status page: no sandbox (root), nothing fetched from outside.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def maglev_backend(ns, tmp: Path, *args: str, check: bool = True) -> str:
    """`maglev backend ARGS` on the backend host's eth0; its stdout."""
    proc = ns.run(sys.executable, "-m", "node.cli", "backend", *args, "--interface", "eth0",
                  "--bpffs", str(tmp / "backend-bpffs"), "--state-dir", str(tmp / "backend-state"),
                  check=False)
    if check:
        assert proc.returncode == 0, f"maglev backend {args[0]} failed: {proc.stderr}{proc.stdout}"
    return proc.stdout


def decap_counters(ns, tmp: Path) -> dict[str, int]:
    """The backend's decap counters (packets), from `maglev backend status`."""
    counters = {}
    for line in maglev_backend(ns, tmp, "status").splitlines()[1:]:
        name, packets, *_ = line.split()
        counters[name] = int(packets)
    return counters


def popen(ns, argv: list[str], procs: list[subprocess.Popen]) -> subprocess.Popen:
    """A child in ``ns`` with text pipes, recorded in ``procs`` for the teardown."""
    proc = subprocess.Popen(ns.exec_argv(argv), cwd=REPO, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(proc)
    return proc


def teardown(prefix: str, tmp: Path, backend_ns, procs: list[subprocess.Popen],
             node: subprocess.Popen | None, quit_line: str, wait: float) -> None:
    """Ask the node's process to stop cleanly (it detaches XDP and removes its pins), remove the
    backend's decap, kill every child still running (by PID), then the namespaces and mounts."""
    from lab.netns import cleanup_prefix, list_namespaces, umount

    if node is not None and node.poll() is None:
        try:
            node.stdin.write(quit_line + "\n")
            node.stdin.flush()
            node.wait(wait)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if backend_ns.name in list_namespaces():
        maglev_backend(backend_ns, tmp, "teardown", check=False)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()  # by PID
        proc.wait(5)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f:
                f.close()
    cleanup_prefix(prefix)
    for mnt in ("node-bpffs", "backend-bpffs"):
        umount(tmp / mnt)
