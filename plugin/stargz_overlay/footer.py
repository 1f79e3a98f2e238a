"""The footers that end stargz (47 bytes) and eStargz (51 bytes) blobs.

Both are an empty gzip member whose Extra field carries the TOC offset as
16 lower-case hex digits followed by ``STARGZ`` (FORMAT.md §2.1, §3.2).
"""

import re
import struct
from dataclasses import dataclass

from .errors import FormatError

ESTARGZ_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
MAX_FOOTER_SIZE = ESTARGZ_FOOTER_SIZE

_MAGIC = b"STARGZ"
_OFFSET_RE = re.compile(rb"[0-9a-f]{16}\Z")
# empty final stored deflate block, then CRC32 = 0 and ISIZE = 0
_EMPTY_BODY = b"\x01\x00\x00\xff\xff" + b"\x00" * 8


@dataclass(frozen=True)
class Footer:
    kind: str        # "estargz" or "stargz"
    toc_offset: int  # blob offset of the gzip member holding the TOC
    size: int        # footer length in bytes


def encode_footer(toc_offset, legacy=False):
    """Return the footer bytes that point at ``toc_offset``."""
    payload = b"%016x" % toc_offset + _MAGIC
    if legacy:
        extra = payload
    else:
        extra = b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + struct.pack("<H", len(extra))
    return header + extra + _EMPTY_BODY


def _gzip_extra(data):
    """Extra field of a gzip member header at the start of ``data``, or None."""
    if len(data) < 12 or data[:3] != b"\x1f\x8b\x08" or not data[3] & 0x04:
        return None
    (xlen,) = struct.unpack_from("<H", data, 10)
    extra = data[12:12 + xlen]
    return extra if len(extra) == xlen else None


def _toc_offset(payload, blob_size, footer_size):
    if len(payload) != 22 or payload[16:] != _MAGIC or not _OFFSET_RE.match(payload[:16]):
        return None
    offset = int(payload[:16], 16)
    if offset >= blob_size - footer_size:
        raise FormatError(
            f"footer points at TOC offset {offset}, beyond the blob ({blob_size} bytes)")
    return offset


def parse_footer(tail, blob_size):
    """Parse the last bytes of a blob (``tail``, up to 51 of them).

    Tries eStargz first, then legacy stargz, as the reference does.
    Raises FormatError when neither footer is present.
    """
    if len(tail) >= ESTARGZ_FOOTER_SIZE:
        footer = tail[-ESTARGZ_FOOTER_SIZE:]
        extra = _gzip_extra(footer)
        if (extra is not None and len(extra) == 26 and extra[:2] == b"SG"
                and struct.unpack_from("<H", extra, 2)[0] == 22):
            offset = _toc_offset(extra[4:], blob_size, ESTARGZ_FOOTER_SIZE)
            if offset is not None:
                return Footer("estargz", offset, ESTARGZ_FOOTER_SIZE)
    if len(tail) >= LEGACY_FOOTER_SIZE:
        footer = tail[-LEGACY_FOOTER_SIZE:]
        extra = _gzip_extra(footer)
        if extra is not None:
            offset = _toc_offset(extra, blob_size, LEGACY_FOOTER_SIZE)
            if offset is not None:
                return Footer("stargz", offset, LEGACY_FOOTER_SIZE)
    raise FormatError("not a stargz/eStargz blob: no stargz footer at the end")
