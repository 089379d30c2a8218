"""The Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4), with Envoy-style weights.

Pure: no I/O, no clock, no randomness. Every node, every run and every future version must build
the same table from the same backends, because during a rolling upgrade or on ECMP re-hashing
two nodes that disagree send one connection to two backends. So the algorithm below is frozen:

- backend keys are sorted (Python's str ordering, i.e. by code point);
- ``offset = xxh64(key, seed=0) % M`` and ``skip = xxh64(key, seed=1) % (M - 1) + 1``, with the key
  encoded as UTF-8; backend i's preference list is ``(offset + j * skip) % M`` for j = 0, 1, ...;
- weights are normalised to fractions ``w`` of their (exactly rounded, ``math.fsum``) sum;
- population: in iteration i = 1, 2, ... each backend in key order takes a turn unless
  ``i * w < target``; a turn claims its next free preferred slot and adds the largest
  normalised weight to its ``target`` (which starts at 0). The heaviest backend therefore takes
  every turn, a backend with a third of its weight every third, and every backend gets at least
  one entry. With equal weights every backend takes every turn: the paper's algorithm.
  Population stops the moment the table is full, even in the middle of an iteration.

The float arithmetic of the turn rule is IEEE double in both the C extension and Python, with
the same expressions in the same order, so the two paths produce identical tables; a test checks
that on many random inputs.

Public API: ``build_table(weights, size=65537) -> MaglevTable``; ``populate(params, weights,
size) -> list[int]`` (the population step alone, for tests that inject the paper's offsets and
skips); ``permutation_params(key, size) -> (offset, skip)``.
"""

from __future__ import annotations

import hashlib
import math
import struct
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

try:  # The C population loop; the pure-Python one below gives the same result, only slower.
    from node import _maglev as _ext
except ImportError:  # pragma: no cover - exercised when the extension was not built
    _ext = None

DEFAULT_SIZE = 65537
# Changing anything above (hashes, seeds, order, turn rule) changes every table: bump this and
# say so loudly in the release notes. It is part of the digest so mixed versions show up.
ALGORITHM_VERSION = 1
_EMPTY = 0xFFFFFFFF  # the C loop's free-slot marker, so table sizes must stay below it

if array("I").itemsize != 4:  # pragma: no cover - the C loop hands back uint32s
    _ext = None
HAVE_EXTENSION = _ext is not None


@dataclass(frozen=True)
class MaglevTable:
    """A populated table. ``entries[j]`` indexes ``backends``; a flow with hash h goes to
    ``backends[entries[h % size]]``."""

    size: int
    backends: tuple[str, ...]
    # array of `size` backend indexes, typecode B, H or I (entry_typecode; empty without
    # backends); it supports the buffer protocol for the forwarder's map update. Treat it as
    # read-only: the digest is cached.
    entries: Sequence[int] = field(repr=False)
    weights: tuple[float, ...] = field(default=())  # normalised, aligned with `backends`
    _digest: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"MaglevTable(size={self.size}, backends={len(self.backends)}, digest={self.digest()})"

    def lookup(self, hash_value: int) -> str | None:
        """The backend key for a flow hash, or None when the table has no backends."""
        if not self.backends:
            return None
        return self.backends[self.entries[hash_value % self.size]]

    def counts(self) -> dict[str, int]:
        """Entries per backend key (every backend has at least one)."""
        if _ext is not None and isinstance(self.entries, array) and self.entries.typecode in "BHI":
            return dict(zip(self.backends, _ext.counts(self.entries, len(self.backends))))
        tally = [0] * len(self.backends)
        for idx in self.entries:
            tally[idx] += 1
        return dict(zip(self.backends, tally))

    def shares(self) -> dict[str, float]:
        """Fraction of the table (hence of new flows) each backend receives."""
        return {k: c / self.size for k, c in self.counts().items()}

    def expected_shares(self) -> dict[str, float]:
        """Fraction each backend should receive according to its weight."""
        return dict(zip(self.backends, self.weights))

    def digest(self) -> str:
        """16 hex characters identifying size, backend keys and entries; equal on every node that
        built the same table, so operators and the controller can compare nodes cheaply.
        Computed once: the table is immutable and callers ask often."""
        if not self._digest:
            self._digest.append(self._compute_digest())
        return self._digest[0]

    def _compute_digest(self) -> str:
        h = hashlib.sha256()
        h.update(b"maglev-lb table v%d\0" % ALGORITHM_VERSION)
        h.update(struct.pack("<QQ", self.size, len(self.backends)))
        for key in self.backends:
            raw = key.encode("utf-8")
            h.update(struct.pack("<Q", len(raw)))
            h.update(raw)
        h.update(entries_bytes(self.entries))
        return h.hexdigest()[:16]


    def entry_keys(self) -> list[str]:
        """The backend key of every entry."""
        return [self.backends[i] for i in self.entries] if self.backends else []


@dataclass(frozen=True, repr=False)
class StopGapTable(MaglevTable):
    """A table whose pool lost backends (``gone``) since it was built: each of their entries
    goes to the backend of the next entry (cyclically) that remains. It is a pure function of
    the exact table and ``gone``, so every node computes the same one; it stands in, for as
    long as the exact table of the smaller pool takes to build, and moves no flow of a
    remaining backend. ``backends``/``entries`` are the exact table's (the forwarder writes
    them through node._maglev.write_ids, which applies the rule)."""

    gone: frozenset[str] = frozenset()
    base_digest: str = ""  # the exact table's

    @classmethod
    def of(cls, table: MaglevTable, gone: set[str]) -> "StopGapTable":
        gone = frozenset(gone) | getattr(table, "gone", frozenset())
        base = getattr(table, "base_digest", "") or table.digest()
        return cls(size=table.size, backends=table.backends, entries=table.entries,
                   weights=table.weights, gone=gone, base_digest=base)

    def __repr__(self) -> str:
        return f"StopGapTable(size={self.size}, gone={sorted(self.gone)}, digest={self.digest()})"

    def entry_keys(self) -> list[str]:
        keys = [None if k in self.gone else k for k in self.backends]
        return fill_gone([keys[i] for i in self.entries])

    def lookup(self, hash_value: int) -> str | None:
        keys = self.entry_keys()
        return keys[hash_value % self.size] if keys else None

    def counts(self) -> dict[str, int]:
        tally: dict[str, int] = {k: 0 for k in self.backends if k not in self.gone}
        for k in self.entry_keys():
            tally[k] += 1
        return tally

    def expected_shares(self) -> dict[str, float]:
        kept = {k: w for k, w in zip(self.backends, self.weights) if k not in self.gone}
        total = math.fsum(kept.values())
        return {k: w / total for k, w in kept.items()}

    def _compute_digest(self) -> str:
        h = hashlib.sha256(b"stop-gap\0" + self.base_digest.encode())
        for key in sorted(self.gone):
            h.update(key.encode("utf-8") + b"\0")
        return h.hexdigest()[:16]


def fill_gone(out: list, gone: Any = None) -> list:
    """The stop-gap rule, in place: each entry equal to ``gone`` (a backend that left) takes
    the value of the next entry (cyclically) that is not, so the result is a pure function of
    the old table. node._maglev.write_ids applies the same rule to backend ids in C."""
    nxt = next((x for x in out if x != gone), gone)
    for j in range(len(out) - 1, -1, -1):
        if out[j] == gone:
            out[j] = nxt
        else:
            nxt = out[j]
    return out


def entries_bytes(entries: Sequence[int]) -> bytes:
    """Entries as little-endian uint32, independent of the host's byte order."""
    if isinstance(entries, array) and entries.typecode in "BH" and _ext is not None:
        arr = array("I")
        arr.frombytes(_ext.widen(entries))
    else:
        arr = entries if isinstance(entries, array) and entries.typecode == "I" else array("I", entries)
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
        arr = array("I", arr)
        arr.byteswap()
    return arr.tobytes()


