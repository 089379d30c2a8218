"""Build the forwarder's BPF objects with clang.

Objects are cached by a hash of their sources (the .c file and every header in bpf/) plus the
compiler command (flags included), so the first use after a change rebuilds and every later one
is free. One source may give several objects: xdp_lb.c builds ``xdp_lb`` (conntrack in the
kernel's LRU hash, the default) and ``xdp_lb_direct`` (-DCT_DIRECT: a direct-mapped array; see
bpf/maglev.h).
``python -m node.forwarder.build`` builds all of them (the Makefile's ``bpf`` target). This is
the project's only BPF build: the lab's XDP_PASS program (bpf/xdp_pass.c) is built here too, so
every object gets the same include paths (Debian's multiarch asm/ headers) and flags.
The cache lives in $MAGLEV_BPF_CACHE, else $CACHE_DIRECTORY/bpf (systemd's CacheDirectory=,
the unit's home being read-only), else ~/.cache/maglev-bpf.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent / "bpf"
# object name -> (source in bpf/ without .c, extra clang flags).
# xdp_lb / xdp_lb_direct: the forwarder with each conntrack design (forwarder.conntrack "lru" /
# "direct"); xdp_floor: the bench's floor; decap: the backend's tc GRE decapsulation
# (bpf/decap.c, owned by the backend side); hc_tunnel: the node's probe encapsulation
# (bpf/hc_tunnel.c, tunnel health checks); xdp_pass: the trivial program the lab puts on the
# veth peers of nodes (native XDP_TX needs an XDP program on the receiving side).
OBJECTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "xdp_lb": ("xdp_lb", ()),
    "xdp_lb_direct": ("xdp_lb", ("-DCT_DIRECT",)),
    # "lru" with per-CPU LRU lists (BPF_F_NO_COMMON_LRU), the design before the shared LRU:
    # built only so bench/forwarder.py can show the choice, never loaded by the node
    "xdp_lb_percpu_lru": ("xdp_lb", ("-DCT_LRU_PERCPU",)),
    "xdp_floor": ("xdp_floor", ()),
    "decap": ("decap", ()),
    # the node's tunnel health checks: GRE for its own probe packets (tc egress, hc_tunnel.c)
    "hc_tunnel": ("hc_tunnel", ()),
    "xdp_pass": ("xdp_pass", ()),
}
PROGRAMS = tuple(OBJECTS)
# the forwarder object for each forwarder.conntrack setting
FORWARDER_OBJECTS = {"lru": "xdp_lb", "direct": "xdp_lb_direct"}


def default_cache(env=os.environ) -> Path:
    """$MAGLEV_BPF_CACHE; else systemd's $CACHE_DIRECTORY (CacheDirectory=maglev, the unit's
    home is read-only); else ~/.cache/maglev-bpf."""
    if env.get("MAGLEV_BPF_CACHE"):
        return Path(env["MAGLEV_BPF_CACHE"])
    if env.get("CACHE_DIRECTORY", "").startswith("/"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0]) / "bpf"
    return Path.home() / ".cache" / "maglev-bpf"


DEFAULT_CACHE = default_cache()


class BuildError(RuntimeError):
    """clang is missing or refused the source; the message carries clang's output."""


@lru_cache(maxsize=1)
def _arch_include() -> str:
    # Debian keeps asm/types.h under the multiarch directory, which clang -target bpf does not
    # search by itself.
    try:
        triple = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        triple = f"{os.uname().machine}-linux-gnu"
    return f"/usr/include/{triple}"


def _command(src: Path, out: Path, flags: tuple[str, ...] = ()) -> list[str]:
    return ["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Wno-unused-function", *flags,
            f"-I{_arch_include()}", f"-I{BPF_DIR}", "-c", str(src), "-o", str(out)]


def source_digest(name: str) -> str:
    """Hash of everything that goes into ``name``.o: its source, every header, the command
    with its flags (so two objects of one source never share a cache entry)."""
    src, flags = OBJECTS[name]
    h = hashlib.sha256()
    for path in [BPF_DIR / f"{src}.c", *sorted(BPF_DIR.glob("*.h"))]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(_command(Path("src"), Path("out"), flags)).encode())
    return h.hexdigest()[:20]


def build(name: str = "xdp_lb", cache_dir: Path | None = None) -> Path:
    """Return the path of ``name``.o, compiling it if its sources changed."""
    if name not in OBJECTS:
        raise BuildError(f"unknown BPF program {name!r}; known: {', '.join(OBJECTS)}")
    src, flags = OBJECTS[name]
    cache = Path(cache_dir or DEFAULT_CACHE)
    out = cache / f"{name}-{source_digest(name)}.o"
    if out.exists():
        return out
    if shutil.which("clang") is None:
        raise BuildError("clang is not installed; install clang, llvm and libbpf-dev (make deps)")
    # Compile to a temporary name and rename, so concurrent builders never see half a file.
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".o.tmp")
    except OSError as exc:
        raise BuildError(f"cannot write the BPF object cache {cache}: {exc.strerror}; set MAGLEV_BPF_CACHE "
                         "to a writable directory (the systemd unit uses CacheDirectory=)") from None
    os.close(fd)
    proc = subprocess.run(_command(BPF_DIR / f"{src}.c", Path(tmp), flags), capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        what = f"{src}.c" + (f" ({' '.join(flags)})" if flags else "")
        raise BuildError(f"clang failed to build {what}:\n{proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    for name, (src, _) in OBJECTS.items():
        try:
            print(f"{name}: {build(name)}")
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
