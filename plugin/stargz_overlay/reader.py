"""Reading stargz/eStargz blobs from any random-access source.

Opening reads the footer and the TOC (two reads, or one when the TOC offset
is already known; none with ``from_toc_json``, for a TOC kept from before);
file contents are read member by member and verified against the chunk
digests and the whole-file digest before they are returned.  A mismatch
raises ``DigestMismatch``, never returns bytes.

Memory is bounded whatever the blob claims: the TOC member is refused beyond
MAX_TOC_BYTES (compressed or not), members are inflated PIECE bytes at a
time, and a chunk larger than VERIFY_IN_MEMORY (a gzip bomb, or a writer with
huge chunks) is checked in a first pass and only then inflated again to be
yielded, so neither its compressed nor its inflated bytes are ever held whole.
"""

import hashlib
import io
import re
import tarfile
import zlib

from .digests import hasher_digest, sha256_digest
from .errors import DigestMismatch, FormatError
from .footer import ESTARGZ_FOOTER_SIZE, LEGACY_FOOTER_SIZE, MAX_FOOTER_SIZE, parse_footer
from .toc import TOC_NAME, build_toc, load_entries

MAX_TOC_BYTES = 512 << 20     # TOC member, compressed and decompressed; bounds a gzip bomb
READ_BATCH = 8 << 20          # compressed bytes fetched per source read
PIECE = 1 << 20               # decompressed bytes produced per zlib call
VERIFY_IN_MEMORY = 16 << 20   # chunks up to this size are verified whole, then yielded
MAX_HELD = 64 << 20           # compressed bytes of one member held at once; more is streamed


def inflate(pieces, skip, length, what):
    """Yield bytes ``[skip, skip + length)`` of the gzip member(s) in ``pieces``.

    ``pieces`` is an iterable of compressed byte strings, consumed only as far
    as needed.  Blocks are at most PIECE bytes; no more than ``skip + length``
    bytes are ever inflated, whatever the data holds.
    """
    want = skip + length
    produced = 0
    dec = zlib.decompressobj(31)
    try:
        for data in pieces:
            while data and produced < want:
                out = dec.decompress(data, min(PIECE, want - produced))
                if out:
                    lo = skip - produced
                    produced += len(out)
                    if lo < len(out):
                        yield out[lo:] if lo > 0 else out
                if dec.eof:
                    data = dec.unused_data
                    dec = zlib.decompressobj(31)
                elif not out and dec.unconsumed_tail == data:
                    break          # no progress: zlib wants more input
                else:
                    data = dec.unconsumed_tail
            if produced >= want:
                return
    except zlib.error as exc:
        raise FormatError(f"{what}: corrupt gzip data ({exc})") from None
    raise FormatError(f"{what}: compressed data ends after {max(0, produced - skip)} of "
                      f"{length} bytes")


def gunzip_prefix(data, length, what):
    """The first ``length`` bytes of the gzip member(s) in ``data``.

    Never decompresses more than ``length`` bytes, whatever ``data`` holds.
    """
    if length == 0:
        return b""
    return b"".join(inflate((data,), 0, length, what))


_JSON_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")
FOOTER_SIZES = {"estargz": ESTARGZ_FOOTER_SIZE, "stargz": LEGACY_FOOTER_SIZE}
TOC_HEAD = 64 << 10           # enough inflated bytes for the TOC member's tar header(s)


def _toc_body(member, what="TOC"):
    """Gunzip the TOC member; return its ``stargz.index.json`` body as a memoryview.

    The tar header is read first and its size claim checked, so a bomb is
    refused before it is inflated; then exactly the claimed bytes are inflated.
    """
    dec = zlib.decompressobj(31)
    try:
        head = dec.decompress(member, TOC_HEAD)
    except zlib.error as exc:
        raise FormatError(f"{what}: corrupt gzip data ({exc})") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(head), mode="r:") as tar:
            info = tar.next()
    except (tarfile.TarError, EOFError) as exc:
        raise FormatError(f"{what}: not a tar entry ({exc})") from None
    if info is None or info.name != TOC_NAME or not info.isreg():
        raise FormatError(f"{what}: the member before the footer holds no {TOC_NAME} entry")
    if info.size > MAX_TOC_BYTES:
        raise FormatError(f"{what}: {TOC_NAME} claims {info.size} bytes, more than "
                          f"{MAX_TOC_BYTES}")
    body = bytearray()
    try:
        for block in inflate((member,), info.offset_data, info.size, what):
            body += block
    except FormatError as exc:
        if "compressed data ends" not in str(exc):
            raise
        raise FormatError(f"{what}: truncated ({len(body)} of {info.size} bytes)") from None
    return memoryview(body)


