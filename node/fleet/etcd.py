"""A small asyncio client for etcd's v3 JSON gateway (``/v3/...`` on every client URL).

Why the gateway and not a gRPC client: etcd serves it itself on the client port (Debian
bookworm's etcd 3.4 included), so it needs no new dependency (aiohttp is already ours), no
generated protobuf code, and it speaks TLS, auth, transactions, leases and streaming watches.
The Python gRPC clients on PyPI are either unmaintained (``etcd3``, last release 2020, breaks on
protobuf 4) or pull grpcio in for the same five calls (``aetcd``).

Keys and values are bytes, base64 in JSON; this module hides that. Endpoints are tried in turn:
the client sticks to the one that answered last, and moves to the next on any failure, so one
dead member costs one timeout, not an outage.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp


class EtcdError(Exception):
    """etcd could not be reached, or refused the request (the message says which)."""


class EtcdCompacted(EtcdError):
    """A watch asked for history etcd has compacted away: re-read everything."""

    def __init__(self, compact_revision: int):
        self.compact_revision = compact_revision
        super().__init__(f"revision history compacted up to {compact_revision}")


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True)
class WatchEvent:
    type: str  # "PUT" or "DELETE"
    kv: KeyValue


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with prefix (etcd's convention: the prefix
    with its last byte incremented)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw).decode()


def _kv(item: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=unb64(item["key"]).decode(),
        value=unb64(item.get("value", "")),
        mod_revision=int(item.get("mod_revision", 0)),
        lease=int(item.get("lease", 0)),
    )


class EtcdClient:
    def __init__(
        self,
        endpoints: list[str],
        *,
        timeout: float = 2.0,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.username = username
        self.password = password
        self._ssl = _ssl_context(ca_file, cert_file, key_file)
        self._current = 0
        self._token: str | None = None
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, cfg: Any, base_dir: Path | None = None) -> "EtcdClient":
        """From a node file's ``etcd`` section (node.config.EtcdConfig). ValueError, naming the
        field and file, when the password or TLS files cannot be read."""

        def path(p: Path | None) -> Path | None:
            if p is None or p.is_absolute() or base_dir is None:
                return p
            return base_dir / p

        password = None
        if cfg.password_file is not None:
            try:
                password = path(cfg.password_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"etcd.password_file {path(cfg.password_file)}: cannot read: "
                                 f"{exc.strerror or exc}") from None
        try:
            return cls(cfg.endpoints, timeout=cfg.request_timeout, ca_file=path(cfg.ca_file),
                       cert_file=path(cfg.cert_file), key_file=path(cfg.key_file),
                       username=cfg.username, password=password)
        except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError; named for the reader
            files = ", ".join(f"{name} {path(p)}" for name, p in
                              (("ca_file", cfg.ca_file), ("cert_file", cfg.cert_file), ("key_file", cfg.key_file))
                              if p is not None)
            raise ValueError(f"etcd TLS files ({files}): cannot load: {exc.strerror or exc}") from None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "EtcdClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self._session

    # ------------------------------------------------------------------ requests

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one gateway request, trying every endpoint once from the current one."""
        errors = []
        for attempt in range(len(self.endpoints)):
            url = self.endpoint
            try:
                return await self._call_one(url, path, body)
            except EtcdError as exc:
                if getattr(exc, "final", False):
                    raise
                errors.append(f"{url}: {exc}")
                self._current = (self._current + 1) % len(self.endpoints)
                self._token = None
        raise EtcdError("no etcd endpoint answered (" + "; ".join(errors) + ")")

    async def _call_one(self, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = await self._auth_headers(url)
        try:
            async with self._http().post(url + path, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise EtcdError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        data = _json(text)
        if resp.status != 200 or "error" in data:
            message = data.get("message") or data.get("error") or text[:200]
            err = EtcdError(f"etcd refused {path}: {message} (HTTP {resp.status})")
            # A refusal is an answer: another member would refuse the same way, except when
            # this one is unhealthy (no leader) or the auth token expired.
            err.final = resp.status in (400, 401, 403, 404) and "token" not in str(message)
            raise err
        return data

    async def _auth_headers(self, url: str) -> dict[str, str]:
        if self.username is None:
            return {}
        if self._token is None:
            body = {"name": self.username, "password": self.password or ""}
            try:
                async with self._http().post(url + "/v3/auth/authenticate", json=body,
                                             timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                    data = _json(await resp.text())
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise EtcdError(f"authenticating: {exc}") from None
            if "token" not in data:
                err = EtcdError(f"etcd refused user {self.username!r}: "
                                f"{data.get('message') or data.get('error') or data}")
                err.final = True
                raise err
            self._token = data["token"]
        return {"Authorization": self._token}

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under prefix, and the store revision they were read at (linearizable)."""
        data = await self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix))})
        return int(data["header"]["revision"]), [_kv(i) for i in data.get("kvs", [])]

    async def revision(self, prefix: str) -> int:
        """The current store revision (a cheap linearizable read: proves a quorum answers)."""
        data = await self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                                "count_only": True})
        return int(data["header"]["revision"])

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        data = await self.call("/v3/kv/put", body)
        return int(data["header"]["revision"])

    async def txn(self, compare: list[dict], success: list[dict]) -> tuple[bool, int]:
        """An atomic transaction: every op of success is applied at one revision, or none."""
        data = await self.call("/v3/kv/txn", {"compare": compare, "success": success, "failure": []})
        return bool(data.get("succeeded")), int(data["header"]["revision"])

    async def lease_grant(self, ttl: int) -> int:
        data = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(data["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """Refresh a lease; returns its TTL, 0 when the lease has already expired."""
        data = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(data.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    async def compact(self, revision: int) -> None:
        await self.call("/v3/kv/compaction", {"revision": str(revision)})

    # ------------------------------------------------------------------ watch

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Yield (revision, events) for each change under prefix from start_revision on. One
        etcd transaction arrives as one batch at one revision. Raises EtcdCompacted when that
        history is gone and EtcdError when the stream breaks; the caller re-reads and watches
        again (it never resumes silently from a gap)."""
        url = self.endpoint
        headers = await self._auth_headers(url)
        body = {"create_request": {"key": b64(prefix), "range_end": b64(prefix_end(prefix)),
                                   "start_revision": str(start_revision)}}
        try:
            async with self._http().post(url + "/v3/watch", json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout,
                                                                       sock_connect=self.timeout)) as resp:
                if resp.status != 200:
                    raise EtcdError(f"watch refused by {url}: HTTP {resp.status}")
                async for line in resp.content:
                    result = _json(line.decode()).get("result")
                    if result is None:
                        raise EtcdError(f"watch on {url} broke: {line[:200]!r}")
                    if int(result.get("compact_revision", 0)):
                        raise EtcdCompacted(int(result["compact_revision"]))
                    if result.get("canceled"):
                        raise EtcdError(f"watch canceled by {url}: {result.get('cancel_reason', '')}")
                    events = [WatchEvent(e.get("type", "PUT"), _kv(e["kv"])) for e in result.get("events", [])]
                    if events:
                        yield max(e.kv.mod_revision for e in events), events
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self._current = (self._current + 1) % len(self.endpoints)
            raise EtcdError(f"watch on {url} lost: {type(exc).__name__}: {exc}") from None
        raise EtcdError(f"watch stream from {url} ended")


def put_op(key: str, value: bytes | str) -> dict[str, Any]:
    return {"requestPut": {"key": b64(key), "value": b64(value)}}


def delete_op(key: str) -> dict[str, Any]:
    return {"requestDeleteRange": {"key": b64(key)}}


def unchanged_since(key: str, mod_revision: int) -> dict[str, Any]:
    """Compare: the key was last written at mod_revision (0: the key does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}


CN_HINT = ("etcd's JSON gateway refuses a client certificate with a CommonName while auth is "
           "enabled: issue the node's client certificate without a CN, and authenticate with "
           "username/password_file")


def _json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        if "CommonName of client" in text:
            return {"error": CN_HINT}
        return {"error": f"not JSON: {text[:200]!r}"}
    return data if isinstance(data, dict) else {"error": f"unexpected answer: {text[:200]!r}"}


def _ssl_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if ca is None and cert is None:
        return None
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx
