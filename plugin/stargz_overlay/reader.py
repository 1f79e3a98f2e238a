"""Reading stargz/eStargz blobs from any random-access source.

Opening reads the footer and the TOC (two reads, or one when the TOC offset
is already known); file contents are read member by member and verified
against the chunk digests and the whole-file digest before they are
returned.  A mismatch raises ``DigestMismatch``, never returns bytes.
"""

import hashlib
import io
import tarfile
import zlib

from .digests import hasher_digest, sha256_digest
from .errors import DigestMismatch, FormatError
from .footer import LEGACY_FOOTER_SIZE, MAX_FOOTER_SIZE, parse_footer
from .toc import TOC_NAME, build_toc, load_entries

MAX_TOC_BYTES = 512 << 20     # decompressed TOC member; bounds a gzip bomb
READ_BATCH = 8 << 20          # compressed bytes fetched per source read


def gunzip_prefix(data, length, what):
    """The first ``length`` bytes of the gzip member(s) in ``data``.

    Never decompresses more than ``length`` bytes, whatever ``data`` holds.
    """
    out = []
    got = 0
    dec = zlib.decompressobj(31)
    pending = data
    try:
        while got < length:
            piece = dec.decompress(pending, length - got)
            out.append(piece)
            got += len(piece)
            if dec.eof and dec.unused_data:
                pending = dec.unused_data
                dec = zlib.decompressobj(31)
            elif dec.unconsumed_tail and piece:
                pending = dec.unconsumed_tail
            else:
                break
    except zlib.error as exc:
        raise FormatError(f"{what}: corrupt gzip data ({exc})") from None
    result = b"".join(out)
    if len(result) < length:
        raise FormatError(f"{what}: compressed data ends after {len(result)} of {length} bytes")
    return result


def _toc_body(member, what="TOC"):
    """Gunzip the TOC member; return its ``stargz.index.json`` body as a memoryview."""
    dec = zlib.decompressobj(31)
    try:
        raw = dec.decompress(member, MAX_TOC_BYTES + 1)
    except zlib.error as exc:
        raise FormatError(f"{what}: corrupt gzip data ({exc})") from None
    if len(raw) > MAX_TOC_BYTES:
        raise FormatError(f"{what}: decompresses to more than {MAX_TOC_BYTES} bytes")
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            info = tar.next()
    except (tarfile.TarError, EOFError) as exc:
        raise FormatError(f"{what}: not a tar entry ({exc})") from None
    if info is None or info.name != TOC_NAME or not info.isreg():
        raise FormatError(f"{what}: the member before the footer holds no {TOC_NAME} entry")
    end = info.offset_data + info.size
    if end > len(raw):
        raise FormatError(f"{what}: truncated ({len(raw) - info.offset_data} of {info.size} "
                          f"bytes)")
    return memoryview(raw)[info.offset_data:end]


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
        size = source.size
        if size < LEGACY_FOOTER_SIZE:
            raise FormatError(f"not a stargz/eStargz blob: only {size} bytes long")
        if toc_offset is None:
            tail_len = min(size, MAX_FOOTER_SIZE)
            footer = parse_footer(source.read_at(size - tail_len, tail_len), size)
            toc_member = source.read_at(footer.toc_offset,
                                        size - footer.size - footer.toc_offset)
        else:
            if not 0 <= toc_offset < size:
                raise FormatError(f"TOC offset {toc_offset} is outside the blob")
            data = source.read_at(toc_offset, size - toc_offset)
            footer = parse_footer(data[-MAX_FOOTER_SIZE:], size)
            if footer.toc_offset != toc_offset:
                raise FormatError(f"footer points at {footer.toc_offset}, not at the "
                                  f"expected TOC offset {toc_offset}")
            toc_member = data[:len(data) - footer.size]
        self.kind = footer.kind
        self.toc_offset = footer.toc_offset
        self._toc_member = toc_member
        body = _toc_body(toc_member)
        self.toc_digest = sha256_digest(body)
        if toc_digest is not None and toc_digest != self.toc_digest:
            raise DigestMismatch(f"TOC digest is {self.toc_digest}, expected {toc_digest}")
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
        return bytes(_toc_body(self._toc_member))

    def prefetch_range(self):
        """Blob range holding the prioritized files, or None."""
        return self.toc.prefetch_range()

    def _chunk_bytes(self, entry, chunk, compressed):
        """Decompress and verify one chunk from its member's compressed bytes."""
        data = gunzip_prefix(compressed, chunk.inner_offset + chunk.size,
                             f"{entry.name} at {chunk.chunk_offset}")[chunk.inner_offset:]
        if chunk.digest is not None and sha256_digest(data) != chunk.digest:
            raise DigestMismatch(f"{entry.name}: chunk at offset {chunk.chunk_offset} does not "
                                 f"match its chunk digest {chunk.digest}")
        return data

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
            window = self.source.read_at(start, chunks[j - 1].end - start)
            for chunk in chunks[i:j]:
                data = self._chunk_bytes(
                    entry, chunk, window[chunk.offset - start:chunk.end - start])
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
