"""The table of contents (``stargz.index.json``) as a filesystem tree.

``parse_toc`` validates the JSON and builds a tree of ``Entry`` objects:
names cleaned as the reference does (FORMAT.md §3.6), implied parent
directories created, the last definition of a name winning, hardlinks
resolved to their target's ``Entry`` and chunk ranges computed.  Anything
inconsistent is a ``FormatError``; nothing is guessed.
"""

import base64
import binascii
import bisect
import contextlib
import gc
import json
import posixpath
import re
from datetime import datetime
from types import MappingProxyType

from .errors import FormatError

TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARKS = (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK)
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

_NO_XATTRS = MappingProxyType({})
FILE_TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_XATTR_NAME_BYTES = 255
MAX_ID = (1 << 32) - 1          # uid, gid, device numbers: what struct stat can hold
MAX_OFFSET = (1 << 63) - 1      # sizes and offsets: off_t
# Bounds on the JSON itself, counted before it is parsed (a cheap upper bound:
# braces, brackets and commas inside strings count too).  A real TOC has one
# object per entry (two with xattrs), one array and about 13 commas per entry;
# these allow a million entries and keep a hostile TOC (millions of tiny
# objects, arrays or numbers) from costing more memory than such a layer.
MAX_TOC_ENTRIES = 1_000_000
MAX_JSON_CONTAINERS = 2 * MAX_TOC_ENTRIES
MAX_JSON_VALUES = 16 * MAX_TOC_ENTRIES
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def clean_name(name):
    """Normalise a tar/TOC name: ``path.Clean("/"+name)`` without the leading ``/``."""
    name = name.lstrip("/")
    if name[:1] != "." and "/." not in name and "//" not in name and name[-1:] != "/":
        return name         # no empty, "." or ".." component: already clean
    return posixpath.normpath("/" + name).lstrip("/")


def descend(node, name):
    """The entry at the clean path ``name`` below the directory entry ``node``, or None
    (any tree whose entries have ``children``: a dict, or None for a non-directory)."""
    for part in name.split("/") if name else ():
        if node.children is None:
            return None
        node = node.children.get(part)
        if node is None:
            return None
    return node


class Chunk:
    """One gzip-compressed piece of a regular file."""

    __slots__ = ("offset", "chunk_offset", "size", "digest", "inner_offset", "end")

    def __init__(self, offset, chunk_offset, size, digest, inner_offset=0, end=0):
        self.offset = offset              # blob offset of the gzip member
        self.chunk_offset = chunk_offset  # offset of these bytes in the file
        self.size = size                  # uncompressed length
        self.digest = digest              # "sha256:..." or None (legacy stargz)
        self.inner_offset = inner_offset  # bytes to skip inside the member
        self.end = end                    # blob offset where the member ends

    def __repr__(self):
        return (f"Chunk(offset={self.offset}, chunk_offset={self.chunk_offset}, "
                f"size={self.size}, end={self.end})")


