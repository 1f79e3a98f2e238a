"""Property tests (hypothesis) for the format library.

Whatever bytes arrive, the library must either give a consistent result or
raise one of its own errors (FormatError, DigestMismatch, SourceError); it
must never raise anything else, and never return bytes that differ from
what was written.  Example counts are bounded so the module runs in well
under 30 seconds on two cores.
"""

import io
import json
import posixpath
import re
import tarfile

import pytest
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st

from stargz_overlay.digests import sha256_digest
from stargz_overlay.errors import DigestMismatch, FormatError, SourceError, StargzError
from stargz_overlay.footer import (ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE, encode_footer,
                                   parse_footer)
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import BytesSource
from stargz_overlay.toc import FILE_TYPES, parse_toc
from stargz_overlay.writer import convert

from .tarbuild import TarBuilder
from .tocinvariants import assert_chunks_tile

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])


def fuzz(examples):
    return settings(FUZZ, max_examples=examples)


def mutate(data, flips):
    """Apply ``(position, xor)`` flips (positions taken modulo the length)."""
    out = bytearray(data)
    for pos, xor in flips:
        out[pos % len(out)] ^= xor
    return bytes(out)


DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
flips_st = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)),
                    min_size=1, max_size=4)


# ---------------------------------------------------------------------------
# footers

def check_footer_result(tail, blob_size):
    try:
        footer = parse_footer(tail, blob_size)
    except FormatError:
        return None
    assert footer.kind in ("estargz", "stargz")
    assert footer.size == {"estargz": ESTARGZ_FOOTER_SIZE,
                           "stargz": LEGACY_FOOTER_SIZE}[footer.kind]
    assert 0 <= footer.toc_offset < blob_size - footer.size
    # the offset is exactly the 16 hex digits in front of STARGZ
    digits = tail[-footer.size:][-35:-19]
    assert tail[-footer.size:][-19:-13] == b"STARGZ"
    assert re.fullmatch(rb"[0-9a-f]{16}", digits)
    assert footer.toc_offset == int(digits, 16)
    return footer


@fuzz(400)
@given(st.binary(max_size=80), st.integers(0, 1 << 62))
def test_footer_random_bytes(tail, blob_size):
    check_footer_result(tail, blob_size)


@fuzz(400)
@given(st.integers(0, (1 << 40)), st.booleans(), flips_st, st.integers(0, 1 << 20),
       st.binary(max_size=8))
def test_footer_mutations(offset, legacy, flips, slack, prefix):
    footer = encode_footer(offset, legacy=legacy)
    blob_size = offset + len(footer) + 1 + slack
    assert check_footer_result(footer, blob_size).toc_offset == offset
    assert check_footer_result(prefix + footer, blob_size).toc_offset == offset
    check_footer_result(prefix + mutate(footer, flips), blob_size)


@fuzz(100)
@given(st.integers(0, 1 << 40), st.booleans())
def test_footer_beyond_blob_is_refused(offset, legacy):
    footer = encode_footer(offset, legacy=legacy)
    try:
        parse_footer(footer, offset + len(footer))      # TOC would be empty/outside
    except FormatError:
        return
    raise AssertionError("a footer pointing at itself was accepted")


# ---------------------------------------------------------------------------
# TOC JSON

segment_st = st.integers(0, 9).flatmap(
    lambda n: st.sampled_from([".", "..", ""]) if n == 0 else
    st.sampled_from(["a", "b", "c", "d/e", ".wh.a", ".wh..wh..opq", "ü"]))
name_st = st.integers(0, 9).flatmap(
    lambda n: st.sampled_from(["./", "/", "../x", ".prefetch.landmark",
                               ".no.prefetch.landmark", "stargz.index.json"]) if n == 0 else
    st.lists(segment_st, min_size=1, max_size=4).map("/".join))
junk_st = st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.floats(
    allow_nan=False) | st.text(max_size=8) | st.lists(st.integers(), max_size=2) | \
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)


def mostly(sane):
    """``sane`` values, junk one time in forty."""
    return st.integers(0, 39).flatmap(lambda n: junk_st if n == 0 else sane)


