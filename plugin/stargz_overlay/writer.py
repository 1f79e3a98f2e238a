"""Writing eStargz (and legacy stargz) blobs from tar or tar.gz input.

The output is a valid tar.gz: a new gzip member starts at every chunk of
every non-empty regular file, the TOC is the last tar entry, and a footer
points at it (FORMAT.md §1).  Input quirks the reference mishandles are
dealt with here (FORMAT.md §5): duplicates (the last definition wins),
self-hardlinks, hardlinks before their targets, PAX global headers, GNU and
PAX sparse files (written dense) and implied parent directories.  Names
that are not UTF-8 cannot be represented in a JSON TOC and are refused.
"""

import base64
import gzip
import hashlib
import io
import json
import math
import os
import posixpath
import shutil
import struct
import tarfile
import tempfile
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

from .digests import hasher_digest, sha256_digest
from .errors import FormatError
from .footer import encode_footer
from .toc import (LANDMARKS, MAX_ID, MAX_OFFSET, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK,
                  TOC_NAME, _check_link, _check_name, _check_xattr_name, clean_name)

DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_COMPRESSION_LEVEL = 6
LANDMARK_CONTENT = b"\x0f"
_COPY_BLOCK = 1 << 20
_PARALLEL_MIN = 4 << 10    # smaller members are compressed inline
_KEPT_PAX_PREFIXES = ("SCHILY.xattr.", "LIBARCHIVE.xattr.", "SCHILY.acl.")
_TAR_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg",
    tarfile.GNUTYPE_SPARSE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


@dataclass
class ConvertResult:
    """What a conversion produced."""

    toc_digest: str
    diff_id: str
    uncompressed_size: int
    compressed_size: int
    blob_digest: str
    entries: int
    missed_prioritized: list = field(default_factory=list)


def _gzip_member(data, extra, level):
    """One complete gzip member holding ``data``."""
    if extra is None:
        header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    else:
        header = (b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
                  + struct.pack("<H", len(extra)) + extra)
    comp = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = comp.compress(data) + comp.flush()
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


class _MemberWriter:
    """Writes an uncompressed tar stream as gzip members, compressed in parallel.

    ``start()`` opens a member and returns its index; its blob offset is
    known once every earlier member has been written (``offsets[index]``).
    """

    def __init__(self, out, level, workers):
        self.out = out
        self.level = level
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self.max_pending = 2 * workers
        self.pending = deque()            # (index, Future or bytes), in blob order
        self.offsets = []                 # blob offset of each member once written
        self.position = 0                 # compressed bytes written so far
        self.uncompressed = 0
        self.diff_id = hashlib.sha256()
        self.blob = hashlib.sha256()
        self._parts = None
        self._extra = None

    def _emit(self, data):
        self.out.write(data)
        self.blob.update(data)
        self.position += len(data)

    def _write_oldest(self):
        index, member = self.pending.popleft()
        self.offsets[index] = self.position
        self._emit(member.result() if isinstance(member, Future) else member)

    def _submit(self):
        if self._parts is None:
            return
        data = b"".join(self._parts)
        job = (data, self._extra, self.level)
        self._parts = None
        index = len(self.offsets) - 1
        if self.pool is None or len(data) < _PARALLEL_MIN:
            self.pending.append((index, _gzip_member(*job)))
        else:
            self.pending.append((index, self.pool.submit(_gzip_member, *job)))
        while len(self.pending) > self.max_pending:
            self._write_oldest()

    def start(self, extra=None):
        """Close the current member and open a new one; return its index."""
        self._submit()
        self._parts = []
        self._extra = extra
        self.offsets.append(None)
        return len(self.offsets) - 1

    def write(self, data):
        self.diff_id.update(data)
        self.uncompressed += len(data)
        self._parts.append(data)

    def flush(self):
        """Write every member started so far; their offsets are then known."""
        self._submit()
        while self.pending:
            self._write_oldest()

    def raw(self, data):
        """Write bytes outside any member (the footer)."""
        self.flush()
        self._emit(data)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _round_mtime(mtime):
    """Whole seconds, half rounded away from zero as Go's ``Round(time.Second)``."""
    return int(math.floor(mtime + 0.5)) if mtime >= 0 else -int(math.floor(-mtime + 0.5))