class Entry:
    """A file, directory, link or device of the layer."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "user_name", "group_name", "mtime",
                 "size", "link_name", "dev_major", "dev_minor", "xattrs", "digest", "chunks",
                 "nlink", "children", "ino")

    def __init__(self, name, type_, mode=0o755, uid=0, gid=0):
        self.name = name
        self.type = type_
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.user_name = ""
        self.group_name = ""
        self.mtime = 0
        self.size = 0
        self.link_name = ""
        self.dev_major = 0
        self.dev_minor = 0
        self.xattrs = _NO_XATTRS          # replaced by a dict when the entry has some
        self.digest = None
        self.chunks = ()                  # a list for regular files with content
        self.nlink = 2 if type_ == "dir" else 1
        self.children = {} if type_ == "dir" else None
        self.ino = 0

    def __repr__(self):
        return f"Entry({self.name!r}, {self.type}, size={self.size})"


class TOC:
    """A parsed TOC: the tree, the entries in TOC order and the landmark."""

    def __init__(self, root, entries, landmark):
        self.root = root
        self.entries = entries      # distinct Entry objects, root first, TOC order
        self.landmark = landmark    # Entry of .prefetch.landmark/.no.prefetch.landmark or None

    def lookup(self, path):
        """Entry at ``path`` (any spelling), or None."""
        return descend(self.root, clean_name(path))

    def walk(self):
        """Yield ``(path, entry)`` for every name in the tree, parents first, sorted."""
        stack = [("", self.root)]
        while stack:
            path, entry = stack.pop()
            yield path, entry
            if entry.children:
                for name in sorted(entry.children, reverse=True):
                    stack.append((f"{path}/{name}" if path else name, entry.children[name]))

    def prefetch_range(self):
        """Blob range ``(start, end)`` of the prioritized files, or None."""
        mark = self.landmark
        if mark is None or mark.name != PREFETCH_LANDMARK or not mark.chunks:
            return None
        return (0, mark.chunks[0].offset)

    def data_entries(self):
        """Regular files with content, each once (hardlinks share their target)."""
        return [e for e in self.entries if e.type == "reg" and e.size > 0]


def _int(raw, key, name, limit=MAX_OFFSET):
    value = raw.get(key, 0)
    if type(value) is int and 0 <= value <= limit:
        return value
    if type(value) is not int or value < 0:
        raise FormatError(f"TOC entry {name!r}: {key} must be a non-negative integer")
    raise FormatError(f"TOC entry {name!r}: {key} {value} is larger than {limit}")


def _str(raw, key, name):
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise FormatError(f"TOC entry {name!r}: {key} must be a string")
    return value


_mtime_cache = {}


def _mtime(text, name):
    if not text:
        return 0
    value = _mtime_cache.get(text)
    if value is None:
        try:
            value = int(datetime.fromisoformat(text).timestamp())
        except ValueError:
            raise FormatError(f"TOC entry {name!r}: bad modtime {text!r}") from None
        if len(_mtime_cache) < 65536:
            _mtime_cache[text] = value
    return value


def _utf8(text, what):
    """``text`` as UTF-8; lone surrogates (``\\udcff`` in the JSON) name no byte string."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{what} {text!r} is not valid UTF-8") from None


def _check_name(name):
    if "\0" in name:
        raise FormatError(f"TOC entry name {name!r} contains a NUL byte")
    encoded = _utf8(name, "TOC entry name")
    if len(encoded) > MAX_PATH_BYTES:
        raise FormatError(f"TOC entry name is longer than {MAX_PATH_BYTES} bytes")
    if len(encoded) > MAX_NAME_BYTES:
        for part in name.split("/"):
            if len(part.encode("utf-8")) > MAX_NAME_BYTES:
                raise FormatError(f"TOC entry {name!r}: a component is longer than 255 bytes")


def _check_link(target, name):
    if "\0" in target:
        raise FormatError(f"TOC entry {name!r}: link target {target!r} contains a NUL byte")
    if len(_utf8(target, f"TOC entry {name!r}: link target")) > MAX_PATH_BYTES:
        raise FormatError(f"TOC entry {name!r}: link target is longer than {MAX_PATH_BYTES} "
                          f"bytes")


def _check_xattr_name(key, name):
    if not isinstance(key, str) or not key or "\0" in key \
            or len(_utf8(key, f"TOC entry {name!r}: xattr")) > MAX_XATTR_NAME_BYTES:
        raise FormatError(f"TOC entry {name!r}: xattr name {key!r} is empty, contains a NUL "
                          f"byte or is longer than {MAX_XATTR_NAME_BYTES} bytes")


def _make_entry(raw, name, kind):
    entry = Entry(name, kind, _int(raw, "mode", name) & 0o7777,
                  _int(raw, "uid", name, MAX_ID), _int(raw, "gid", name, MAX_ID))
    entry.user_name = _str(raw, "userName", name)
    entry.group_name = _str(raw, "groupName", name)
    entry.mtime = _mtime(_str(raw, "modtime", name), name)
    entry.link_name = _str(raw, "linkName", name)
    if kind == "symlink":
        _check_link(entry.link_name, name)
    if kind == "reg":
        entry.size = _int(raw, "size", name)
        entry.digest = _digest(raw, "digest", name)
    elif kind in ("char", "block"):
        entry.dev_major = _int(raw, "devMajor", name, MAX_ID)
        entry.dev_minor = _int(raw, "devMinor", name, MAX_ID)
    xattrs = raw.get("xattrs")
    if xattrs:
        if not isinstance(xattrs, dict):
            raise FormatError(f"TOC entry {name!r}: xattrs must be an object")
        entry.xattrs = {}
        for key, value in xattrs.items():
            _check_xattr_name(key, name)
            try:
                entry.xattrs[key] = base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise FormatError(f"TOC entry {name!r}: xattr {key!r} is not base64") from None
    return entry