small_int = mostly(st.integers(0, 5000) | st.sampled_from([0, 1, 512, 700]))
digest_st = mostly(st.sampled_from([sha256_digest(b""), sha256_digest(b"x"), "sha256:zz", ""]))


@st.composite
def toc_entry_st(draw):
    entry = {"name": draw(name_st | junk_st) if draw(st.integers(0, 20)) == 0 else
             draw(name_st),
             "type": draw(mostly(st.sampled_from(FILE_TYPES + ("chunk", "chunk", "reg",
                                                               "reg", "dir"))))}
    for key, strat in (("size", small_int), ("offset", small_int), ("chunkOffset", small_int),
                       ("chunkSize", small_int), ("innerOffset", small_int),
                       ("mode", small_int), ("uid", small_int), ("gid", small_int),
                       ("devMajor", small_int), ("devMinor", small_int),
                       ("linkName", mostly(name_st)), ("digest", digest_st),
                       ("chunkDigest", digest_st),
                       ("modtime", mostly(st.sampled_from(["2023-11-14T22:13:20Z",
                                                           "1969-12-31T23:59:59Z", "garbage",
                                                           ""]))),
                       ("userName", mostly(st.text(max_size=4))),
                       ("xattrs", mostly(st.dictionaries(
                           st.text(max_size=4), mostly(st.sampled_from(["eQ==", "", "!!",
                                                                        "YmFy"])),
                           max_size=2)))):
        if draw(st.integers(0, 3)) == 0:
            entry[key] = draw(strat)
    return entry


def check_toc(toc, data_end):
    """Invariants of any TOC that parse_toc accepts."""
    assert toc.entries[0] is toc.root
    assert toc.root.type == "dir" and toc.root.name == ""
    assert len({id(e) for e in toc.entries}) == len(toc.entries)
    inos = [e.ino for e in toc.entries]
    assert len(set(inos)) == len(inos) and toc.root.ino == 1
    in_tree = set()
    for path, entry in toc.walk():
        in_tree.add(id(entry))
        assert toc.lookup(path) is entry
        assert entry.type in FILE_TYPES and entry.type != "hardlink"
        assert 0 <= entry.mode <= 0o7777
        assert entry.nlink >= 1
        if entry.type == "dir":
            assert entry.name == path
            for base, child in entry.children.items():
                assert base and "/" not in base and base not in (".", "..")
                if child.type == "dir":
                    assert child.name == posixpath.join(path, base)
        if entry.type == "reg":
            assert_chunks_tile(entry, data_end)
            assert entry.digest is None or DIGEST_RE.fullmatch(entry.digest)
            assert all(c.digest is None or DIGEST_RE.fullmatch(c.digest) for c in entry.chunks)
    assert in_tree == {id(e) for e in toc.entries}


def assert_matches_toc(entry, data):
    """Bytes a reader returned match every digest the TOC gives for them."""
    assert len(data) == entry.size
    assert entry.digest or all(c.digest for c in entry.chunks)
    if entry.digest:
        assert sha256_digest(data) == entry.digest
    for chunk in entry.chunks:
        if chunk.digest:
            assert sha256_digest(data[chunk.chunk_offset:chunk.chunk_offset + chunk.size]) == chunk.digest


def parse_or_format_error(toc_json, data_end):
    try:
        toc = parse_toc(toc_json, data_end)
    except FormatError:
        event("TOC refused")
        return None
    event("TOC accepted")
    check_toc(toc, data_end)
    return toc


@fuzz(300)
@given(st.lists(toc_entry_st(), max_size=12), st.integers(1, 1 << 20),
       st.sampled_from([1, 1, 1, 2, "1", None]))
def test_toc_random_entries(entries, data_end, version):
    doc = {"version": version, "entries": entries}
    parse_or_format_error(json.dumps(doc).encode(), data_end)


json_st = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=10)


@fuzz(200)
@given(json_st | st.binary(max_size=40))
def test_toc_random_json(doc):
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    parse_or_format_error(raw, 1000)


