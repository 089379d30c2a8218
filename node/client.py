"""A small synchronous client for the node's HTTP API, used by the operator CLI.

Where to connect and which token to send come from, in order: command-line flags, the
environment (MAGLEV_API, MAGLEV_TOKEN_FILE), the node file given with --config, then the
defaults (http://127.0.0.1:9180, no token).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_API = "http://127.0.0.1:9180"
API_PREFIX = "/api/v1"


class ApiError(Exception):
    def __init__(self, status: int, message: str, problems: list[str] | None = None):
        self.status = status
        self.problems = problems or []
        super().__init__(message)


@dataclass
class Client:
    base: str = DEFAULT_API
    token: str | None = None
    timeout: float = 10.0

    @classmethod
    def from_args(cls, api: str | None, token_file: Path | None, config: Path | None) -> "Client":
        base = api or os.environ.get("MAGLEV_API")
        token_path = token_file or (Path(os.environ["MAGLEV_TOKEN_FILE"]) if os.environ.get("MAGLEV_TOKEN_FILE") else None)
        if config is not None:
            from node.config import load_node_file

            node = load_node_file(config)
            host = node.api.listen if ":" not in node.api.listen else f"[{node.api.listen}]"
            base = base or f"http://{host}:{node.api.port}"
            if token_path is None and node.api.token_file is not None:
                tf = node.api.token_file
                token_path = tf if tf.is_absolute() else config.resolve().parent / tf
        token = token_path.read_text().strip() if token_path and token_path.exists() else None
        return cls(base or DEFAULT_API, token)

    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        url = self.base.rstrip("/") + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
                raise ApiError(exc.code, payload.get("error", raw.decode()), payload.get("problems")) from None
            except ValueError:
                raise ApiError(exc.code, raw.decode(errors="replace")) from None
        except urllib.error.URLError as exc:
            raise ApiError(0, f"cannot reach the node API at {self.base}: {exc.reason} "
                              "(is `maglev node` running? set --api or MAGLEV_API)") from None
        return json.loads(raw) if "json" in ctype else raw.decode()

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str) -> Any:
        return self.request("POST", path, body={})


def quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")
