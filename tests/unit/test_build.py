"""node.forwarder.build, the one BPF builder: every object it lists compiles from bpf/, the lab's
XDP_PASS program included, and its cache goes where a read-only home leaves room."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from node.forwarder import build

REPO = Path(__file__).resolve().parents[2]
CLANG_COMMAND = re.compile(r'[\[(]\s*"clang"\s*,\s*"-')  # an argv that runs clang with flags


def test_every_object_has_its_source_in_bpf_and_no_other_clang_runs_in_the_project():
    for name, (src, _) in build.OBJECTS.items():
        assert (build.BPF_DIR / f"{src}.c").is_file(), name
    assert "xdp_pass" in build.OBJECTS
    offenders = [str(p.relative_to(REPO)) for top in ("node", "lab", "bgp", "healthcheck", "bench")
                 for p in (REPO / top).rglob("*.py")
                 if p.name != "build.py" and CLANG_COMMAND.search(p.read_text())]
    assert offenders == []


def test_the_xdp_pass_object_builds_with_an_xdp_section(tmp_path):
    obj = build.build("xdp_pass", tmp_path)
    out = subprocess.run(["llvm-objdump", "-h", str(obj)], capture_output=True, text=True, check=True).stdout
    names = {parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) > 2 and parts[0].isdigit()}
    assert {"xdp", "license"} <= names, out
    assert build.build("xdp_pass", tmp_path) == obj  # cached: same source, same object


def test_cache_location_follows_the_environment(monkeypatch):
    assert build.default_cache({"MAGLEV_BPF_CACHE": "/x", "CACHE_DIRECTORY": "/var/cache/maglev"}) == Path("/x")
    assert build.default_cache({"CACHE_DIRECTORY": "/var/cache/maglev"}) == Path("/var/cache/maglev/bpf")
    monkeypatch.setenv("HOME", "/home/op")
    assert build.default_cache({}) == Path("/home/op/.cache/maglev-bpf")


def test_an_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(build.BuildError, match="cannot write the BPF object cache .*MAGLEV_BPF_CACHE"):
        build.build("xdp_pass", blocker / "cache")