def _modtime(seconds):
    if seconds == 0:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _open_input(source, spool):
    """A seekable uncompressed tar for ``source`` (path or binary file object)."""
    fileobj = open(source, "rb") if isinstance(source, (str, bytes)) or hasattr(
        source, "__fspath__") else source
    magic = fileobj.read(2)
    fileobj.seek(0)
    if magic == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz:
                shutil.copyfileobj(gz, spool, _COPY_BLOCK)
        except (OSError, EOFError, zlib.error) as exc:
            raise FormatError(f"input is not a valid gzip stream: {exc}") from None
        spool.seek(0)
        return spool
    return fileobj


def _check_utf8(name, what="name"):
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(
            f"input entry {name.encode('utf-8', 'surrogateescape')!r}: the {what} is not "
            f"UTF-8, which a JSON TOC cannot hold; keep this layer as plain gzip") from None


def _text(value):
    """An informational string (user/group name) as valid UTF-8: bytes that are not
    become U+FFFD, as the reference writer's JSON does."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_input(info, name, kind):
    """Refuse here, naming the input entry, what the reader would refuse in the TOC."""
    try:
        _check_name(name)
        if kind == "symlink":
            _check_link(info.linkname, name)
        for key in info.pax_headers:
            if key.startswith("SCHILY.xattr."):
                _check_xattr_name(key[len("SCHILY.xattr."):], name)
        for what, value, limit in (("uid", info.uid, MAX_ID), ("gid", info.gid, MAX_ID),
                                   ("size", info.size, MAX_OFFSET),
                                   ("devmajor", info.devmajor, MAX_ID),
                                   ("devminor", info.devminor, MAX_ID)):
            if not 0 <= value <= limit:
                raise FormatError(f"{what} {value} is out of range")
    except FormatError as exc:
        raise FormatError(f"input entry {info.name!r}: {exc}") from None


def _check_parents(members):
    """No entry may sit below a name that is not a directory (the reader refuses it)."""
    for name in members:
        parent = posixpath.dirname(name)
        while parent:
            above = members.get(parent)
            if above is not None and not above.isdir():
                raise FormatError(f"input entry {name!r} is inside {parent!r}, which is not a "
                                  f"directory")
            parent = posixpath.dirname(parent)


def _read_members(tar):
    """Input entries by cleaned name, later definitions winning, in input order."""
    members = {}
    try:
        for info in tar:
            _check_utf8(info.name)
            _check_utf8(info.linkname, "link target")
            name = clean_name(info.name)
            kind = _TAR_TYPES.get(info.type)
            if kind is None:
                raise FormatError(f"input entry {info.name!r} has unsupported tar type "
                                  f"{info.type!r}")
            if not name and kind != "dir":
                raise FormatError(f"input entry {info.name!r} names the layer's root but is "
                                  f"a {kind}, not a directory")
            _check_input(info, name, kind)
            if name in LANDMARKS or name == TOC_NAME:
                continue
            if kind == "hardlink" and clean_name(info.linkname) == name:
                if name in members:
                    continue            # "f" then hardlink f->f: keep the file
                raise FormatError(f"input entry {info.name!r} is a hardlink to itself")
            members.pop(name, None)
            members[name] = info
    except (tarfile.TarError, ValueError, OverflowError) as exc:
        # (tarfile raises ValueError for malformed PAX numbers, e.g. "size=v")
        raise FormatError(f"input is not a valid tar archive: {exc}") from None
    _check_parents(members)
    return members


def _order(members, prioritized):
    """Entry order: prioritized files (with parents and link targets), then the rest.

    Returns ``(names, missed, landmark_index)`` where ``landmark_index`` is how
    many entries precede the landmark.
    """
    order = []
    placed = set()

    def place(name, chain=()):
        if name in placed or name not in members:
            return
        if name in chain:
            raise FormatError(f"hardlink loop through {name!r}")
        parent = posixpath.dirname(name)
        while parent:
            place(parent, chain)
            parent = posixpath.dirname(parent)
        info = members[name]
        if info.type == tarfile.LNKTYPE:
            target = clean_name(info.linkname)
            if target not in members:
                raise FormatError(f"input entry {info.name!r} is a hardlink to {target!r}, "
                                  f"which is not in the layer")
            if members[target].type == tarfile.DIRTYPE:
                raise FormatError(f"input entry {info.name!r} is a hardlink to a directory")
            place(target, chain + (name,))
        placed.add(name)
        order.append(name)

    missed = []
    for wanted in prioritized or ():
        name = clean_name(wanted)
        if name in members:
            place(name)
        else:
            missed.append(wanted)
    landmark_index = len(order)
    for name in members:
        place(name)
    return order, missed, landmark_index


class _Converter:
    def __init__(self, out, legacy, chunk_size, level, progress, total, workers):
        self.w = _MemberWriter(out, level, workers)
        self.legacy = legacy
        self.chunk_size = chunk_size
        self.progress = progress
        self.total = total
        self.done = 0
        self.toc = []
        self._seen_users = set()
        self._seen_groups = set()
        self._with_offset = []
        self.w.start()

    def _toc_entry(self, info, name, kind):
        entry = {"name": name if name else "./", "type": kind}
        if kind == "reg" and info.size:
            entry["size"] = info.size
        modtime = _modtime(_round_mtime(info.mtime))
        if modtime:
            entry["modtime"] = modtime
        if kind in ("symlink", "hardlink"):
            entry["linkName"] = clean_name(info.linkname) if kind == "hardlink" else info.linkname
        for key, value in (("mode", info.mode & 0o7777), ("uid", info.uid), ("gid", info.gid)):
            if value:
                entry[key] = value
        if info.uname and info.uid not in self._seen_users:
            self._seen_users.add(info.uid)
            entry["userName"] = _text(info.uname)
        if info.gname and info.gid not in self._seen_groups:
            self._seen_groups.add(info.gid)
            entry["groupName"] = _text(info.gname)
        if kind in ("char", "block"):
            if info.devmajor:
                entry["devMajor"] = info.devmajor
            if info.devminor:
                entry["devMinor"] = info.devminor
        xattrs = {key[len("SCHILY.xattr."):]: value
                  for key, value in info.pax_headers.items() if key.startswith("SCHILY.xattr.")}
        if xattrs:
            entry["xattrs"] = {
                key: base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()
                for key, value in sorted(xattrs.items())}
        return entry

    def add(self, info, name, payload):
        """Append one entry; ``payload`` is a file object for regular files."""
        kind = _TAR_TYPES[info.type]
        if not name:
            tar_name = "./"
        else:
            tar_name = name + "/" if kind == "dir" else name
        out = tarfile.TarInfo(tar_name)
        out.type = tarfile.REGTYPE if kind == "reg" else info.type
        out.mode = info.mode & 0o7777
        out.uid, out.gid, out.uname, out.gname = info.uid, info.gid, info.uname, info.gname
        out.mtime = info.mtime
        out.linkname = clean_name(info.linkname) if kind == "hardlink" else info.linkname
        out.devmajor, out.devminor = info.devmajor, info.devminor
        out.size = info.size if kind == "reg" else 0
        out.pax_headers = {k: v for k, v in info.pax_headers.items()
                           if k.startswith(_KEPT_PAX_PREFIXES)}
        self.w.write(out.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        entry = self._toc_entry(info, name, kind)
        self.toc.append(entry)
        if kind == "reg":
            entry["digest"] = self._payload(entry, payload, out.size)

    def _payload(self, entry, payload, size):
        whole = hashlib.sha256()
        written = 0
        current = entry
        while written < size:
            current["offset"] = self.w.start()      # a member index until close()
            self._with_offset.append(current)
            if written:
                current["chunkOffset"] = written
            n = min(self.chunk_size, size - written)
            if size - written >= self.chunk_size:
                current["chunkSize"] = self.chunk_size
            chunk = hashlib.sha256()
            left = n
            while left:
                block = payload.read(min(left, _COPY_BLOCK))
                if not block:
                    raise FormatError(f"input entry {entry['name']!r} is truncated")
                chunk.update(block)
                whole.update(block)
                self.w.write(block)
                left -= len(block)
                self.done += len(block)
                if self.progress:
                    self.progress(self.done, self.total)
            if not self.legacy:
                current["chunkDigest"] = hasher_digest(chunk)
            if current is not entry:
                self.toc.append(current)
            written += n
            current = {"name": entry["name"], "type": "chunk"}
        if size % tarfile.BLOCKSIZE:
            self.w.write(b"\0" * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))
        return hasher_digest(whole)

    def add_landmark(self, name):
        info = tarfile.TarInfo(name)
        info.size = len(LANDMARK_CONTENT)
        info.mode = 0
        self.add(info, name, io.BytesIO(LANDMARK_CONTENT))

    def write_all(self, tar, members, order, landmark_index):
        """Write ``order``'s entries with the landmark, then the TOC; return the TOC JSON."""
        if not self.legacy and landmark_index == 0:
            self.add_landmark(NO_PREFETCH_LANDMARK)
        for index, name in enumerate(order):
            if index == landmark_index and index and not self.legacy:
                self.add_landmark(PREFETCH_LANDMARK)
            info = members[name]
            try:
                payload = tar.extractfile(info) if info.isreg() else None
                self.add(info, name, payload)
            except (tarfile.TarError, OSError, ValueError, OverflowError) as exc:
                raise FormatError(f"input entry {info.name!r}: {exc}") from None
        if not self.legacy and landmark_index and landmark_index == len(order):
            self.add_landmark(PREFETCH_LANDMARK)
        return self.close()

    def close(self):
        self.w.flush()
        for entry in self._with_offset:
            entry["offset"] = self.w.offsets[entry["offset"]]
        toc = {"version": 1, "entries": self.toc}
        toc_json = json.dumps(toc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        toc_member = self.w.start(b"stargz.toc" if self.legacy else None)
        info = tarfile.TarInfo(TOC_NAME)
        info.size = len(toc_json)
        info.mode = 0o644
        self.w.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self.w.write(toc_json)
        if len(toc_json) % tarfile.BLOCKSIZE:
            self.w.write(b"\0" * (tarfile.BLOCKSIZE - len(toc_json) % tarfile.BLOCKSIZE))
        self.w.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self.w.flush()
        self.w.raw(encode_footer(self.w.offsets[toc_member], legacy=self.legacy))
        return toc_json


def convert(source, out, legacy=False, chunk_size=DEFAULT_CHUNK_SIZE, prioritized=None,
            compression_level=DEFAULT_COMPRESSION_LEVEL, progress=None, workers=None):
    """Convert a tar or tar.gz (path or file object) into an eStargz blob written to ``out``.

    ``prioritized`` names the files a workload reads first; they go before
    ``.prefetch.landmark``.  ``progress(done, total)`` is called with bytes of
    file content written.  Members are compressed by ``workers`` threads
    (default: one per CPU); the output does not depend on their number.
    Returns a ConvertResult.
    """
    if chunk_size <= 0:
        raise FormatError("chunk size must be positive")
    if not 0 <= compression_level <= 9:
        raise FormatError("compression level must be between 0 and 9")
    with tempfile.TemporaryFile() as spool:
        fileobj = _open_input(source, spool)
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r:", errors="surrogateescape")
        except (tarfile.TarError, ValueError, OverflowError) as exc:
            raise FormatError(f"input is not a tar or tar.gz archive: {exc}") from None
        with tar:
            members = _read_members(tar)
            order, missed, landmark_index = _order(members, prioritized)
            total = sum(members[n].size for n in order if members[n].isreg())
            conv = _Converter(out, legacy, chunk_size, compression_level, progress, total,
                              workers or os.cpu_count() or 1)
            try:
                toc_json = conv.write_all(tar, members, order, landmark_index)
            finally:
                conv.w.close()
    w = conv.w
    return ConvertResult(
        toc_digest=sha256_digest(toc_json),
        diff_id=hasher_digest(w.diff_id),
        uncompressed_size=w.uncompressed,
        compressed_size=w.position,
        blob_digest=hasher_digest(w.blob),
        entries=len(order),
        missed_prioritized=missed,
    )
