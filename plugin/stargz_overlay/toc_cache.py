"""A StargzReader from the TOC kept in the content cache, for registry and local blobs.

The TOC digest is the sha256 of the TOC JSON, so the JSON is content-addressed:
once a layer's TOC has been read and checked against its pinned digest (the
store does it at pull), it is stored in the cache under that digest, and later
opens of the layer that know the TOC offset and blob kind (the footer's) build
their reader from it without reading the footer or the TOC again.  A missing,
damaged or unusable cached TOC falls back to reading the blob.
"""

import logging

from .errors import StargzError

log = logging.getLogger("stargz_overlay.plugin")


def open_reader(source, cache, toc_digest, toc_offset=None, kind=None, label=""):
    """A StargzReader for ``source``; from the cached TOC when it can, else from the blob.

    The cached TOC is used when ``toc_digest`` (pinned), ``toc_offset`` and
    ``kind`` are all known; it is checked against ``toc_digest`` like one read
    from the blob.  A TOC read from the blob and verified against a pinned
    digest is stored in the cache for the next opens.
    """
    from .reader import MAX_TOC_BYTES, StargzReader
    if cache is not None and toc_digest and toc_offset is not None and kind:
        data = cache.read(toc_digest, MAX_TOC_BYTES)
        if data is not None:
            try:
                reader = StargzReader.from_toc_json(source, data, toc_offset, kind, toc_digest)
                log.debug("%s: TOC %s from the cache", label, toc_digest)
                return reader
            except StargzError as exc:
                log.warning("%s: the cached TOC %s is not usable (%s); reading it from the "
                            "blob", label, toc_digest, exc)
    reader = StargzReader(source, toc_digest=toc_digest, toc_offset=toc_offset)
    if toc_digest is not None:
        remember_toc(cache, reader, label)
    return reader


def remember_toc(cache, reader, label=""):
    """Keep ``reader``'s (verified) TOC JSON in the cache; a failure only logs."""
    if cache is None:
        return
    try:
        cache.get(reader.toc_digest, reader.toc_size, lambda: (reader.toc_json,))
    except (StargzError, OSError) as exc:
        log.warning("%s: cannot keep the TOC in the cache: %s", label, exc)