def sample_blob(chunk_size=700, legacy=False, level=6):
    tar = (TarBuilder()
           .dir("d", mode=0o700, uid=7, gid=8)
           .file("d/f", b"f" * 1500 + bytes(range(256)), uid=1, gid=2, uname="u", gname="g")
           .file("d/empty")
           .symlink("d/s", "../x")
           .hardlink("h", "d/f")
           .char("c", 1, 3)
           .file("x", bytes(range(256)) * 9, xattrs={"user.a": b"b"})
           .file("d/.wh.gone")
           .bytes())
    out = io.BytesIO()
    res = convert(io.BytesIO(tar), out, chunk_size=chunk_size, legacy=legacy,
                  compression_level=level)
    return out.getvalue(), res


SAMPLE, SAMPLE_RES = sample_blob()
SAMPLE_READER = StargzReader(BytesSource(SAMPLE))
SAMPLE_CONTENT = {p: SAMPLE_READER.read_file(e) for p, e in SAMPLE_READER.toc.walk()
                  if e.type == "reg"}


@fuzz(400)
@given(flips_st)
def test_toc_json_mutations(flips):
    """Flipped bytes in a real TOC: a consistent tree or FormatError."""
    parse_or_format_error(mutate(SAMPLE_READER.toc_json, flips), SAMPLE_READER.toc_offset)


@fuzz(300)
@given(st.data())
def test_toc_json_field_edits(data):
    """Replace single fields of a real TOC with hostile values."""
    doc = json.loads(SAMPLE_READER.toc_json)
    for _ in range(data.draw(st.integers(1, 3))):
        entry = data.draw(st.sampled_from(doc["entries"]))
        key = data.draw(st.sampled_from(["name", "type", "size", "offset", "chunkOffset",
                                         "chunkSize", "linkName", "mode", "digest",
                                         "chunkDigest", "xattrs", "innerOffset"]))
        if data.draw(st.booleans()):
            entry.pop(key, None)
        else:
            entry[key] = data.draw(junk_st | name_st | st.integers(0, len(SAMPLE) * 2))
    toc = parse_or_format_error(json.dumps(doc).encode(), SAMPLE_READER.toc_offset)
    if toc is None:
        return
    # Reading through an edited TOC yields the original bytes or an error.
    reader = StargzReader(BytesSource(SAMPLE))
    reader.toc = toc
    for path, entry in toc.walk():
        if entry.type != "reg":
            continue
        try:
            got = reader.read_file(entry)
        except (DigestMismatch, FormatError):
            continue
        assert_matches_toc(entry, got)


@pytest.mark.parametrize("value", ["../../etc/passwd", "sha256:" + "A" * 64, "md5:00",
                                   "sha256:" + "0" * 63, True, 5, ["sha256:"]])
@pytest.mark.parametrize("key", ["digest", "chunkDigest"])
def test_malformed_digests_are_format_errors(key, value):
    """Digests key the content cache: anything but sha256:<64 hex> is refused."""
    doc = json.loads(SAMPLE_READER.toc_json)
    entry = next(e for e in doc["entries"] if e["name"] == "x")
    entry[key] = value
    with pytest.raises(FormatError, match=key):
        parse_toc(json.dumps(doc).encode(), SAMPLE_READER.toc_offset)


@pytest.mark.parametrize("name", ["", "./", "/", "a/.."])
def test_hardlink_named_as_root_is_a_format_error(name):
    doc = json.loads(SAMPLE_READER.toc_json)
    doc["entries"].append({"name": name, "type": "hardlink", "linkName": "x"})
    with pytest.raises(FormatError, match="root"):
        parse_toc(json.dumps(doc).encode(), SAMPLE_READER.toc_offset)


# ---------------------------------------------------------------------------
# writer round trips

seg_st = st.sampled_from(["a", "b", "c", "dd", "e.f", ".wh.a", "ü", "x" * 120])


