"""A reader built from a TOC kept in the cache: no blob read, same checks, same tree.

Also the cache side (``ContentCache.read``, ``toc_cache.open_reader``):
a damaged or unusable cached TOC falls back to the blob and never serves a
wrong TOC, and the LayerSpec fields that carry the TOC offset and format.
"""

import io
import os

import pytest

from stargz_overlay.cache import ContentCache
from stargz_overlay.errors import DigestMismatch, FormatError
from stargz_overlay.layer_spec import LayerSpec, LayerSpecError, decode, encode
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import BytesSource
from stargz_overlay.toc_cache import open_reader
from stargz_overlay.writer import convert

from .tarbuild import TarBuilder


@pytest.fixture(scope="module")
def blob():
    tar = (TarBuilder().dir("etc").file("etc/hosts", b"127.0.0.1 localhost\n")
           .file("data.bin", os.urandom(100_000)).bytes())
    out = io.BytesIO()
    res = convert(io.BytesIO(tar), out, chunk_size=32768)
    return out.getvalue(), res.toc_digest


def test_reader_from_toc_json_reads_nothing_and_matches(blob):
    data, toc_digest = blob
    full = StargzReader(BytesSource(data), toc_digest=toc_digest)
    source = BytesSource(data)
    cached = StargzReader.from_toc_json(source, full.toc_json, full.toc_offset, full.kind,
                                        toc_digest)
    assert source.reads == []
    assert (cached.kind, cached.toc_offset, cached.toc_digest, cached.toc_json) == \
        (full.kind, full.toc_offset, full.toc_digest, full.toc_json)
    assert cached.toc_size == full.toc_size == len(full.toc_json)
    assert [e.name for e in cached.toc.entries] == [e.name for e in full.toc.entries]
    entry = cached.toc.lookup("data.bin")
    assert cached.read_file(entry) == full.read_file(full.toc.lookup("data.bin"))
    assert source.reads


def test_reader_from_toc_json_with_wrong_digest_is_refused(blob):
    data, toc_digest = blob
    full = StargzReader(BytesSource(data))
    other = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch):
        StargzReader.from_toc_json(BytesSource(data), full.toc_json, full.toc_offset,
                                   full.kind, other)
    changed = full.toc_json.replace(b"etc/hosts", b"etc/HOSTS")
    with pytest.raises(DigestMismatch):
        StargzReader.from_toc_json(BytesSource(data), changed, full.toc_offset, full.kind,
                                   toc_digest)


@pytest.mark.parametrize("offset, kind, message", [
    (-1, "estargz", "outside the blob"),
    (10 ** 9, "estargz", "outside the blob"),
    ("12", "estargz", "outside the blob"),
    (0, "zstd", "unknown blob kind"),
])
def test_reader_from_toc_json_bounds(blob, offset, kind, message):
    data, toc_digest = blob
    full = StargzReader(BytesSource(data))
    with pytest.raises(FormatError, match=message):
        StargzReader.from_toc_json(BytesSource(data), full.toc_json, offset, kind, toc_digest)
    with pytest.raises(FormatError, match="not a stargz"):
        StargzReader.from_toc_json(BytesSource(b"x" * 10), full.toc_json, 0, "estargz",
                                   toc_digest)


def test_open_reader_uses_the_cached_toc_and_falls_back_when_damaged(tmp_path, blob):
    data, toc_digest = blob
    cache = ContentCache(str(tmp_path / "cache"))
    first = BytesSource(data)
    reader = open_reader(first, cache, toc_digest)        # no offset/kind: from the blob
    assert first.reads
    path = cache.path(toc_digest)
    with open(path, "rb") as f:
        assert f.read() == reader.toc_json                # kept for the next opens
    args = (cache, toc_digest, reader.toc_offset, reader.kind)

    again = BytesSource(data)
    assert open_reader(again, *args).toc_json == reader.toc_json
    assert again.reads == []

    os.chmod(path, 0o600)
    with open(path, "r+b") as f:                          # same size, other bytes
        f.write(b"[")
    fresh = ContentCache(str(tmp_path / "cache"))         # (a new process: not yet verified)
    fallback = BytesSource(data)
    reopened = open_reader(fallback, fresh, *args[1:])
    assert fallback.reads and reopened.toc_digest == toc_digest
    with open(path, "rb") as f:
        assert f.read() == reader.toc_json                # damaged file replaced

    with open(path, "wb"):                                # truncated
        pass
    fallback = BytesSource(data)
    assert open_reader(fallback, ContentCache(str(tmp_path / "cache")),
                       *args[1:]).toc_digest == toc_digest
    assert fallback.reads


def test_cache_read_limits(tmp_path):
    cache = ContentCache(str(tmp_path / "cache"))
    digest, _ = cache.put([b"0123456789"], 10)
    assert cache.read(digest, 10) == b"0123456789"
    assert cache.read(digest, 9) is None
    assert cache.read("sha256:" + "1" * 64, 100) is None


def test_layer_spec_toc_offset_and_format():
    spec = LayerSpec("registry", ref="127.0.0.1:5000/a:1", digest="sha256:" + "a" * 64,
                     toc="sha256:" + "b" * 64, toc_offset=1234, format="estargz")
    assert decode(encode(spec)) == spec
    for bad in ({"toc_offset": -1}, {"toc_offset": True}, {"toc_offset": "1"},
                {"format": "zstd"}):
        with pytest.raises(LayerSpecError):
            LayerSpec("registry", ref="127.0.0.1:5000/a:1", digest="sha256:" + "a" * 64,
                      **bad)
