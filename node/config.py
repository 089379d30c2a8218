"""Configuration model: the node file and the VIP files.

Every object an operator writes (a YAML file, or the same object over the HTTP API) goes through
these pydantic models. Validation is strict on purpose: an unknown key is usually a typo that
would otherwise silently fall back to a default, and a load balancer that guesses is worse than
one that refuses. Errors name the file, the VIP and the field so the operator can fix them
without reading code.

Public API:
- ``load_node_file(path) -> NodeConfig``
- ``load_vip_file(path) -> list[VipConfig]``
- ``load_vip_dir(path) -> dict[str, VipConfig]`` (checks duplicates across files)
- ``parse_vip_object(data, source) -> VipConfig`` (the API path)
- ``validate_vip_set(found, node, source) -> list[ConfigProblem]``: every check a reload runs
  over a whole candidate set (duplicates, the VIP count limit, what this node can serve)
- ``load_node_vips(directory, node) -> dict[name, (path, VipConfig)]``: exactly what a reload
  reads and validates
- ``ConfigError`` carries a list of ``ConfigProblem`` (file, vip, field, message).

Parsing is bounded (see "Limits" below): a file's size, YAML nesting depth and node count
(aliases expanded), integer digits, VIPs, backends per VIP and table_size all have documented
maxima, checked before the expensive step they guard, so no input can make the loader run for
long or raise anything but ConfigError.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import ipaddress
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from node.maglev import is_prime
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)



def _parse_ip(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    try:
        return ipaddress.ip_address(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IPv4 or IPv6 address") from None


# One validator for both families, so a typo gets one plain message rather than two union ones.
IPAddress = Annotated[
    Union[ipaddress.IPv4Address, ipaddress.IPv6Address],
    PlainValidator(_parse_ip),
    PlainSerializer(str, return_type=str),
]

DEFAULT_TABLE_SIZE = 65537
MIN_TABLE_SIZE = 7

# --------------------------------------------------------------------------------------------
# Limits. Each bounds the work one input can cause, with room for a fleet (issue 12: >= 4096
# VIPs and 65536 VIP-backend pairs per node). The data path's own, lower limits are checked by
# check_vips_for_node.
# --------------------------------------------------------------------------------------------

MAX_FILE_BYTES = 16 * 1024 * 1024  # one VIP or node file
MAX_DIR_BYTES = 64 * 1024 * 1024  # all VIP files together
MAX_VIP_FILES = 16384
MAX_YAML_DEPTH = 64  # a valid VIP file nests 6 deep (vips, [], health_check, command, [])
MAX_YAML_NODES = 4_000_000  # scalars and collections in one file, aliases expanded
MAX_INT_DIGITS = 20  # every integer field fits 64 bits
MAX_VIPS = 16384  # VIPs per node
MAX_BACKENDS_PER_VIP = 4096
MAX_TABLE_SIZE = 16_777_216  # 2^24; the largest prime below it is 16,777,213
MAX_PROBLEMS = 100  # reported per error; the rest are counted
VIP_FILE_SUFFIXES = (".yaml", ".yml")
# Names become file names (the API writes <name>.yaml) and metric labels: a strict pattern,
# matched with fullmatch (re.match with "$" would accept a trailing newline).
NAME_MAX = 63
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (NAME_MAX - 1))


class Strict(BaseModel):
    """Base for every config object: unknown keys are errors, objects are immutable."""

    # No inf or NaN anywhere: an interval of .inf would stop a check forever without a word.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Health checks
# --------------------------------------------------------------------------------------------


class CheckCommon(Strict):
    """Scheduling and state-machine parameters shared by every check type."""

    interval: float = Field(2.0, gt=0, description="seconds between probes")
    timeout: float = Field(1.0, gt=0, description="seconds; must be below interval")
    rise: int = Field(2, ge=1, le=100, description="consecutive successes to become UP")
    fall: int = Field(3, ge=1, le=100, description="consecutive failures to become DOWN")
    port: int | None = Field(None, ge=1, le=65535, description="probe port; default: backend port, then VIP port")
    # Flap dampening: more than flap_threshold transitions within flap_window seconds hold the
    # backend DOWN for hold_down seconds, doubling on each repeat up to hold_down_max.
    flap_threshold: int = Field(6, ge=1)
    flap_window: float = Field(60.0, gt=0)
    hold_down: float = Field(10.0, ge=0)
    hold_down_max: float = Field(300.0, ge=0)
    # Which path the probe takes (README "Tunnel health checks"). direct: to the backend's own
    # address, as it always did. tunnel: to the VIP address and port, GRE-encapsulated by the
    # node to the one backend under test, answered by DSR: it fails when the backend lost the
    # VIP on lo or its decapsulation, which a direct probe cannot see. ("path" would read
    # better but is the HTTP check's URL path.)
    via: Literal["direct", "tunnel"] = "direct"

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> "CheckCommon":
        if self.timeout >= self.interval:
            raise ValueError(
                f"timeout ({self.timeout} s) must be below interval ({self.interval} s), "
                "or probes would overlap"
            )
        return self


class TcpCheck(CheckCommon):
    type: Literal["tcp"]


class HttpCheck(CheckCommon):
    type: Literal["http", "https"]
    method: str = "GET"
    path: str = "/"
    host: str | None = Field(None, description="Host header; default: the backend address")
    expect_status: list[str] = Field(default_factory=lambda: ["200-399"])
    body: str | None = Field(None, description="substring the body must contain")
    body_regex: str | None = None
    tls_verify: bool = True

    @field_validator("path")
    @classmethod
    def _path_absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"path {v!r} must start with '/'")
        return v

    @field_validator("expect_status")
    @classmethod
    def _status_ranges(cls, v: list[str]) -> list[str]:
        for item in v:
            parse_status_range(item)
        if not v:
            raise ValueError("expect_status must list at least one status or range")
        return v

    @field_validator("body_regex")
    @classmethod
    def _regex_compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"body_regex does not compile: {exc}") from None
        return v


def parse_status_range(item: str | int) -> tuple[int, int]:
    """'200-399' -> (200, 399); '204' -> (204, 204)."""
    text = str(item).strip()
    lo_s, _, hi_s = text.partition("-")
    try:
        lo = int(lo_s)
        hi = int(hi_s) if hi_s else lo
    except ValueError:
        raise ValueError(f"status {text!r} is not a code or a range like 200-399") from None
    if not (100 <= lo <= hi <= 599):
        raise ValueError(f"status range {text!r} must lie within 100-599")
    return lo, hi


class UdpCheck(CheckCommon):
    type: Literal["udp"]
    payload: str = Field("ping", description="text sent; prefix with 'hex:' for raw bytes")
    expect: str | None = Field(None, description="bytes the reply must contain ('hex:' allowed)")


class DnsCheck(CheckCommon):
    type: Literal["dns"]
    query_name: str
    query_type: Literal["A", "AAAA"] = "A"


class ExecCheck(CheckCommon):
    type: Literal["exec"]
    command: list[str] = Field(min_length=1, description="argv, run without a shell")

    @model_validator(mode="after")
    def _no_tunnel(self) -> "ExecCheck":
        if self.via == "tunnel":
            raise ValueError("via: tunnel needs a probe the node sends itself (tcp, http, https, udp, "
                             "dns); an exec check runs a command, which the node cannot steer "
                             "through the tunnel: use via: direct")
        return self


HealthCheck = Annotated[
    Union[TcpCheck, HttpCheck, UdpCheck, DnsCheck, ExecCheck], Field(discriminator="type")
]


# --------------------------------------------------------------------------------------------
# VIPs
# --------------------------------------------------------------------------------------------


class Backend(Strict):
    address: IPAddress
    port: int | None = Field(None, ge=1, le=65535)
    weight: float = Field(1.0, gt=0)
    state: Literal["active", "drain", "disabled"] = "active"
    hash_key: str | None = Field(None, min_length=1)

    @functools.cached_property
    def key(self) -> str:
        """The Maglev key: stable across nodes and restarts, so tables agree (computed once:
        the model is immutable and every reconcile asks)."""
        if self.hash_key:
            return self.hash_key
        return backend_key(self.address, self.port)


def backend_key(address: IPAddress, port: int | None) -> str:
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{port}" if port else host


def _check_communities(v: list[str]) -> list[str]:
    for c in v:
        m = re.fullmatch(r"(\d+):(\d+)", c)
        if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
            raise ValueError(f"community {c!r} must be ASN:VALUE with both parts 0-65535")
    return v


DEPREFER_MED_STEP = 1000  # default MED penalty of a de-preferred route
MAX_PREPEND = 16  # AS-path prepends of a de-preferred route; more only bloats every router's table


class DepreferAttributes(Strict):
    """The route of a de-preferred VIP: still announced, so routers reach it when every node is
    degraded alike, but worse than a healthy node's on MED and AS-path length (ExaBGP
    healthcheck's --down-metric). Prepends work across ASNs; MED needs
    `bgp always-compare-med` on the router (or one ASN for every node)."""

    med: int | None = Field(None, ge=0, le=4294967295,
                            description="MED while de-preferred; unset: the VIP's med + 1000")
    prepend: int = Field(3, ge=0, le=MAX_PREPEND, description="extra copies of local_as in the AS path")
    communities: list[str] = Field(default_factory=list, description="added while de-preferred")

    @field_validator("communities")
    @classmethod
    def _community_format(cls, v: list[str]) -> list[str]:
        return _check_communities(v)


class AnnouncePolicy(Strict):
    min_healthy: int = Field(1, ge=1, description="below this many serving backends the pool is unhealthy")
    min_healthy_to_announce: int | None = Field(
        None, ge=1, description="serving backends needed to count as healthy again (hysteresis; "
        ">= min_healthy); unset: min_healthy")
    on_unhealthy: Literal["withdraw", "deprefer"] = Field(
        "withdraw", description="what an unhealthy pool does to the route")
    med: int | None = Field(None, ge=0, le=4294967295)
    communities: list[str] = Field(default_factory=list)
    deprefer: DepreferAttributes = Field(default_factory=DepreferAttributes)

    @field_validator("communities")
    @classmethod
    def _community_format(cls, v: list[str]) -> list[str]:
        return _check_communities(v)

    @model_validator(mode="after")
    def _hysteresis(self) -> "AnnouncePolicy":
        if self.min_healthy_to_announce is not None and self.min_healthy_to_announce < self.min_healthy:
            raise ValueError(
                f"min_healthy_to_announce ({self.min_healthy_to_announce}) must be at least "
                f"min_healthy ({self.min_healthy}): a pool must not count as healthy again with fewer "
                "backends than make it unhealthy")
        if self.deprefer.med is not None and self.med is not None and self.deprefer.med <= self.med:
            raise ValueError(
                f"deprefer.med ({self.deprefer.med}) must be above med ({self.med}): a lower MED is "
                "preferred, so the de-preferred route would win")
        return self

    @property
    def healthy_again(self) -> int:
        return self.min_healthy_to_announce or self.min_healthy

    @property
    def deprefer_med(self) -> int:
        if self.deprefer.med is not None:
            return self.deprefer.med
        return min((self.med or 0) + DEPREFER_MED_STEP, 4294967295)


class SecondChance(Strict):
    """Second chance (README: "Second chance"): after a table change, each moved entry names
    its previous owner for ``window`` seconds, so a flow that meets the new owner without a
    socket there is handed to the backend that has it. Every backend of the VIP should run
    maglev's tc decap program (`maglev backend setup --decap bpf`): kernel GRE devices do not
    implement it (README: "Second chance")."""

    window: float = Field(..., description="seconds after a table change during which moved "
                          "entries name their previous owner")

    @field_validator("window")
    @classmethod
    def _window_range(cls, v: float) -> float:
        if not 1 <= v <= 86400:
            raise ValueError(f"window {v} must be 1-86400 seconds (longer than the connections "
                             "it should save; a day at most)")
        return v


class VipConfig(Strict):
    name: str
    address: IPAddress
    protocol: Literal["tcp", "udp"] = "tcp"
    port: int | Literal["all"] = Field(..., description="a port 1-65535, or 'all'")
    table_size: int = DEFAULT_TABLE_SIZE
    backends: list[Backend] = Field(default_factory=list, max_length=MAX_BACKENDS_PER_VIP)
    # Used only while the primary pool is below announce.min_healthy (a "sorry server"), with a
    # table of their own; checked by the same health_check.
    fallback_backends: list[Backend] = Field(default_factory=list, max_length=MAX_BACKENDS_PER_VIP)
    health_check: HealthCheck | None = None
    announce: AnnouncePolicy = Field(default_factory=AnnouncePolicy)
    second_chance: SecondChance | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                f"name {v!r} must be 1-63 characters of letters, digits, '.', '_' or '-'"
            )
        return v

    @field_validator("port")
    @classmethod
    def _port_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 65535:
            raise ValueError(f"port {v} must be 1-65535 or 'all'")
        return v

    @field_validator("table_size")
    @classmethod
    def _table_prime(cls, v: int) -> int:
        if v < MIN_TABLE_SIZE:
            raise ValueError(f"table_size {v} is too small (minimum {MIN_TABLE_SIZE})")
        if v > MAX_TABLE_SIZE:
            raise ValueError(f"table_size {v} exceeds the maximum of {MAX_TABLE_SIZE} "
                             "(the largest prime below it is 16777213)")
        if not is_prime(v):
            raise ValueError(f"table_size {v} is not prime (Maglev needs a prime; e.g. 65537 or 655373)")
        return v

    @model_validator(mode="after")
    def _backends_consistent(self) -> "VipConfig":
        keys: set[str] = set()
        addrs: set[tuple[Any, int | None]] = set()  # address objects: str() of each cost ~10 us
        for field_name in ("backends", "fallback_backends"):
            for i, b in enumerate(getattr(self, field_name)):
                where = f"{field_name}[{i}]"
                if b.address.version != self.address.version:
                    raise ValueError(
                        f"{where}.address {b.address} is IPv{b.address.version} but the VIP "
                        f"address {self.address} is IPv{self.address.version}; a VIP's backends must "
                        "use the VIP's address family"
                    )
                if (b.address, b.port) in addrs:  # one family (checked above): equal iff same text
                    raise ValueError(f"{where} {b.key} is listed twice (a fallback backend must not "
                                     "also be a primary one)")
                addrs.add((b.address, b.port))
                if b.key in keys:
                    raise ValueError(f"{where} hash key {b.key!r} is used by another backend")
                keys.add(b.key)
        if len(self.all_backends) > MAX_BACKENDS_PER_VIP:
            raise ValueError(f"{len(self.all_backends)} backends and fallback backends exceed the "
                             f"limit of {MAX_BACKENDS_PER_VIP} per VIP")
        if self.second_chance is not None and self.address.version != 4:
            raise ValueError(
                f"second_chance needs an IPv4 VIP: the GRE key that names the previous owner "
                f"holds an IPv4 address, and {self.address} is IPv6"
            )
        if len(self.backends) > self.table_size:
            raise ValueError(
                f"{len(self.backends)} backends do not fit a table of {self.table_size} entries"
            )
        return self

    @model_validator(mode="after")
    def _tunnel_port(self) -> "VipConfig":
        check = self.health_check
        if check is None or check.via != "tunnel" or check.port is not None:
            return self
        if isinstance(self.port, int) or check.type in ("http", "https", "dns"):
            return self
        raise ValueError("health_check.via: tunnel probes the VIP's own port, and this VIP has "
                         "port 'all': set health_check.port")

    @property
    def all_backends(self) -> list[Backend]:
        """The primary pool, then the fallback pool: every backend the node checks and programs."""
        return self.backends + self.fallback_backends if self.fallback_backends else self.backends

    @property
    def identity(self) -> tuple[str, str, int | str]:
        """(address, protocol, port): what must be unique across the whole node."""
        return (str(self.address), self.protocol, self.port)

    @property
    def prefix(self) -> str:
        return f"{self.address}/{self.address.max_prefixlen}"

    def backend_port(self, backend: Backend) -> int | None:
        if backend.port:
            return backend.port
        return self.port if isinstance(self.port, int) else None


# --------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------


class BgpPeer(Strict):
    address: IPAddress
    peer_as: int = Field(..., ge=1, le=4294967295)
    hold_time: int | None = Field(None, description="override of bgp.hold_time for this peer")
    local_address: IPAddress | None = Field(None, description="override; must match the peer's family")
    passive: bool = False


# A crashed node whose death only the TCP close revealed keeps its routes at the router this
# long at the most: a bound on the blackhole, not a restart duration anyone needs.
GR_RESTART_TIME_MAX = 300


class BfdConfig(Strict):
    """BFD next to ExaBGP (FRR's bfdd, one single-hop session per BGP peer): routers with
    ``neighbor X bfd`` drop a dead node in interval x multiplier instead of the hold time."""

    enabled: bool = False
    interval_ms: int = Field(100, ge=10, le=60000, description="transmit and receive interval, ms")
    multiplier: int = Field(3, ge=2, le=255, description="missed packets before the session is down")


class GracefulRestartConfig(Strict):
    """BGP graceful restart (RFC 4724) for a planned restart with ``forwarder.on_stop: keep``:
    the router keeps this node's routes while it restarts (its XDP forwarder keeps forwarding).
    ``restart_time`` is also the longest a router keeps the routes of a node that died without
    BFD noticing, so it is bounded (see the README, "Hitless node restart")."""

    enabled: bool = False
    restart_time: int = Field(
        15, ge=1, le=GR_RESTART_TIME_MAX,
        description="seconds a router keeps this node's routes after its session went away silently; "
        f"at most {GR_RESTART_TIME_MAX}",
    )


class BgpConfig(Strict):
    local_as: int = Field(..., ge=1, le=4294967295)
    router_id: ipaddress.IPv4Address
    local_address: IPAddress
    local_address_v6: ipaddress.IPv6Address | None = Field(
        None, description="source for IPv6 peers when local_address is IPv4"
    )
    next_hop: Literal["self"] | IPAddress = "self"
    hold_time: int = Field(3, description="seconds; 0 or 3-65535; 3 is FRR's and ExaBGP's minimum")
    peers: list[BgpPeer] = Field(default_factory=list)
    withdraw_delay: float = Field(2.0, ge=0, description="seconds between withdraw-all and stop")
    graceful_shutdown: float = Field(
        0.0, ge=0, description="seconds to announce with GRACEFUL_SHUTDOWN (65535:0) before withdrawing"
    )
    min_change_interval: float = Field(1.0, ge=0, description="a VIP's route changes at most this often")
    flap_hold_down: float = Field(5.0, ge=0, description="initial hold-down for a flapping VIP route")
    flap_hold_down_max: float = Field(120.0, ge=0)
    flap_threshold: int = Field(3, ge=1, le=100, description="losses of a VIP's healthy verdict within "
                                "flap_window that start its hold-down (de-preferred, never withdrawn)")
    flap_window: float = Field(60.0, gt=0)
    bfd: BfdConfig = Field(default_factory=BfdConfig)
    graceful_restart: GracefulRestartConfig = Field(default_factory=GracefulRestartConfig)

    @field_validator("hold_time")
    @classmethod
    def _hold_time(cls, v: int) -> int:
        if v != 0 and not 3 <= v <= 65535:
            raise ValueError(f"hold_time {v} must be 0 or 3-65535 (BGP, RFC 4271)")
        return v

    @model_validator(mode="after")
    def _families(self) -> "BgpConfig":
        seen: set[str] = set()
        for i, p in enumerate(self.peers):
            if str(p.address) in seen:
                raise ValueError(f"peers[{i}].address {p.address} is listed twice")
            seen.add(str(p.address))
            if p.hold_time is not None:
                BgpConfig._hold_time(p.hold_time)
            local = self.local_for(p)
            if local is None or local.version != p.address.version:
                raise ValueError(
                    f"peers[{i}].address {p.address} is IPv{p.address.version} but no local "
                    f"IPv{p.address.version} address is configured (set local_address"
                    + ("_v6" if p.address.version == 6 else "")
                    + " or peers[].local_address)"
                )
        return self

    def local_for(self, peer: BgpPeer) -> IPAddress | None:
        if peer.local_address is not None:
            return peer.local_address
        if self.local_address.version == peer.address.version:
            return self.local_address
        if peer.address.version == 6:
            return self.local_address_v6
        return None


MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class ForwarderConfig(Strict):
    interfaces: list[str] = Field(..., min_length=1)
    xdp_mode: Literal["native", "generic"] = "native"
    encap_source_v4: ipaddress.IPv4Address | None = None
    encap_source_v6: ipaddress.IPv6Address | None = None
    next_hop_mac: str | None = Field(
        None, description="MAC of the gateway towards backends; unset: bpf_fib_lookup"
    )
    conntrack_size: int = Field(1_000_000, ge=1024)
    conntrack: Literal["lru", "direct"] = Field(
        "lru", description="connection tracking design: lru = the kernel's LRU hash, one per address "
        "family of conntrack_size flows each (no tracked flow is displaced below conntrack_size); "
        "direct = a direct-mapped array, faster, but a new flow replaces the tracked flow in its "
        "slot, which then follows the Maglev table"
    )
    udp_idle_timeout: float = Field(30.0, gt=0)
    new_flow_rate_limit: int = Field(0, ge=0, description="new flows per second per CPU; 0 = unlimited")
    mtu: int = Field(1500, ge=576, le=65535, description="MTU towards the backends")
    table_capacity: int | None = Field(
        None, ge=16, description="Maglev table entries for all VIPs, 4 Bytes each; unset: sized at "
        "start from the configured VIPs (every table, room to rebuild, and a quarter more to grow)"
    )
    bpffs: Path = Path("/sys/fs/bpf/maglev")
    self_test_interval: float = Field(5.0, gt=0)
    on_stop: Literal["detach", "keep"] = "detach"

    @field_validator("next_hop_mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is not None and not MAC_RE.match(v):
            raise ValueError(f"next_hop_mac {v!r} is not a MAC address like 02:00:00:00:00:01")
        return v.lower() if v else v

    @field_validator("table_capacity")
    @classmethod
    def _capacity_chunks(cls, v: int | None) -> int | None:
        if v is not None and v % 8:
            raise ValueError(f"table_capacity {v} must be a multiple of 8")
        return v

    @model_validator(mode="after")
    def _some_source(self) -> "ForwarderConfig":
        if self.encap_source_v4 is None and self.encap_source_v6 is None:
            raise ValueError("set encap_source_v4 and/or encap_source_v6 (the GRE outer source)")
        return self


class ApiConfig(Strict):
    listen: str = "127.0.0.1"
    port: int = Field(9180, ge=1, le=65535)
    token_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen_addr(cls, v: str) -> str:
        ipaddress.ip_address(v)
        return v


class DisableSwitch(Strict):
    """The maintenance switch: while the file exists, every VIP of the node is de-preferred (or
    withdrawn), as ExaBGP healthcheck's --disable does. Flipped with touch/rm, no API needed."""

    path: Path | None = Field(None, description="default: run_dir/disable")
    action: Literal["deprefer", "withdraw"] = "deprefer"


class EtcdConfig(Strict):
    """Where a fleet node reads its VIPs (config_source: etcd). See node/fleet/."""

    endpoints: list[str] = Field(..., min_length=1, description="client URLs, e.g. http://10.0.9.1:2379")
    prefix: str = Field("/maglev/", description="key prefix: VIPs under <prefix>config/vips/, nodes under <prefix>nodes/")
    ca_file: Path | None = Field(None, description="CA bundle for https endpoints")
    cert_file: Path | None = Field(None, description="client certificate (etcd --client-cert-auth)")
    key_file: Path | None = None
    username: str | None = Field(None, description="etcd user (etcd auth enabled)")
    password_file: Path | None = Field(None, description="file holding the etcd user's password")
    lease_ttl: int = Field(5, ge=2, le=3600, description="seconds a dead node stays in the registry")
    request_timeout: float = Field(2.0, gt=0, description="seconds before an etcd request counts as failed")
    cache_file: Path = Field(Path("etcd-cache.json"), description="last good VIP set (relative: the state directory)")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.fullmatch(r"https?://[^/\s]+", url.rstrip("/")):
                raise ValueError(f"endpoint {url!r} must be a URL like http://10.0.9.1:2379")
        return [u.rstrip("/") for u in v]

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or not v.endswith("/"):
            raise ValueError(f"prefix {v!r} must start and end with '/' (e.g. /maglev/)")
        return v

    @model_validator(mode="after")
    def _auth_pairs(self) -> "EtcdConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("set both username and password_file, or neither")
        return self


class NodeConfig(Strict):
    node_id: str
    vip_dir: Path
    run_dir: Path = Path("/run/maglev")
    # Unset: $STATE_DIRECTORY / $LOGS_DIRECTORY (systemd), else run_dir (see node/dirs.py).
    state_dir: Path | None = None
    log_dir: Path | None = None
    bgp: BgpConfig
    forwarder: ForwarderConfig
    api: ApiConfig = Field(default_factory=ApiConfig)
    disable: DisableSwitch = Field(default_factory=DisableSwitch)
    warmup: float = Field(10.0, ge=0, description="seconds to wait for every backend's first verdict")
    log_format: Literal["text", "json"] = "text"
    # Where VIPs come from: vip_dir (the default), or etcd for a fleet (the `etcd` section).
    config_source: Literal["directory", "etcd"] = "directory"
    etcd: EtcdConfig | None = None

    @model_validator(mode="after")
    def _source_settings(self) -> "NodeConfig":
        if self.config_source == "etcd" and self.etcd is None:
            raise ValueError("config_source etcd needs an etcd section (endpoints, prefix)")
        return self

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"node_id {v!r} must be letters, digits, '.', '_' or '-'")
        return v


