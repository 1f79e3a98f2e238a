"""Hand-made hostile stargz/eStargz blobs: any TOC, any bytes, no writer checks.

``BlobBuilder`` appends gzip members and raw bytes, then ``finish(entries)``
writes the TOC member (a tar holding ``stargz.index.json``) and the footer.
Nothing is validated here: that is the point.  Helpers build the entries
(``reg``, ``dir_``, ``symlink``, ``hardlink``) with correct digests unless told
otherwise, and ``zeros_member`` writes a gzip bomb without holding it in memory.
"""

import hashlib
import io
import json
import tarfile
import zlib

from stargz_overlay.footer import encode_footer

MB = 1 << 20


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def gzip_bytes(data, level=6):
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def zeros_member(size, level=9, block=8 * MB):
    """A gzip member of ``size`` zero bytes (a bomb: ~1/1000 of ``size``)."""
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    zero = bytes(block)
    out = []
    left = size
    while left:
        n = min(left, block)
        out.append(c.compress(zero[:n]))
        left -= n
    out.append(c.flush())
    return b"".join(out)


def zeros_digest(size, block=8 * MB):
    h = hashlib.sha256()
    zero = bytes(block)
    left = size
    while left:
        n = min(left, block)
        h.update(zero[:n])
        left -= n
    return "sha256:" + h.hexdigest()


def toc_tar(body, name="stargz.index.json", claimed_size=None):
    """The uncompressed TOC member: one tar entry ``name`` holding ``body``."""
    info = tarfile.TarInfo(name)
    info.size = len(body) if claimed_size is None else claimed_size
    info.mode = 0o644
    header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    pad = b"\0" * (-len(body) % tarfile.BLOCKSIZE)
    return header + body + pad + b"\0" * (2 * tarfile.BLOCKSIZE)


class BlobBuilder:
    """Append members, then ``finish`` with any TOC."""

    def __init__(self):
        self.buf = io.BytesIO()

    @property
    def offset(self):
        return self.buf.tell()

    def member(self, data, level=6):
        """Append ``gzip(data)``; return its blob offset."""
        off = self.offset
        self.buf.write(gzip_bytes(data, level))
        return off

    def raw(self, data):
        off = self.offset
        self.buf.write(data)
        return off

    def finish(self, entries=None, toc_json=None, toc_member=None, legacy=False):
        """The blob bytes: data so far, TOC member, footer."""
        if toc_member is None:
            if toc_json is None:
                toc_json = json.dumps({"version": 1, "entries": entries}).encode()
            toc_member = gzip_bytes(toc_tar(toc_json))
        toc_offset = self.offset
        return self.buf.getvalue() + toc_member + encode_footer(toc_offset, legacy=legacy)

    def write(self, path, *args, **kw):
        data = self.finish(*args, **kw)
        with open(path, "wb") as f:
            f.write(data)
        return path


def reg(name, data, offset, digests=True, **extra):
    """A regular-file entry whose single chunk is the member at ``offset``."""
    entry = {"name": name, "type": "reg", "size": len(data), "mode": 0o644,
             "modtime": "2023-11-14T22:13:20Z"}
    if data:
        entry["offset"] = offset
        if digests:
            entry["chunkDigest"] = sha(data)
    if digests:
        entry["digest"] = sha(data)
    entry.update(extra)
    return entry


def dir_(name, **extra):
    return {"name": name, "type": "dir", "mode": 0o755, **extra}


def symlink(name, target, **extra):
    return {"name": name, "type": "symlink", "linkName": target, **extra}


def hardlink(name, target, **extra):
    return {"name": name, "type": "hardlink", "linkName": target, **extra}


def files_layer(builder, files, prefix_entries=()):
    """Entries for ``{name: bytes}``, each in its own member; returns the entry list."""
    entries = list(prefix_entries)
    for name, data in files.items():
        entries.append(reg(name, data, builder.member(data)))
    return entries
