"""The API process ExaBGP runs: a pipe between ExaBGP and the node controller.

ExaBGP talks to "processes" it starts itself over their stdin/stdout. This helper connects that
pair to the controller's UNIX socket (path in argv[1]) and relays bytes both ways. It is the
channel that ties ExaBGP's life to the controller's:

- when the controller's end closes (controller crashed, or closed the channel), the helper
  terminates its parent ExaBGP, whose sessions close, so routers drop the routes; otherwise
  ExaBGP would keep announcing with nobody in charge;
- when ExaBGP goes away (stdin EOF), the helper exits.

It says hello first with its parent's PID so the controller can tell a helper of the current
ExaBGP from a late one of a previous run. Standard library only: it runs under ExaBGP's Python.
"""

from __future__ import annotations

import ctypes
import json
import os
import selectors
import signal
import socket
import sys
import time

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _stop_parent(exabgp_pid: int) -> None:
    if os.getppid() == exabgp_pid:
        try:
            os.kill(exabgp_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: helper.py CONTROLLER_SOCKET", file=sys.stderr)
        return 2
    _die_with_parent()
    exabgp_pid = os.getppid()
    try:
        sock = _connect(argv[1])
    except OSError as e:
        print(f"maglev bgp helper: cannot reach the controller at {argv[1]}: {e}; stopping ExaBGP",
              file=sys.stderr)
        _stop_parent(exabgp_pid)
        return 1
    sock.sendall((json.dumps({"hello": exabgp_pid}) + "\n").encode())
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "exabgp")
    sel.register(sock, selectors.EVENT_READ, "controller")
    while True:
        for key, _ in sel.select():
            if key.data == "exabgp":
                data = os.read(0, 65536)
                if not data:
                    return 0  # ExaBGP is gone
                try:
                    sock.sendall(data)
                except OSError:
                    _stop_parent(exabgp_pid)
                    return 1
            else:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    _stop_parent(exabgp_pid)  # the controller is gone: nobody may announce
                    return 1
                try:
                    _write_all(1, data)
                except OSError:
                    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