# Miller-Rabin with these bases is exact for every n below 3.3 * 10^24 (Sorenson and Webster,
# 2015), far above any table size, so is_prime is deterministic and takes microseconds even
# for 2^61 - 1, where trial division took minutes.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
_MR_EXACT_BELOW = 3_317_044_064_679_887_385_961_981


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact below 3.3e24; larger n are refused as too big)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    if n >= _MR_EXACT_BELOW:
        raise ValueError(f"{n} is too large for an exact primality test")
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def permutation_params(key: str, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend key for table size M; skip is in 1..M-1, so with M prime the
    preference list visits every slot exactly once."""
    raw = key.encode("utf-8")
    offset = xxhash.xxh64_intdigest(raw, seed=0) % size
    skip = xxhash.xxh64_intdigest(raw, seed=1) % (size - 1) + 1
    return offset, skip


def normalise(weights: Sequence[float]) -> list[float]:
    """Weights as fractions of their sum. fsum is exactly rounded, so the result does not depend
    on summation order or on the Python version (3.12 changed the built-in sum of floats)."""
    total = math.fsum(weights)
    return [w / total for w in weights]


def _check(weights: Mapping[str, float], size: int) -> tuple[list[str], list[float]]:
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"table size must be an integer, not {size!r}")
    if not is_prime(size):
        raise ValueError(f"table size {size} is not prime; Maglev needs a prime size (e.g. 65537 or 655373)")
    if size >= _EMPTY:
        raise ValueError(f"table size {size} is too large (must be below {_EMPTY})")
    if len(weights) > size:
        raise ValueError(
            f"table size {size} is smaller than the number of backends ({len(weights)}); "
            "every backend needs at least one entry"
        )
    keys = sorted(weights)
    values: list[float] = []
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ValueError(f"backend key {key!r} must be a non-empty string")
        w = weights[key]
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ValueError(f"backend {key!r}: weight {w!r} is not a number")
        w = float(w)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"backend {key!r}: weight {w!r} must be a finite number > 0")
        values.append(w)
    return keys, values


def build_table(weights: Mapping[str, float], size: int = DEFAULT_SIZE) -> MaglevTable:
    """Build the table for backend key -> weight (> 0). Raises ValueError for a non-prime size,
    a size below the backend count, or a bad weight. No backends: an empty table."""
    keys, values = _check(weights, size)
    if not keys:
        return MaglevTable(size=size, backends=(), entries=array("I"), weights=())
    norm = normalise(values)
    params = [permutation_params(k, size) for k in keys]
    return MaglevTable(size=size, backends=tuple(keys), entries=_populate_array(params, norm, size),
                       weights=tuple(norm))


def entry_typecode(nbackends: int) -> str:
    """The narrowest array type for a table's backend indexes: a thousand VIPs' tables are
    held in memory, and most pools have far fewer than 256 backends (64 KiB per 65537-entry
    table instead of 256 KiB)."""
    return "B" if nbackends <= 0xFF else "H" if nbackends <= 0xFFFF else "I"


def _populate_array(params: Sequence[tuple[int, int]], norm: Sequence[float], size: int) -> array:
    code = entry_typecode(len(params))
    out = array(code)
    if _ext is not None:
        offsets = array("Q", (o for o, _ in params))
        skips = array("Q", (s for _, s in params))
        wide = array("I")
        wide.frombytes(_ext.populate(offsets, skips, array("d", norm), max(norm), size))
        out.frombytes(_ext.narrow(wide, out.itemsize))
        return out
    out.extend(_populate_python(params, norm, size))
    return out


def populate(params: Sequence[tuple[int, int]], weights: Sequence[float], size: int) -> list[int]:
    """The population step alone: ``params[i]`` is backend i's (offset, skip), ``weights[i]``
    its normalised weight. Returns ``size`` backend indexes. Uses the C loop when built."""
    if not params:
        return []
    if len(params) != len(weights) or len(params) > size:
        raise ValueError("need one weight per backend and no more backends than slots")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError("normalised weights must be finite numbers > 0")
    return list(_populate_array(params, weights, size))


def _populate_python(params: Sequence[tuple[int, int]], weights: Sequence[float], size: int) -> list[int]:
    """Pure-Python population, the fallback when the C extension is missing. It walks each
    backend's preference list incrementally (pos += skip) instead of multiplying; same slots."""
    n = len(params)
    table = [-1] * size
    pos = [o for o, _ in params]
    skips = [s for _, s in params]
    target = [0.0] * n
    max_w = max(weights)
    filled = 0
    iteration = 0
    while True:
        iteration += 1
        for i in range(n):
            if iteration * weights[i] < target[i]:
                continue
            target[i] += max_w
            c = pos[i]
            skip = skips[i]
            while table[c] >= 0:
                c += skip
                if c >= size:
                    c -= size
            table[c] = i
            c += skip
            pos[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return table


def _build_reference(weights: Mapping[str, float], size: int = DEFAULT_SIZE) -> MaglevTable:
    """The paper's pseudocode (Listing 1) written out plainly, with next[] and the permutation
    computed as (offset + next * skip) % M: the baseline for the speed target and the oracle
    for the equivalence tests. Not used in production."""
    keys, values = _check(weights, size)
    if not keys:
        return MaglevTable(size=size, backends=(), entries=array("I"), weights=())
    norm = normalise(values)
    params = [permutation_params(k, size) for k in keys]
    return MaglevTable(size=size, backends=tuple(keys),
                       entries=array("I", _populate_reference(params, norm, size)), weights=tuple(norm))


def _populate_reference(params: Sequence[tuple[int, int]], weights: Sequence[float], size: int) -> list[int]:
    n = len(params)
    nxt = [0] * n
    entry = [-1] * size
    target = [0.0] * n
    max_w = max(weights)
    filled = 0
    iteration = 1
    while True:
        for i in range(n):
            if iteration * weights[i] < target[i]:
                continue
            target[i] = target[i] + max_w
            offset, skip = params[i]
            c = (offset + nxt[i] * skip) % size
            while entry[c] >= 0:
                nxt[i] = nxt[i] + 1
                c = (offset + nxt[i] * skip) % size
            entry[c] = i
            nxt[i] = nxt[i] + 1
            filled = filled + 1
            if filled == size:
                return entry
        iteration = iteration + 1