# --------------------------------------------------------------------------------------------
# Loading, and errors operators can act on
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    vip: str | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.vip:
            where += f": vip {self.vip!r}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]):
        if len(problems) > MAX_PROBLEMS:  # 4096 broken backends need not make a 4096-line error
            more = len(problems) - MAX_PROBLEMS
            problems = problems[:MAX_PROBLEMS] + [
                ConfigProblem(problems[MAX_PROBLEMS].file, None, None, f"... and {more} more problem(s)")]
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _problem(source: str, message: str, vip: str | None = None, field: str | None = None) -> ConfigError:
    return ConfigError([ConfigProblem(source, vip, field, message)])


class Deadline:
    """The time budget of one load, checked between files, VIPs and every few thousand YAML
    events: a load that runs out stops itself with a ConfigError instead of running on in its
    worker thread. The limits keep any single step short, so the checks come often enough."""

    def __init__(self, seconds: float, clock=time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.at = clock() + seconds

    def check(self, source: str) -> None:
        if self.clock() > self.at:
            raise _problem(source, f"reading and validating the VIP files took longer than the budget "
                           f"of {self.seconds:g} s; nothing was applied (split or shrink the files)")


def _check_deadline(deadline: Deadline | None, source: str) -> None:
    if deadline is not None:
        deadline.check(source)


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # Discriminated unions add the tag ('http') to the path; it is noise to operators.
            if part in ("tcp", "http", "https", "udp", "dns", "exec") and out.endswith("health_check"):
                continue
            out += ("." if out else "") + str(part)
    return out


def _clean_msg(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _problems_from_validation(exc: ValidationError, file: str, vip: str | None = None) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        msg = _clean_msg(err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/ for every valid key)"
        problems.append(ConfigProblem(file, vip, _loc_to_field(tuple(err["loc"])) or None, msg))
    return problems


def _vip_name_at(item: Any, index: int) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    if isinstance(name, str) and NAME_RE.fullmatch(name):
        return name
    return f"#{index}"


# ---- reading: bounded bytes, strict UTF-8, bounded YAML ------------------------------------

def _yaml_loader() -> type:
    """libyaml's parser when PyYAML was built with it (same results, faster), under PyYAML's
    Python composer: CSafeLoader composes the whole document in C without ever letting another
    thread run, which held the event loop for most of a second beside a big file's read."""
    try:
        from yaml.cyaml import CParser as parser
    except ImportError:  # PyYAML without libyaml
        return yaml.SafeLoader

    class LibyamlSafeLoader(yaml.composer.Composer, parser, yaml.constructor.SafeConstructor,
                            yaml.resolver.Resolver):
        def __init__(self, stream: str) -> None:
            parser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    return LibyamlSafeLoader


YAML_LOADER = _yaml_loader()
# A small file is composed in C too: twice as fast (a 40 KB file of ten VIPs of 100 backends:
# 21 ms against 40 ms here, most of a one-file reload), and it holds the interpreter for a
# few tens of ms at most, not the most of a second of a big file.
SMALL_YAML_BYTES = 64 << 10
SMALL_YAML_LOADER = getattr(yaml, "CSafeLoader", YAML_LOADER)
_RESOLVER = yaml.resolver.Resolver()
_INT_TAG = "tag:yaml.org,2002:int"


def read_config_text(path: Path, limit: int | None = None) -> str:
    """A config file's text: a regular file of at most ``limit`` (MAX_FILE_BYTES) bytes, UTF-8."""
    source = str(path)
    limit = MAX_FILE_BYTES if limit is None else limit
    try:
        # O_NONBLOCK: a FIFO that slipped in under a .yaml name must not block the reader.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _problem(source, "not a regular file")
            if st.st_size > limit:
                raise _problem(source, f"file is {st.st_size} bytes, over the limit of {limit} bytes")
            raw = f.read(limit + 1)
    except OSError as exc:
        raise _problem(source, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise _problem(source, f"file is over the limit of {limit} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _problem(source, f"not valid UTF-8 (line {line}, byte {exc.start}: "
                       f"{raw[exc.start:exc.start + 4]!r}); config files must be UTF-8") from None


def parse_yaml(text: str, source: str, deadline: Deadline | None = None) -> Any:
    """YAML text -> Python data, refusing (with the line) what would make the loader deep,
    huge or slow: nesting past MAX_YAML_DEPTH, more than MAX_YAML_NODES nodes once aliases are
    expanded (the 'billion laughs'), integers longer than MAX_INT_DIGITS."""
    try:
        check_yaml_shape(text, source, deadline)
        if len(text) <= SMALL_YAML_BYTES:
            try:
                return yaml.load(text, Loader=SMALL_YAML_LOADER)
            except yaml.YAMLError:
                pass  # read again below: PyYAML's composer names more (the undefined alias)
        return yaml.load(text, Loader=YAML_LOADER)
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        raise _problem(source, f"invalid YAML: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # e.g. a bad !!timestamp
        raise _problem(source, f"invalid YAML value: {exc}") from None


def check_yaml_shape(text: str, source: str, deadline: Deadline | None = None) -> None:
    """One pass over the YAML events (flat, no recursion) before anything is built."""
    stack: list[list[Any]] = []  # [anchor, expanded size] of each open collection
    anchors: dict[str, int] = {}
    total = 0
    scalar = yaml.ScalarEvent
    for n, event in enumerate(yaml.parse(text, Loader=YAML_LOADER)):
        if n % 4096 == 0:
            _check_deadline(deadline, source)
        if type(event) is scalar:  # most events, first (a fleet file has tens of thousands)
            if len(event.value) > MAX_INT_DIGITS:
                _check_scalar(event, source)
            size = 1
            if event.anchor is not None:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_YAML_DEPTH:
                raise _problem(source, f"line {event.start_mark.line + 1}: nesting deeper than the "
                               f"limit of {MAX_YAML_DEPTH} levels")
            stack.append([event.anchor, 1])
            size = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, done = stack.pop()
            if anchor is not None:
                anchors[anchor] = done
            if stack:
                stack[-1][1] += done
            continue
        elif isinstance(event, yaml.ScalarEvent):  # a subclass, should one ever appear
            _check_scalar(event, source)
            size = 1
            if event.anchor is not None:
                anchors[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = anchors.get(event.anchor, 1)
        else:
            continue
        total += size
        if stack:
            stack[-1][1] += size
        if total > MAX_YAML_NODES:
            raise _problem(source, f"line {event.start_mark.line + 1}: more than {MAX_YAML_NODES} "
                           "YAML nodes (aliases expanded)")


def _check_scalar(event: Any, source: str) -> None:
    value = event.value
    if len(value) <= MAX_INT_DIGITS:
        return
    is_int = event.tag in (_INT_TAG, "!!int") or (
        event.implicit[0] and _RESOLVER.resolve(yaml.ScalarNode, value, (True, False)) == _INT_TAG)
    if is_int:
        raise _problem(source, f"line {event.start_mark.line + 1}: an integer of {len(value)} characters "
                       f"exceeds the limit of {MAX_INT_DIGITS} digits")


def _read_yaml(path: Path, deadline: Deadline | None = None) -> Any:
    return parse_yaml(read_config_text(path), str(path), deadline)


def load_node_file(path: str | Path) -> NodeConfig:
    path = Path(path)
    data = _read_yaml(path)
    return parse_node_object(data, str(path))


def parse_node_object(data: Any, source: str) -> NodeConfig:
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(source, None, None, "a node file must be a mapping")])
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems_from_validation(exc, source)) from None


def parse_vip_file_object(data: Any, source: str, deadline: Deadline | None = None) -> list[VipConfig]:
    """A VIP file's data -> its VIPs. Validated one VIP at a time, so a big file never holds
    the interpreter in one long call (the event loop keeps running beside a worker thread), and
    each problem names its VIP."""
    if data is None:
        return []
    if not isinstance(data, dict) or "vips" not in data:
        raise _problem(source, "a VIP file must be a mapping with a 'vips' list")
    problems = [ConfigProblem(source, None, _loc_to_field((k,)) if isinstance(k, (str, int)) else repr(k),
                              "unknown key (check the spelling; see configs/ for every valid key)")
                for k in data if k != "vips"]
    items = data["vips"]
    if items is None:
        items = []
    if not isinstance(items, list):
        raise _problem(source, "must be a list of VIP objects", field="vips")
    if len(items) > MAX_VIPS:
        raise _problem(source, f"{len(items)} VIPs exceed the limit of {MAX_VIPS} per node", field="vips")
    vips = []
    for i, item in enumerate(items):
        if i % 64 == 0:
            _check_deadline(deadline, source)
        try:
            vips.append(VipConfig.model_validate(item))
        except ValidationError as exc:
            problems.extend(_problems_from_validation(exc, source, _vip_name_at(item, i)))
    problems.extend(_duplicate_problems([(source, v) for v in vips]))
    if problems:
        raise ConfigError(problems)
    return vips


def parse_vip_object(data: Any, source: str = "<api>") -> VipConfig:
    """Validate one VIP object (the HTTP API's PUT body)."""
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(source, None, None, "a VIP must be a JSON/YAML object")])
    return parse_vip_file_object({"vips": [data]}, source)[0]


def load_vip_file(path: str | Path, deadline: Deadline | None = None) -> list[VipConfig]:
    path = Path(path)
    return parse_vip_file_object(_read_yaml(path, deadline), str(path), deadline)


def vip_files(directory: str | Path) -> list[Path]:
    """VIP files in a directory, sorted so every node reads them in the same order."""
    return scan_vip_dir(directory)[0]


def vip_dir_signature(directory: str | Path) -> tuple:
    """What the directory watcher compares once a second to notice an edit: each VIP file's
    name, inode, size and times. One scandir and one stat per file, names compared as
    strings (the Path-based scan cost ~10 ms a second at 100 files, most of a quiet node's
    CPU). () when the directory cannot be listed; an entry that cannot be stat'ed is listed
    with None, so its appearance or repair is noticed too."""
    out = []
    try:
        with os.scandir(directory) as it:
            entries = sorted((e for e in it if e.name.endswith(VIP_FILE_SUFFIXES) and not e.name.startswith(".")),
                             key=lambda e: e.name)
            for e in entries:
                try:
                    st = e.stat()
                    out.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                except OSError:
                    out.append((e.name, None))
    except OSError:
        return ()
    return tuple(out)


def scan_vip_dir(directory: str | Path) -> tuple[list[Path], list[ConfigProblem]]:
    """The directory's VIP files, and warnings an operator should see: entries that look like VIP
    files but are skipped (a directory named x.yaml, a symlink loop or a dangling link, a fifo,
    an entry that cannot be stat'ed), and files any local user may rewrite. Skipping is kept (a
    stray entry must not reject the whole set) but never silent."""
    d = Path(directory)
    files: list[Path] = []
    warnings: list[ConfigProblem] = []
    if d.stat().st_mode & stat.S_IWOTH:
        warnings.append(ConfigProblem(str(d), None, None,
                                      "VIP directory is world-writable: any local user can add a VIP (chmod o-w)"))
    for p in sorted(d.iterdir()):
        if p.suffix not in VIP_FILE_SUFFIXES or p.name.startswith("."):
            continue
        try:
            st = p.stat()
        except OSError as exc:
            warnings.append(ConfigProblem(str(p), None, None, _unstat_reason(p, exc) + ": skipped"))
            continue
        if stat.S_ISDIR(st.st_mode):
            warnings.append(ConfigProblem(str(p), None, None, "is a directory, not a VIP file: skipped"))
        elif not stat.S_ISREG(st.st_mode):
            warnings.append(ConfigProblem(str(p), None, None, "is not a regular file (fifo, socket or device): skipped"))
        else:
            files.append(p)
            if st.st_mode & stat.S_IWOTH:
                warnings.append(ConfigProblem(
                    str(p), None, None,
                    f"is world-writable (mode {stat.S_IMODE(st.st_mode):04o}): any local user can change "
                    "these VIPs (chmod o-w)"))
    return files, warnings


def _unstat_reason(p: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symlink loop"
    if exc.errno == errno.ENOENT and p.is_symlink():
        return f"is a dangling symlink (to {os.readlink(p)})"
    return f"cannot be read ({exc.strerror})"


def vip_dir_warnings(directory: str | Path) -> list[ConfigProblem]:
    try:
        return scan_vip_dir(directory)[1]
    except OSError:
        return []  # the loader reports an unreadable directory as an error


def load_vip_dir(directory: str | Path) -> dict[str, VipConfig]:
    """All VIPs of a directory by name. Any problem in any file rejects the whole set, so a
    half-applied directory never reaches the data path."""
    return {name: vip for name, (_, vip) in load_vip_sources(directory).items()}


def load_vip_sources(directory: str | Path, deadline: Deadline | None = None,
                     skip: Path | None = None) -> dict[str, tuple[Path, VipConfig]]:
    """Like load_vip_dir, with the file each VIP came from (the API edits only its own files).
    ``skip``: leave that file out (the API checks a candidate set with its file replaced)."""
    found, problems = _read_vip_dir(Path(directory), deadline, skip)
    problems.extend(_duplicate_problems(found, skip_same_file=True))
    if problems:
        raise ConfigError(problems)
    return _by_name(found)


class ParsedFiles:
    """The VIPs each file parsed to, by the digest of the file's bytes, so a reload parses and
    validates again only the files that changed (issue 12: re-parsing a thousand VIPs to change
    one backend took 1.4-3 s). Every file is still read in full through the bounded reader and
    the whole set is still validated together (names, addresses, node checks), so what a
    reload accepts is exactly what a cold read would: the same bytes give the same frozen
    VipConfig objects, which also lets the controller see unchanged VIPs by identity.
    Only files that parsed cleanly are kept; files gone from the directory are forgotten."""

    def __init__(self) -> None:
        self._by_path: dict[str, tuple[bytes, list[VipConfig]]] = {}
        self.hits = self.misses = 0

    @staticmethod
    def digest(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def get(self, path: str, digest: bytes) -> list[VipConfig] | None:
        entry = self._by_path.get(path)
        if entry is not None and entry[0] == digest:
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def last(self, path: str) -> list[VipConfig]:
        """What the file parsed to last time it parsed cleanly (any digest)."""
        entry = self._by_path.get(path)
        return entry[1] if entry is not None else []

    def put(self, path: str, digest: bytes, vips: list[VipConfig]) -> None:
        self._by_path[path] = (digest, vips)

    def retain(self, paths: set[str]) -> None:
        for path in self._by_path.keys() - paths:
            del self._by_path[path]


def load_node_vips(directory: str | Path, node: "NodeConfig", deadline: Deadline | None = None,
                   capacity: int | None = None,
                   files: ParsedFiles | None = None) -> dict[str, tuple[Path, VipConfig]]:
    """Exactly what a reload reads and validates: every file, then validate_vip_set over the
    whole set. Raises ConfigError with every problem found. ``files``: reuse what unchanged
    files parsed to last time (see ParsedFiles)."""
    d = Path(directory)
    found, problems = _read_vip_dir(d, deadline, files=files)
    if not problems:
        problems = validate_vip_set(found, node, str(d), capacity)
    if problems:
        raise ConfigError(problems)
    return _by_name(found)


def _by_name(found: list[tuple[str, VipConfig]]) -> dict[str, tuple[Path, VipConfig]]:
    """name -> (its file, VIP); one Path per file, not per VIP (a thousand Path objects cost
    ~20 ms of a reload)."""
    paths: dict[str, Path] = {}
    return {v.name: (paths.get(src) or paths.setdefault(src, Path(src)), v) for src, v in found}


def validate_vip_set(found: list[tuple[str, VipConfig]], node: "NodeConfig", source: str,
                     capacity: int | None = None) -> list[ConfigProblem]:
    """Every check a reload runs over a whole candidate set of already-parsed VIPs, given as
    (source file, VIP) pairs: duplicate names and overlapping addresses across files, the VIP
    count limit, and what this node can serve and announce (capacity included). An empty list
    means a reload of exactly this set would be applied; the API runs it before writing.
    ``capacity``: the open forwarder's tables map size, once it is fixed (None: the node file's)."""
    problems = _duplicate_problems(found)
    if len(found) > MAX_VIPS:
        problems.append(ConfigProblem(source, None, None, f"{len(found)} VIPs exceed the limit of {MAX_VIPS} per node"))
    vips: dict[str, VipConfig] = {}
    for _, vip in found:
        vips.setdefault(vip.name, vip)
    problems.extend(check_vips_for_node(vips, node, source, capacity))
    return problems


def _read_vip_dir(d: Path, deadline: Deadline | None, skip: Path | None = None,
                  files: ParsedFiles | None = None) -> tuple[list[tuple[str, VipConfig]], list[ConfigProblem]]:
    """(source, VIP) of every file, and every file's problems; bounded in files and bytes."""
    if not d.is_dir():
        raise _problem(str(d), "VIP directory does not exist")
    try:
        paths = vip_files(d)
    except OSError as exc:
        raise _problem(str(d), f"cannot list the VIP directory: {exc.strerror or exc}") from None
    if len(paths) > MAX_VIP_FILES:
        raise _problem(str(d), f"{len(paths)} VIP files exceed the limit of {MAX_VIP_FILES}")
    problems: list[ConfigProblem] = []
    found: list[tuple[str, VipConfig]] = []
    total = 0
    for path in paths:
        if path == skip:
            continue
        _check_deadline(deadline, str(path))
        try:
            text = read_config_text(path)
            total += len(text)
            if total > MAX_DIR_BYTES:
                raise _problem(str(path), f"the VIP files together exceed the limit of {MAX_DIR_BYTES} bytes")
            found.extend((str(path), v) for v in _parse_vip_text(text, str(path), deadline, files))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if files is not None:
        files.retain({str(p) for p in paths})
    return found, problems


def _parse_vip_text(text: str, source: str, deadline: Deadline | None,
                    files: ParsedFiles | None) -> list[VipConfig]:
    if files is None:
        return parse_vip_file_object(parse_yaml(text, source, deadline), source, deadline)
    digest = files.digest(text)
    vips = files.get(source, digest)
    if vips is None:
        vips = parse_vip_file_object(parse_yaml(text, source, deadline), source, deadline)
        # The VIPs of the changed file that are equal to what it held before stay the same
        # objects too: editing one VIP of a file of ten re-decides one VIP, not ten.
        before = {v.name: v for v in files.last(source)}
        vips = [before[v.name] if before.get(v.name) == v else v for v in vips]
        files.put(source, digest, vips)
    return vips


# The data path's fixed limits (node/forwarder/bpf/maglev.h: MAX_VIPS, MAX_BACKENDS - 1).
FORWARDER_MAX_VIPS = 4096
FORWARDER_MAX_BACKENDS = 65536


def table_regions(vips) -> list[int]:
    """The regions each VIP keeps in the forwarder's tables array: its table, and with
    second_chance a region of the same size for its entries' previous owners."""
    return [n for v in vips for n in ((v.table_size,) * (2 if v.second_chance else 1))]


def tables_needed(sizes) -> int:
    """Entries the forwarder's tables array needs for these table sizes: every live table, plus
    room to rebuild the largest next to it (several rebuilds reuse that room in turn)."""
    sizes = list(sizes)
    return sum(sizes) + max(sizes, default=0)


def auto_table_capacity(need: int) -> int:
    """forwarder.table_capacity when unset: what the VIPs need and a quarter more (VIPs added
    by a reload), at least 1 Mi entries, in whole 64 Ki-entry steps (4 MiB each)."""
    step = 1 << 16
    return max(1 << 20, -(-(need + need // 4) // step) * step)


def check_vips_for_node(vips: dict[str, "VipConfig"], node: "NodeConfig", source: str,
                        capacity: int | None = None) -> list[ConfigProblem]:
    """VIPs this node could not serve or announce are config errors, caught before anything is
    applied: otherwise every node of the fleet would fail the same way at once (a forwarder that
    cannot encapsulate fails its self-test and withdraws every VIP; a VIP with no BGP session of
    its family is silently never announced)."""
    fwd = node.forwarder
    problems = []
    peer_families = {p.address.version for p in node.bgp.peers}
    for vip in vips.values():
        fam = vip.address.version
        if "prepend" in vip.announce.deprefer.model_fields_set and vip.announce.deprefer.prepend and any(p.peer_as == node.bgp.local_as for p in node.bgp.peers):
            problems.append(ConfigProblem(source, vip.name, "announce.deprefer.prepend",
                                          "AS-path prepends cannot go to an iBGP peer (it drops routes with "
                                          "its own ASN in the path; a node with an iBGP peer sends none); "
                                          "set prepend: 0 and rely on med"))
        if fam == 6 and fwd.encap_source_v6 is None and vip.backends:
            problems.append(ConfigProblem(source, vip.name, "backends",
                                          "IPv6 backends need forwarder.encap_source_v6 in the node file (the GRE outer source)"))
        if fam == 4 and fwd.encap_source_v4 is None and vip.backends:
            problems.append(ConfigProblem(source, vip.name, "backends",
                                          "IPv4 backends need forwarder.encap_source_v4 in the node file (the GRE outer source)"))
        check = vip.health_check
        if check is not None and check.via == "tunnel" and vip.backends:
            src = fwd.encap_source_v4 if fam == 4 else fwd.encap_source_v6
            if src is None:
                problems.append(ConfigProblem(
                    source, vip.name, "health_check.via",
                    f"via: tunnel on an IPv{fam} VIP needs forwarder.encap_source_v{fam} in the node "
                    "file (the GRE outer source, and the address the backend answers the probe at)"))
        if node.bgp.peers and fam not in peer_families:
            problems.append(ConfigProblem(source, vip.name, "address",
                                          f"IPv{fam} VIP but the node has no IPv{fam} BGP peer: it could never be announced"))
    if len(vips) > FORWARDER_MAX_VIPS:
        problems.append(ConfigProblem(source, None, None, f"{len(vips)} VIPs exceed the forwarder's limit of "
                                      f"{FORWARDER_MAX_VIPS} (MAX_VIPS in maglev.h)"))
    pairs = sum(len(v.all_backends) for v in vips.values())
    if pairs > FORWARDER_MAX_BACKENDS:
        problems.append(ConfigProblem(source, None, None,
                                      f"{pairs} VIP backends in all exceed the forwarder's limit of "
                                      f"{FORWARDER_MAX_BACKENDS} VIP-backend pairs (MAX_BACKENDS in maglev.h)"))
    capacity = fwd.table_capacity if capacity is None else capacity
    need = tables_needed(table_regions(vips.values()))
    if capacity is not None and need > capacity:
        biggest = sorted(vips.values(), key=lambda v: -v.table_size)[:3]
        where = ("forwarder.table_capacity is" if fwd.table_capacity is not None else
                 "the tables map (sized from the VIPs at start) holds")
        problems.append(ConfigProblem(
            source, None, "table_size",
            f"the VIPs' tables need {need} entries (every table_size, twice with second_chance, plus the largest once to "
            "rebuild in; largest: " + ", ".join(f"{v.name} {v.table_size}" for v in biggest)
            + f") but {where} {capacity}: raise forwarder.table_capacity in the node file (or, "
            "unset, restart the node: it sizes the map from the VIPs again), or use smaller tables"))
    return problems


def check_vip_set(found: list[tuple[str, VipConfig]]) -> list[ConfigProblem]:
    """Duplicate names and overlapping (address, protocol, port) across already-valid VIPs from
    several sources."""
    return _duplicate_problems(found, skip_same_file=False)


def _duplicate_problems(
    found: list[tuple[str, VipConfig]], skip_same_file: bool = False
) -> list[ConfigProblem]:
    problems = []
    by_name: dict[str, str] = {}
    by_identity: dict[tuple[str, str, int | str], tuple[str, str]] = {}
    for source, vip in found:
        if vip.name in by_name and not (skip_same_file and by_name[vip.name] == source):
            problems.append(
                ConfigProblem(source, vip.name, "name", f"duplicate VIP name, also defined in {by_name[vip.name]}")
            )
        by_name.setdefault(vip.name, source)
        clash = _identity_clash(vip, by_identity)
        if clash and not (skip_same_file and clash[0] == source):
            other_src, other_name = clash
            problems.append(
                ConfigProblem(
                    source,
                    vip.name,
                    "address",
                    f"{vip.protocol} {vip.address} port {vip.port} overlaps VIP {other_name!r} in {other_src}",
                )
            )
        by_identity.setdefault(vip.identity, (source, vip.name))
    return problems


def _identity_clash(
    vip: VipConfig, seen: dict[tuple[str, str, int | str], tuple[str, str]]
) -> tuple[str, str] | None:
    """An 'all ports' VIP overlaps every port of the same address and protocol, and the other way
    round: the data path could not tell which one a packet belongs to."""
    addr, proto, port = vip.identity
    if (addr, proto, port) in seen:
        return seen[(addr, proto, port)]
    if port != "all":  # one lookup, not a scan: a thousand VIPs are checked on every reload
        return seen.get((addr, proto, "all"))
    for (a, p, o), where in seen.items():
        if a == addr and p == proto and (o == "all" or port == "all"):
            return where
    return None