@st.composite
def tree_st(draw):
    """A list of unique, consistent tar entries and what each path must hold."""
    entries = []
    expect = {}
    files = []
    for _ in range(draw(st.integers(0, 10))):
        parts = draw(st.lists(seg_st, min_size=1, max_size=3))
        path = "/".join(parts)
        parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if path in expect or any(expect.get(p, ("dir",))[0] != "dir" for p in parents) or \
                any(k.startswith(path + "/") for k in expect):
            continue
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo"]))
        mode = draw(st.sampled_from([0o644, 0o755, 0o4711, 0o1777, 0, 0o7777]))
        if kind == "hardlink" and not files:
            kind = "file"
        if kind == "file":
            size = draw(st.sampled_from([0, 1, 100, 511, 512, 513, 3000]))
            data = draw(st.binary(min_size=size, max_size=size)) if size < 600 else \
                bytes([draw(st.integers(0, 255))]) * size
            entries.append(("file", path, data, mode))
            expect[path] = ("reg", mode, data)
            files.append(path)
        elif kind == "dir":
            entries.append(("dir", path, None, mode))
            expect[path] = ("dir", mode, None)
        elif kind == "symlink":
            target = draw(seg_st)
            entries.append(("symlink", path, target, 0o777))
            expect[path] = ("symlink", 0o777, target)
        elif kind == "fifo":
            entries.append(("fifo", path, None, mode))
            expect[path] = ("fifo", mode, None)
        else:
            target = draw(st.sampled_from(files))
            entries.append(("hardlink", path, target, 0o644))
            expect[path] = expect[target]
        for p in parents:
            expect.setdefault(p, ("dir", 0o755, None))
    return entries, expect


def tar_of(entries):
    tb = TarBuilder()
    for kind, path, arg, mode in entries:
        if kind == "file":
            tb.file(path, arg, mode=mode)
        elif kind == "dir":
            tb.dir(path, mode=mode)
        elif kind == "symlink":
            tb.symlink(path, arg, mode=mode)
        elif kind == "hardlink":
            tb.hardlink(path, arg)
        else:
            tb.fifo(path, mode=mode)
    return tb.bytes()


@fuzz(150)
@given(tree_st(), st.integers(1, 2048), st.booleans(), st.integers(0, 9), st.data())
def test_writer_round_trip(tree, chunk_size, legacy, level, data):
    entries, expect = tree
    prioritized = data.draw(st.lists(st.sampled_from(sorted(expect) + ["missing"]),
                                     max_size=3, unique=True)) if expect else []
    out = io.BytesIO()
    res = convert(io.BytesIO(tar_of(entries)), out, legacy=legacy, chunk_size=chunk_size,
                  prioritized=prioritized, compression_level=level)
    blob = out.getvalue()
    assert res.compressed_size == len(blob) and res.blob_digest == sha256_digest(blob)
    in_tar = {path for _, path, _, _ in entries}
    # implied parent dirs are not tar entries: prioritizing them is a miss
    assert sorted(res.missed_prioritized) == sorted(set(prioritized) - in_tar)
    reader = StargzReader(BytesSource(blob), toc_digest=res.toc_digest)
    assert reader.kind == ("stargz" if legacy else "estargz")
    check_toc(reader.toc, reader.toc_offset)
    seen = {p: e for p, e in reader.toc.walk() if p}
    assert set(seen) == set(expect)
    for path, (kind, mode, arg) in expect.items():
        entry = seen[path]
        assert entry.type == kind, path
        if kind == "reg":
            assert entry.mode == mode and reader.read_file(entry) == arg
            assert all(c.size <= chunk_size for c in entry.chunks)
        elif kind == "symlink":
            assert entry.link_name == arg
        elif kind == "fifo":
            assert entry.mode == mode
    # hardlinks share the target's entry
    for kind, path, arg, _ in entries:
        if kind == "hardlink":
            assert seen[path] is seen[arg]
    reader.verify()
    # prioritized files are in the prefetch range
    rng = reader.prefetch_range()
    if legacy or not any(p in in_tar for p in prioritized):
        assert rng is None
    else:
        assert rng is not None
        assert all(c.end <= rng[1] for p in prioritized if p in seen
                   for c in seen[p].chunks)


