"""Build the forwarder's BPF objects with clang.

Objects are cached by a hash of their sources (the .c file and every header in bpf/) plus the
compiler command, so the first use after a change rebuilds and every later one is free.
``python -m node.forwarder.build`` builds all of them (the Makefile's ``bpf`` target).
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
# xdp_lb: the forwarder; xdp_floor: the bench's floor; decap: the backend's tc GRE decapsulation
# (bpf/decap.c, owned by the backend side; built here when present).
PROGRAMS = ("xdp_lb", "xdp_floor", "decap")
DEFAULT_CACHE = Path(os.environ.get("MAGLEV_BPF_CACHE", Path.home() / ".cache" / "maglev-bpf"))


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


def _command(src: Path, out: Path) -> list[str]:
    return ["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-Wno-unused-function",
            f"-I{_arch_include()}", f"-I{BPF_DIR}", "-c", str(src), "-o", str(out)]


def source_digest(name: str) -> str:
    """Hash of everything that goes into ``name``.o: its source, every header, the command."""
    h = hashlib.sha256()
    for path in [BPF_DIR / f"{name}.c", *sorted(BPF_DIR.glob("*.h"))]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(_command(Path("src"), Path("out"))).encode())
    return h.hexdigest()[:20]


def build(name: str = "xdp_lb", cache_dir: Path | None = None) -> Path:
    """Return the path of ``name``.o, compiling it if its sources changed."""
    if name not in PROGRAMS:
        raise BuildError(f"unknown BPF program {name!r}; known: {', '.join(PROGRAMS)}")
    cache = Path(cache_dir or DEFAULT_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{name}-{source_digest(name)}.o"
    if out.exists():
        return out
    if shutil.which("clang") is None:
        raise BuildError("clang is not installed; install clang, llvm and libbpf-dev (make deps)")
    # Compile to a temporary name and rename, so concurrent builders never see half a file.
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".o.tmp")
    os.close(fd)
    proc = subprocess.run(_command(BPF_DIR / f"{name}.c", Path(tmp)), capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"clang failed to build {name}.c:\n{proc.stderr.strip()}")
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    for name in PROGRAMS:
        if not (BPF_DIR / f"{name}.c").exists():
            continue
        try:
            print(f"{name}: {build(name)}")
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
