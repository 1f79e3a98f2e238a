"""Bounded fuzzing of the footer, TOC and tar parsers (complements tests/format/test_fuzz.py).

The targets are in ``fuzz_targets``.  Hypothesis feeds them random bytes,
byte-level mutations of real inputs (flips, truncations, insertions) and
structure-aware hostile input (deep JSON, huge numbers, surrogates, NUL,
hostile tar headers); with atheris installed, libFuzzer runs each target for
a few seconds too.  ``RELIABILITY_FUZZ_SECONDS`` (default 20) is the atheris
budget for all targets together; the hypothesis part is bounded by example
counts (about 20 s on two cores).
"""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from . import fuzz_targets as ft

FUZZ_SECONDS = float(os.environ.get("RELIABILITY_FUZZ_SECONDS", "20"))
SETTINGS = settings(deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEDS = {name: ft.seeds(name) for name in ft.TARGETS}


def fuzz(examples):
    return settings(SETTINGS, max_examples=examples)


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == 0:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == 1:
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == 2:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        else:
            value = draw(st.sampled_from([b"0", b"9" * 30, b"-1", b"\xff", b"\x00", b"{",
                                          b"[" * 50, b'"..', b"/", b"\\ud800"]))
            data[pos:pos + len(value)] = value
    return bytes(data)


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_mutations_of_real_input(name):
    examples = {"tar_input": 800, "blob": 1500}.get(name, 2000)

    @fuzz(examples)
    @given(mutated(SEEDS[name]))
    def run(data):
        ft.TARGETS[name](data)

    run()


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_random_bytes(name):
    @fuzz(1000)
    @given(st.binary(max_size=2048))
    def run(data):
        ft.TARGETS[name](data)

    run()


# structure-aware hostile TOCs ---------------------------------------------------

hostile_name = st.one_of(
    st.sampled_from(["..", "../..", "/", "//x", "./../a", "a/./b/../../..", ".", "a\x00b",
                     "\udcff", "\ud800x", "x" * 256, "/".join(["d"] * 2100), "a//b",
                     ".wh..wh..opq", ".wh.a", "stargz.index.json", ".prefetch.landmark"]),
    st.text(max_size=12))
number = st.one_of(st.integers(-3, 70000), st.sampled_from([1 << 31, 1 << 32, 1 << 63, 1 << 64,
                                                            1 << 100]),
                   st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none())


@st.composite
def hostile_entry(draw):
    e = {"name": draw(hostile_name),
         "type": draw(st.sampled_from(["reg", "dir", "symlink", "hardlink", "chunk", "char",
                                       "block", "fifo", "bogus"]))}
    for key in draw(st.lists(st.sampled_from(["size", "offset", "chunkOffset", "chunkSize",
                                              "innerOffset", "uid", "gid", "mode", "devMajor",
                                              "devMinor"]), max_size=5)):
        e[key] = draw(number)
    if draw(st.booleans()):
        e["linkName"] = draw(hostile_name)
    if draw(st.integers(0, 5)) == 0:
        e["xattrs"] = draw(st.dictionaries(st.sampled_from(["", "user.a", "a\x00b", "x" * 300,
                                                            "security.capability"]),
                                           st.sampled_from(["", "eQ==", "!!", "A" * 8]),
                                           max_size=2))
    if draw(st.integers(0, 4)) == 0:
        e["digest"] = draw(st.sampled_from(["sha256:" + "0" * 64, "sha256:../x", "", None]))
    return e


@fuzz(900)
@given(st.lists(hostile_entry(), max_size=15), st.integers(0, 3))
def test_hostile_toc_structures(entries, nesting):
    doc = {"version": 1, "entries": entries}
    text = json.dumps(doc)
    if nesting:
        text = text.replace('"entries": [', '"entries": [' + "[" * (500 * nesting) + "]"
                            * (500 * nesting) + ",", 1) if entries else text
    ft.toc_json(text.encode("utf-8", "surrogatepass"))


# structure-aware hostile tar input ---------------------------------------------------

@st.composite
def hostile_tar(draw):
    import tarfile
    from ..format.tarbuild import TarBuilder
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    b = TarBuilder(fmt=fmt)
    names = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.one_of(st.sampled_from(["a", "a/b", "../up", "/abs", "./a", "a/../../b",
                                               "x" * 120, "d/" * 60 + "f", ".wh.a",
                                               "stargz.index.json"]),
                              st.text(alphabet="ab/.", min_size=1, max_size=10)))
        kind = draw(st.sampled_from(["file", "dir", "symlink", "hardlink", "char", "fifo"]))
        try:
            if kind == "file":
                b.file(name, draw(st.binary(max_size=1500)))
            elif kind == "dir":
                b.dir(name)
            elif kind == "symlink":
                b.symlink(name, draw(st.sampled_from(["../../etc", "/x", "a", name])))
            elif kind == "hardlink":
                b.hardlink(name, draw(st.sampled_from(names or [name])))
            elif kind == "char":
                b.char(name, draw(st.integers(0, 300)), draw(st.integers(0, 300)))
            else:
                b.fifo(name)
        except (ValueError, tarfile.TarError):
            continue                     # the format cannot hold it: not an input
        names.append(name)
    data = bytearray(b.bytes())
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


@fuzz(800)
@given(hostile_tar())
def test_hostile_tar_input(data):
    ft.tar_input(data)


# atheris (libFuzzer), when installed -------------------------------------------------

@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_atheris(name, tmp_path):
    import importlib.util
    if importlib.util.find_spec("atheris") is None:
        msg = "atheris is not installed (pip install atheris); hypothesis fuzzing ran instead"
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    import stargz_overlay
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [here, os.path.dirname(os.path.dirname(os.path.abspath(stargz_overlay.__file__)))]
        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    seconds = max(1, int(FUZZ_SECONDS / len(ft.TARGETS)))
    r = subprocess.run([sys.executable, "-m", "tests.reliability.atheris_fuzz", name,
                        f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-max_len=65536",
                        f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, cwd=here, env=env,
                       timeout=seconds + 120)
    tail = r.stderr[-3000:]
    assert r.returncode == 0, tail
    runs = [line for line in r.stderr.splitlines() if line.startswith("Done ")]
    print(name, runs[-1] if runs else tail[-200:])