def _digest(raw, key, name):
    """A ``sha256:<64 hex>`` digest field, or None when absent or empty.

    Validated because digests end up in cache keys and file names.
    """
    value = raw.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise FormatError(f"TOC entry {name!r}: {key} {value!r} is not a sha256 digest")
    return value


def _chunk(raw, name):
    digest = _digest(raw, "chunkDigest", name)
    return Chunk(_int(raw, "offset", name), _int(raw, "chunkOffset", name),
                 _int(raw, "chunkSize", name), digest, _int(raw, "innerOffset", name))


def _check_json_size(toc_json):
    """Refuse JSON that would cost more memory than a TOC of MAX_TOC_ENTRIES entries."""
    if isinstance(toc_json, str):
        braces, brackets, commas = "{", "[", ","
    else:
        braces, brackets, commas = b"{", b"[", b","
    containers = toc_json.count(braces) + toc_json.count(brackets)
    values = toc_json.count(commas)
    if containers > MAX_JSON_CONTAINERS or values > MAX_JSON_VALUES:
        raise FormatError(f"TOC is too large: {containers} JSON objects/arrays and {values} "
                          f"values; at most {MAX_TOC_ENTRIES} entries are supported")


def _load_json(toc_json):
    _check_json_size(toc_json)
    try:
        doc = json.loads(toc_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"TOC is not valid JSON: {exc}") from None
    except RecursionError:
        raise FormatError("TOC JSON is nested too deeply") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise FormatError("TOC JSON has no \"entries\" list")
    if doc.get("version") != 1:
        raise FormatError(f"unsupported TOC version {doc.get('version')!r} (expected 1)")
    if len(doc["entries"]) > MAX_TOC_ENTRIES:
        raise FormatError(f"TOC has {len(doc['entries'])} entries; at most {MAX_TOC_ENTRIES} "
                          f"are supported")
    return doc["entries"]


def _finish_chunks(entry, boundaries, data_end):
    """Fill chunk sizes and compressed ends; check they tile the file exactly."""
    if not entry.chunks:
        return
    if len(entry.chunks) > 1:
        entry.chunks.sort(key=lambda c: c.chunk_offset)
    pos = 0
    for i, chunk in enumerate(entry.chunks):
        if chunk.chunk_offset != pos:
            raise FormatError(f"TOC entry {entry.name!r}: chunks do not cover the file "
                              f"contiguously (gap or overlap at {pos})")
        last = i == len(entry.chunks) - 1
        remaining = entry.size - pos
        if chunk.size == 0 or chunk.size > remaining or (last and chunk.size < remaining):
            if chunk.size and not last:
                raise FormatError(f"TOC entry {entry.name!r}: chunk at {pos} exceeds the file size")
            chunk.size = remaining
        if chunk.offset >= data_end:
            raise FormatError(f"TOC entry {entry.name!r}: chunk offset {chunk.offset} is "
                              f"outside the blob's data")
        chunk.end = boundaries[bisect.bisect_right(boundaries, chunk.offset)]
        pos += chunk.size
    if pos != entry.size or (entry.size and not entry.chunks):
        raise FormatError(f"TOC entry {entry.name!r}: chunks hold {pos} bytes but size is "
                          f"{entry.size}")


def parse_toc(toc_json, data_end):
    """Build a TOC from JSON text or bytes; ``data_end`` is the blob offset of the TOC member."""
    return build_toc(load_entries(toc_json), data_end)


def load_entries(toc_json):
    """The raw entry list of TOC JSON (the caller may then drop the JSON text)."""
    with _gc_paused():
        return _load_json(toc_json)


