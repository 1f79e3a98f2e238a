"""Fuzz targets for the parsers a hostile image reaches: footer, TOC, tar.

Each target takes raw bytes and either returns normally or raises a
``StargzError`` (the only failure a user may ever see); anything else is a
bug.  Accepted input must also be consistent: every file read back matches
the digests its TOC gives, every name is a clean relative path.  The same
targets run under hypothesis (test_fuzz_parsers.py, bounded, in CI) and
under atheris/libFuzzer (``python -m tests.reliability.atheris_fuzz TARGET
-max_total_time=60``) when atheris is installed.
"""

import io
import json
import posixpath
import zlib

from stargz_overlay.digests import sha256_digest
from stargz_overlay.errors import StargzError
from stargz_overlay.footer import parse_footer
from stargz_overlay.reader import StargzReader, _toc_body
from stargz_overlay.source import BytesSource
from stargz_overlay.toc import parse_toc
from stargz_overlay.writer import convert

from ..format.tocinvariants import assert_chunks_tile

OUTPUT_BUDGET = 64 << 20        # bytes a target may read back from one input


def check_toc(toc, data_end):
    """Invariants of an accepted TOC (names, tree, chunk tiling)."""
    seen = set()
    for path, entry in toc.walk():
        assert "\0" not in path and not path.startswith("/")
        assert path == "" or posixpath.normpath(path) == path, path
        assert ".." not in path.split("/")
        path.encode("utf-8")                     # strict: representable as a file name
        assert toc.lookup(path) is entry
        if entry.type == "reg":
            assert_chunks_tile(entry, data_end)
        for key in entry.xattrs:
            assert key and "\0" not in key
        seen.add(id(entry))
    assert len(seen) == len(toc.entries)


def read_back(reader, budget=OUTPUT_BUDGET):
    """Read every file; each must match its digests (or fail with a StargzError)."""
    for entry in reader.toc.data_entries():
        if entry.size > budget:
            continue
        try:
            data = b"".join(reader.iter_file(entry))
        except StargzError:
            continue
        budget -= len(data)
        assert len(data) == entry.size
        if entry.digest:
            assert sha256_digest(data) == entry.digest
        for chunk in entry.chunks:
            if chunk.digest:
                assert sha256_digest(data[chunk.chunk_offset:chunk.chunk_offset + chunk.size]) \
                    == chunk.digest


# -- targets ---------------------------------------------------------------------

def footer(data):
    try:
        f = parse_footer(data[-51:], len(data) + 1)
    except StargzError:
        return
    assert 0 <= f.toc_offset < len(data) + 1 - f.size


def toc_json(data):
    try:
        toc = parse_toc(data, 1 << 20)
    except StargzError:
        return
    check_toc(toc, 1 << 20)


def toc_member(data):
    """The TOC member's gzip + tar framing (data is the uncompressed member)."""
    c = zlib.compressobj(6, zlib.DEFLATED, 31)
    try:
        body = _toc_body(c.compress(data) + c.flush())
    except StargzError:
        return
    assert len(body) <= len(data)


def blob(data):
    try:
        reader = StargzReader(BytesSource(data))
    except StargzError:
        return
    check_toc(reader.toc, reader.toc_offset)
    read_back(reader)


def tar_input(data):
    out = io.BytesIO()
    try:
        convert(io.BytesIO(data), out, chunk_size=512, workers=1)
    except StargzError:
        return
    reader = StargzReader(BytesSource(out.getvalue()))
    check_toc(reader.toc, reader.toc_offset)
    reader.verify()


TARGETS = {"footer": footer, "toc_json": toc_json, "toc_member": toc_member, "blob": blob,
           "tar_input": tar_input}


# -- seeds -------------------------------------------------------------------------

def sample_tar():
    from ..format.tarbuild import TarBuilder
    return (TarBuilder()
            .dir("d", mode=0o750, uid=3, gid=4)
            .file("d/f", b"hello " * 300, xattrs={"user.k": b"v"})
            .file("d/" + "long" * 40, b"x" * 700)
            .symlink("d/s", "../etc/passwd")
            .hardlink("h", "d/f")
            .char("c", 1, 3)
            .fifo("p")
            .file("e")
            .bytes())


def sample_blob():
    out = io.BytesIO()
    convert(io.BytesIO(sample_tar()), out, chunk_size=512, workers=1)
    return out.getvalue()


def seeds(target):
    blob_bytes = sample_blob()
    reader = StargzReader(BytesSource(blob_bytes))
    toc = reader.toc_json
    if target == "footer":
        return [blob_bytes[-51:], blob_bytes[-47:]]
    if target == "toc_json":
        return [toc, json.dumps({"version": 1, "entries": []}).encode()]
    if target == "toc_member":
        member = zlib.decompressobj(31).decompress(blob_bytes[reader.toc_offset:])
        return [member]
    if target == "blob":
        return [blob_bytes]
    return [sample_tar()]