# ---------------------------------------------------------------------------
# damaged blobs

BLOBS = {(cs, legacy, lvl): sample_blob(cs, legacy, lvl)
         for cs in (700, 1 << 20) for legacy in (False, True) for lvl in (0, 6)}


def read_all_or_error(blob, toc_digest=None):
    """Open and read every file; return {path: bytes} for those that read cleanly."""
    try:
        reader = StargzReader(BytesSource(blob), toc_digest=toc_digest)
    except (FormatError, DigestMismatch, SourceError):
        return None
    got = {}
    for path, entry in reader.toc.walk():
        if entry.type == "reg":
            try:
                got[path] = reader.read_file(entry)
            except (FormatError, DigestMismatch, SourceError):
                pass
    return reader, got


@fuzz(250)
@given(st.sampled_from(sorted(BLOBS)), flips_st)
def test_flipped_data_bytes_never_return_wrong_content(key, flips):
    """Any flip before the TOC: each file reads correctly or raises our error."""
    blob, res = BLOBS[key]
    reader = StargzReader(BytesSource(blob))
    flips = [(pos % reader.toc_offset, xor) for pos, xor in flips]
    bad = mutate(blob, flips)
    result = read_all_or_error(bad, toc_digest=res.toc_digest)
    assert result is not None            # TOC and footer are untouched
    _, got = result
    for path, content in got.items():
        assert content == SAMPLE_CONTENT[path], path


@fuzz(250)
@given(st.sampled_from(sorted(BLOBS)), flips_st)
def test_flipped_toc_or_footer_bytes(key, flips):
    """Flips in the TOC member or footer: the pinned TOC digest catches any change."""
    blob, res = BLOBS[key]
    toc_offset = StargzReader(BytesSource(blob)).toc_offset
    tail = len(blob) - toc_offset
    bad = mutate(blob, [(toc_offset + pos % tail, xor) for pos, xor in flips])
    result = read_all_or_error(bad, toc_digest=res.toc_digest)
    if result is None:
        return
    reader, got = result
    assert reader.toc_digest == res.toc_digest
    for path, content in got.items():
        assert content == SAMPLE_CONTENT[path], path


@fuzz(150)
@given(st.sampled_from(sorted(BLOBS)), flips_st)
def test_flipped_anywhere_without_toc_digest(key, flips):
    """Without a pinned TOC digest: only our errors, and content matches the TOC digests."""
    blob, _ = BLOBS[key]
    try:
        reader = StargzReader(BytesSource(mutate(blob, flips)))
    except StargzError:
        return
    for path, entry in reader.toc.walk():
        if entry.type != "reg":
            continue
        try:
            data = reader.read_file(entry)
        except StargzError:
            continue
        assert_matches_toc(entry, data)


@fuzz(150)
@given(st.sampled_from(sorted(BLOBS)), st.integers(0, 1 << 30), st.integers(0, 64),
       st.booleans())
def test_truncated_or_extended_blob(key, cut, extra, from_front):
    """Truncated (at the end or the front) or padded blobs: our errors only."""
    blob, res = BLOBS[key]
    cut %= len(blob)
    bad = blob[cut:] if from_front else blob[:len(blob) - cut]
    bad += b"\0" * extra
    assume(bad != blob)
    result = read_all_or_error(bad, toc_digest=res.toc_digest)
    if result is None:
        return
    _, got = result
    for path, content in got.items():
        assert content == SAMPLE_CONTENT[path], path


def test_sample_blob_variants_are_readable():
    """The damaged-blob tests start from blobs that read back correctly."""
    for (cs, legacy, lvl), (blob, res) in BLOBS.items():
        reader, got = read_all_or_error(blob, toc_digest=res.toc_digest)
        assert got == SAMPLE_CONTENT, (cs, legacy, lvl)
        assert reader.kind == ("stargz" if legacy else "estargz")
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            assert tar.getnames()[-1] == "stargz.index.json"