def build_toc(raw_entries, data_end):
    """Build the tree from ``load_entries``'s list, which is consumed (emptied) meanwhile."""
    with _gc_paused():
        return _parse_toc(raw_entries, data_end)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector.

    A TOC becomes hundreds of thousands of new objects that hold no cycles;
    repeated collections over them would make loading several times slower.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _parse_toc(raw_entries, data_end):
    by_name = {}         # cleaned name -> Entry (later definitions win, at their position)
    hardlinks = {}       # cleaned name -> cleaned target
    offsets = set()
    current = None       # the reg entry that following "chunk" entries belong to
    user_names = {}      # uid -> userName: writers name each id only once
    group_names = {}     # gid -> groupName
    root = None
    for index in range(len(raw_entries)):
        raw = raw_entries[index]
        raw_entries[index] = None        # free the JSON as the tree grows
        if not isinstance(raw, dict):
            raise FormatError("TOC entry is not an object")
        kind = raw.get("type")
        raw_name = raw.get("name")
        if not isinstance(raw_name, str):
            raise FormatError("TOC entry without a name")
        if kind == "chunk":
            if current is None:
                raise FormatError(f"TOC chunk entry {raw_name!r} follows no regular file")
            chunk = _chunk(raw, current.name)
            offsets.add(chunk.offset)
            current.chunks.append(chunk)
            continue
        if kind not in FILE_TYPES:
            raise FormatError(f"TOC entry {raw_name!r} has unknown type {kind!r}")
        _check_name(raw_name)
        name = clean_name(raw_name)
        current = None
        if kind == "hardlink":
            if not name:
                raise FormatError("the TOC's root entry is a hardlink, not a directory")
            target = clean_name(_str(raw, "linkName", name))
            if target == name and name in by_name:
                continue     # "f" then hardlink f->f: keep the regular file
            by_name.pop(name, None)
            hardlinks[name] = target
            continue
        entry = _make_entry(raw, name, kind)
        if entry.user_name:
            user_names[entry.uid] = entry.user_name
        else:
            entry.user_name = user_names.get(entry.uid, "")
        if entry.group_name:
            group_names[entry.gid] = entry.group_name
        else:
            entry.group_name = group_names.get(entry.gid, "")
        if kind == "reg" and entry.size:
            chunk = _chunk(raw, name)
            offsets.add(chunk.offset)
            entry.chunks = [chunk]
            current = entry
        if not name:
            if kind != "dir":
                raise FormatError("the TOC's root entry is not a directory")
            root = entry
            continue
        hardlinks.pop(name, None)
        by_name.pop(name, None)
        by_name[name] = entry

    boundaries = sorted(offsets) + [data_end]
    for entry in by_name.values():
        if entry.type == "reg":
            _finish_chunks(entry, boundaries, data_end)

    if root is None:
        root = Entry("", "dir")
    root.name = ""
    landmark = None
    for mark in LANDMARKS:
        if mark in by_name:
            landmark = by_name.pop(mark)
    entries = [root]

    def parent_of(name):
        parent_name = name.rpartition("/")[0]
        if not parent_name:
            return root
        parent = by_name.get(parent_name)
        if parent is None:
            parent = Entry(parent_name, "dir")
            by_name[parent_name] = parent
            pending.append(parent)
        elif parent.type != "dir":
            raise FormatError(f"TOC entry {name!r} is inside {parent_name!r}, "
                              f"which is not a directory")
        return parent

    pending = list(by_name.values())
    for name in hardlinks:
        parent_of(name)
    i = 0
    while i < len(pending):          # grows while implied parents are created
        entry = pending[i]
        i += 1
        parent = parent_of(entry.name)
        parent.children[entry.name.rpartition("/")[2]] = entry
        if entry.type == "dir":
            parent.nlink += 1
    entries.extend(pending)

    for name, target in hardlinks.items():
        seen = {name}
        while target in hardlinks:
            if target in seen:
                raise FormatError(f"hardlink {name!r} is part of a link loop")
            seen.add(target)
            target = hardlinks[target]
        entry = by_name.get(target)
        if entry is None:
            raise FormatError(f"hardlink {name!r} points at {target!r}, which is not in the layer")
        if entry.type == "dir":
            raise FormatError(f"hardlink {name!r} points at a directory")
        siblings = parent_of(name).children
        if posixpath.basename(name) in siblings:
            raise FormatError(f"hardlink {name!r} clashes with a directory of the same name")
        siblings[posixpath.basename(name)] = entry
        entry.nlink += 1
    for index, entry in enumerate(entries, 1):
        entry.ino = index
    return TOC(root, entries, landmark)
