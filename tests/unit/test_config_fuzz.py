"""Fuzzing the config loader: whatever the bytes or the structure, loading ends in a valid
config or a ConfigError whose problems name the file, never in another exception, and it ends
(hypothesis' deadline below is a hang guard, 1000x the usual time, not a performance check).
Structured inputs mutate a valid VIP file field by field with hostile values; raw inputs are
arbitrary bytes and YAML-ish text. The pathological cases of issue 11 are explicit examples."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node.config import ConfigError, VipConfig, load_node_vips, load_vip_file, parse_node_object, parse_vip_object

REPO = Path(__file__).resolve().parents[2]
NODE = yaml.safe_load((REPO / "configs/node.yaml").read_text())
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VIP = {
    "name": "web", "address": "10.100.0.1", "protocol": "tcp", "port": 80, "table_size": 251,
    "backends": [{"address": "10.0.1.1", "port": 8080, "weight": 2, "state": "active", "hash_key": "a"},
                 {"address": "10.0.1.2"}],
    "health_check": {"type": "http", "path": "/healthz", "interval": 2, "timeout": 1, "rise": 2,
                     "fall": 3, "expect_status": ["200-399"], "body_regex": "ok"},
    "announce": {"min_healthy": 1, "med": 10, "communities": ["65000:1"]},
}

hostile_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**18, max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["all", "tcp", "udp", "http", "exec", "::1", "10.0.0.1", "fd00::1", "300.1.1.1",
                     "200-399", "99999", "-1", "0", "1e400", "2305843009213693951", "(", "[", "é\n", ""]),
)
hostile = st.recursive(hostile_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)

PATHS = [("name",), ("address",), ("protocol",), ("port",), ("table_size",), ("backends",),
         ("backends", 0), ("backends", 0, "address"), ("backends", 0, "port"), ("backends", 0, "weight"),
         ("backends", 1, "state"), ("health_check",), ("health_check", "type"), ("health_check", "interval"),
         ("health_check", "timeout"), ("health_check", "expect_status"), ("health_check", "body_regex"),
         ("announce",), ("announce", "med"), ("announce", "communities"), ("bogus",)]


def mutate(changes) -> dict:
    """VIP with each (path, value) of ``changes`` set where the path still exists."""
    data = copy.deepcopy(VIP)
    for path, value in changes:
        node = data
        for part in path[:-1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        last = path[-1]
        if isinstance(node, dict) and isinstance(last, str):
            node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
    return data


def loads_cleanly(directory: Path, name: str = "f.yaml") -> None:
    """The whole reload path: a valid set, or a ConfigError naming the file (or directory)."""
    node = parse_node_object({**NODE, "vip_dir": str(directory)}, "node.yaml")
    try:
        vips = load_node_vips(directory, node)
    except ConfigError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.message and p.file.startswith(str(directory)), p
        return
    assert all(isinstance(v, VipConfig) for _, v in vips.values())


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(PATHS), hostile), min_size=1, max_size=4))
def test_structured_mutations_of_a_valid_file(tmp_path_factory, changes):
    d = tmp_path_factory.mktemp("vips")
    (d / "f.yaml").write_text(yaml.safe_dump({"vips": [mutate(changes)]}))
    loads_cleanly(d)
    try:  # the API's path: the same object as parsed JSON
        parse_vip_object(mutate(changes), "<api>")
    except ConfigError:
        pass


@FUZZ
@given(data=hostile)
def test_arbitrary_structures(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("vips")
    (d / "f.yaml").write_text(yaml.safe_dump(data))
    loads_cleanly(d)
    (d / "f.yaml").write_text(yaml.safe_dump({"vips": [data]}))
    loads_cleanly(d)


@FUZZ
@given(raw=st.binary(max_size=600))
@example(raw=b"vips:\n  - name: caf\xe9\n")
@example(raw=b"vips: " + b"[" * 20000 + b"]" * 20000)
@example(raw=b"vips:\n" + b"".join(b"  " * i + b"- \n" for i in range(20000)))
@example(raw=b"vips:\n  - {name: web, address: 10.100.0.1, port: " + b"9" * 5000 + b"}\n")
@example(raw=b"vips:\n  - {name: web, address: 10.100.0.1, port: 80, table_size: 2305843009213693951}\n")
@example(raw=b"a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
         b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
         b"g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\nvips: [*g]\n")
@example(raw=b"vips:\n  - when: 2001-13-45\n")
@example(raw=b"\x00\x01vips")
@example(raw=b"vips: !!python/object:os.system ls\n")
@example(raw=b"? [a, b]\n: c\n")
def test_raw_bytes(tmp_path_factory, raw):
    d = tmp_path_factory.mktemp("vips")
    (d / "f.yaml").write_bytes(raw)
    loads_cleanly(d)


yamlish = st.text(alphabet=st.sampled_from(list("vips:-[]{}&*!|>'\"#,?\n 0123456789.aenw\\t%@`")), max_size=300)


@FUZZ
@given(text=yamlish)
def test_yaml_like_text(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("vips")
    (d / "f.yaml").write_text("vips:\n" + text)
    loads_cleanly(d)


def test_a_single_file_loader_says_why_for_each_pathology(tmp_path):
    cases = {
        b"vips:\n  - name: caf\xe9\n": "not valid UTF-8",
        b"vips:\n  - {name: web, address: 10.100.0.1, port: " + b"9" * 5000 + b"}\n": "exceeds the limit of 20 digits",
        b"vips:\n  - {name: web, address: 10.100.0.1, port: 80, table_size: 2305843009213693951}\n":
            "table_size: table_size 2305843009213693951 exceeds the maximum of 16777216",
    }
    for raw, why in cases.items():
        f = tmp_path / "f.yaml"
        f.write_bytes(raw)
        try:
            load_vip_file(f)
        except ConfigError as exc:
            assert why in str(exc), (raw[:60], str(exc))
        else:
            raise AssertionError(f"accepted {raw[:60]!r}")