def _check_blob_size(source):
    size = source.size
    if size < LEGACY_FOOTER_SIZE:
        raise FormatError(f"not a stargz/eStargz blob: only {size} bytes long")
    return size


def _check_toc_member(length):
    if length > MAX_TOC_BYTES:
        raise FormatError(f"TOC: the footer puts {length} bytes between the TOC and the end of "
                          f"the blob, more than {MAX_TOC_BYTES}; not a TOC")


class VerifyReport:
    """What ``StargzReader.verify`` checked."""

    def __init__(self):
        self.files = 0
        self.chunks = 0
        self.bytes = 0


class StargzReader:
    """A stargz or eStargz blob opened from a source with ``size``/``read_at``."""

    def __init__(self, source, toc_digest=None, toc_offset=None):
        self.source = source
        size = _check_blob_size(source)
        if toc_offset is None:
            tail_len = min(size, MAX_FOOTER_SIZE)
            footer = parse_footer(source.read_at(size - tail_len, tail_len), size)
            _check_toc_member(size - footer.size - footer.toc_offset)
            toc_member = source.read_at(footer.toc_offset,
                                        size - footer.size - footer.toc_offset)
        else:
            if not 0 <= toc_offset < size:
                raise FormatError(f"TOC offset {toc_offset} is outside the blob")
            _check_toc_member(size - toc_offset - MAX_FOOTER_SIZE)
            data = source.read_at(toc_offset, size - toc_offset)
            footer = parse_footer(data[-MAX_FOOTER_SIZE:], size)
            if footer.toc_offset != toc_offset:
                raise FormatError(f"footer points at {footer.toc_offset}, not at the "
                                  f"expected TOC offset {toc_offset}")
            toc_member = data[:len(data) - footer.size]
        self._toc_member = toc_member
        self._toc_json = None
        self._load(footer.kind, footer.toc_offset, _toc_body(toc_member), toc_digest)

    @classmethod
    def from_toc_json(cls, source, toc_json, toc_offset, kind, toc_digest):
        """A reader whose TOC is known already (e.g. kept in the cache): nothing is read.

        ``toc_offset`` and ``kind`` are what the blob's footer said when the TOC
        was first read; ``toc_json`` must hash to ``toc_digest`` (DigestMismatch
        otherwise), and passes the same bounds and JSON checks as a TOC read
        from the blob.
        """
        self = cls.__new__(cls)
        self.source = source
        size = _check_blob_size(source)
        footer_size = FOOTER_SIZES.get(kind)
        if footer_size is None:
            raise FormatError(f"unknown blob kind {kind!r} (expected estargz or stargz)")
        if type(toc_offset) is not int or not 0 <= toc_offset <= size - footer_size:
            raise FormatError(f"TOC offset {toc_offset!r} is outside the blob")
        _check_toc_member(size - footer_size - toc_offset)
        if len(toc_json) > MAX_TOC_BYTES:
            raise FormatError(f"TOC: {len(toc_json)} bytes, more than {MAX_TOC_BYTES}")
        self._toc_member = None
        self._toc_json = bytes(toc_json)
        self._load(kind, toc_offset, self._toc_json, toc_digest)
        return self

    def _load(self, kind, toc_offset, body, toc_digest):
        """Check the TOC JSON ``body`` (digest, then JSON) and build the tree from it."""
        self.kind = kind
        self.toc_offset = toc_offset
        self.toc_digest = sha256_digest(body)
        self.toc_size = len(body)
        if toc_digest is not None and toc_digest != self.toc_digest:
            raise DigestMismatch(f"TOC digest is {self.toc_digest}, expected {toc_digest}")
        if len(body) > TOC_HEAD and not _JSON_OBJECT_START.match(body):
            # e.g. hundreds of MB of zeros: refuse before copying them into a str
            raise FormatError("TOC is not valid JSON: it does not start with an object")
        try:
            text = str(body, "utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"TOC is not UTF-8 JSON: {exc}") from None
        del body
        entries = load_entries(text)
        del text            # only one form of the TOC alive at a time: bounds memory
        self.toc = build_toc(entries, self.toc_offset)

    @property
    def toc_json(self):
        """The TOC JSON bytes exactly as stored (decompressed again on each use)."""
        if self._toc_member is None:
            return self._toc_json
        return bytes(_toc_body(self._toc_member))

    def prefetch_range(self):
        """Blob range holding the prioritized files, or None."""
        return self.toc.prefetch_range()

    def _mismatch(self, entry, chunk):
        return DigestMismatch(f"{entry.name}: chunk at offset {chunk.chunk_offset} does not "
                              f"match its chunk digest {chunk.digest}")

    def _member(self, chunk, window, start):
        """The member's compressed bytes, from ``window`` or streamed from the source."""
        if window is not None:
            yield window[chunk.offset - start:chunk.end - start]
            return
        pos = chunk.offset
        while pos < chunk.end:
            n = min(READ_BATCH, chunk.end - pos)
            yield self.source.read_at(pos, n)
            pos += n

    def _chunk_blocks(self, entry, chunk, window=None, start=0):
        """Yield one chunk's bytes, each block only once the chunk digest matched.

        Small chunks are inflated and checked whole.  Larger ones are inflated
        twice in PIECE blocks: once to check the digest, once to yield (the
        second pass is hashed too; should the source answer differently, the
        mismatch is raised before the iterator ends).  Without a chunk digest
        the bytes are yielded as they come: only the file digest, checked by
        ``iter_file`` at the end, vouches for them.
        """
        what = f"{entry.name} at {chunk.chunk_offset}"

        def blocks():
            return inflate(self._member(chunk, window, start), chunk.inner_offset, chunk.size,
                           what)

        if chunk.size <= VERIFY_IN_MEMORY:
            data = b"".join(blocks())
            if chunk.digest is not None and sha256_digest(data) != chunk.digest:
                raise self._mismatch(entry, chunk)
            yield data
            return
        if chunk.digest is None:
            yield from blocks()
            return
        for second in (False, True):
            hasher = hashlib.sha256()
            for block in blocks():
                hasher.update(block)
                if second:
                    yield block
            if hasher_digest(hasher) != chunk.digest:
                raise self._mismatch(entry, chunk)

    def iter_file(self, entry):
        """Yield the verified contents of a regular file, chunk by chunk.

        The whole-file digest is checked after the last chunk: a consumer
        must not publish what it received until the iterator is exhausted.
        """
        if entry.type != "reg":
            raise FormatError(f"{entry.name} is not a regular file")
        if entry.digest is None and any(c.digest is None for c in entry.chunks):
            raise FormatError(f"{entry.name}: the TOC gives no digest to verify it against")
        whole = hashlib.sha256()
        chunks = entry.chunks
        i = 0
        while i < len(chunks):
            j = i + 1          # batch chunks whose members are adjacent in the blob
            while (j < len(chunks) and chunks[j].offset == chunks[j - 1].end
                   and chunks[j].end - chunks[i].offset <= READ_BATCH):
                j += 1
            start = chunks[i].offset
            span = chunks[j - 1].end - start
            window = self.source.read_at(start, span) if span <= MAX_HELD else None
            for chunk in chunks[i:j]:
                for data in self._chunk_blocks(entry, chunk, window, start):
                    whole.update(data)
                    yield data
            i = j
        if entry.digest is not None and hasher_digest(whole) != entry.digest:
            raise DigestMismatch(f"{entry.name}: content does not match its digest "
                                 f"{entry.digest}")

    def read_file(self, entry):
        """The whole verified content of a regular file."""
        return b"".join(self.iter_file(entry))

    def verify(self):
        """Check every chunk and file digest; raise DigestMismatch on the first bad one."""
        report = VerifyReport()
        for entry in self.toc.data_entries():
            for data in self.iter_file(entry):
                report.chunks += 1
                report.bytes += len(data)
            report.files += 1
        return report
