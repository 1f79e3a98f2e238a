"""Invariants of an accepted TOC, shared by the property tests and the fuzz targets."""


def assert_chunks_tile(entry, data_end):
    """A regular file's chunks tile it in order, none empty, each gzip member inside the
    blob's data (before ``data_end``)."""
    pos = 0
    for chunk in entry.chunks:
        assert chunk.chunk_offset == pos and chunk.size > 0
        assert 0 <= chunk.offset < chunk.end <= data_end
        pos += chunk.size
    assert pos == entry.size
