"""`maglev lab web I`: a node's status page and API, opened from the host.

Each lab node's API listens on 127.0.0.1 inside the node's namespace, which the host cannot
reach. This relays a port on the host's loopback to it: every accepted connection gets a socket
made inside the namespace (lab.nssocket.in_netns), and bytes are copied both ways. Read-only in
spirit (the API still wants its token for writes); stops on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import socket

from lab.nssocket import in_netns


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def relay(ns: str, target_port: int, listen: str, port: int, ready=None) -> None:
    """Relay listen:port on the host to 127.0.0.1:target_port in namespace ns, until cancelled."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with in_netns(ns):
            inner = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        inner.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(inner, ("127.0.0.1", target_port))
        except OSError:
            inner.close()
            writer.close()
            return
        r2, w2 = await asyncio.open_connection(sock=inner)
        await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))

    server = await asyncio.start_server(on_client, listen, port)
    if ready is not None:
        ready(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()
