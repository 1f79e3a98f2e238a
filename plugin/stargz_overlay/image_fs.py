"""A read-only merged view of an image's filesystem across its layers.

Layers stack with OCI whiteouts: ``.wh.NAME`` hides NAME of the layers below,
``.wh..wh..opq`` hides everything below in its directory.  Paths resolve
component by component through that merged tree, following symlinks inside
the image root (``..`` stops at ``/``, at most 40 links per lookup) and each
result says which layer provides it.

eStargz and stargz layers are read lazily through their TOC: only the chunks
of files actually read are fetched (each request reading up to 64 KiB ahead,
as neighbouring files tend to be read next), each verified against its chunk
digest.
Other gzip or tar layers are downloaded once, checked against the layer
digest, decompressed to a temporary tar and indexed.  When the endpoint has a
spool (``convert --analyze``), the layers that the conversion will download
anyway are read from its local copies instead.
"""

import hashlib
import os
import posixpath
import sys
import tarfile
import tempfile
import zlib
from collections import OrderedDict

from .digests import hasher_digest, sha256_digest
from .errors import DigestMismatch, FormatError, StargzError
from .footer import MAX_FOOTER_SIZE, parse_footer
from .image_convert import LayoutEndpoint, RegistryEndpoint, copy_file
from .layer_view import CountingSource
from .progress import Progress, human_bytes
from .reader import StargzReader, gunzip_prefix
from .registry import (INDEX_TYPES, TOC_DIGEST_ANNOTATION, json_object, parse_platform,
                       select_platform)
from .source import FileSource
from .toc import clean_name, descend

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_SYMLINKS = 40
CHUNK_CACHE_BYTES = 64 << 20
READ_AHEAD = 64 << 10          # eStargz: files next to the one read tend to be read next
WINDOW_BYTES = 16 << 20        # compressed read-ahead windows kept per layer
_BLOCK = 4 << 20               # decompressed bytes per step: bounds a gzip bomb
_MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json")


def _stderr_note(text):
    print(text, file=sys.stderr)


class Node:
    """A path found in the merged tree: the entry that the top-most layer gives it."""

    __slots__ = ("path", "layer", "entry", "via")

    def __init__(self, path, layer, entry, via):
        self.path = path            # absolute, symlinks resolved
        self.layer = layer          # the layer object providing it (``.index``, ``.digest``)
        self.entry = entry          # that layer's entry (type, size, mode, mtime, link_name)
        self.via = via              # ((symlink path, layer index), ...) followed on the way

    @property
    def type(self):
        return self.entry.type

    @property
    def size(self):
        return self.entry.size

    def __repr__(self):
        return f"Node({self.path!r}, layer {self.layer.index}, {self.entry.type})"


# -- layers -----------------------------------------------------------------

class _Layer:
    """What the merged tree asks of a layer: its root entry, an entry's children by
    name, and file bytes (``_read`` of a range within the file's size)."""

    def root(self):
        return self._root

    def child(self, entry, name):
        children = entry.children
        return children.get(name) if children else None

    def names(self, entry):
        return list(entry.children or ())

    def read(self, entry, offset, length):
        end = min(entry.size, offset + length)
        if offset >= end:
            return b""
        return self._read(entry, offset, end)


class TocLayer(_Layer):
    """A stargz/eStargz layer read through its TOC; file chunks fetched on demand."""

    def __init__(self, index, digest, reader, source, cache):
        self.index = index
        self.digest = digest
        self.kind = reader.kind
        self.reader = reader
        self._root = reader.toc.root
        self.source = source          # a CountingSource
        self._cache = cache
        self._windows = []            # [(blob offset, compressed bytes)], newest last

    @property
    def fetched(self):
        return self.source.bytes

    def _read(self, entry, offset, end):
        chunks = entry.chunks
        if any(c.digest is None for c in chunks):       # only a whole-file digest
            key = (self.index, id(entry), "whole")
            data = self._cache.get(key)
            if data is None:
                data = self._cache.put(key, self.reader.read_file(entry))
            return data[offset:end]
        wanted = [c for c in chunks if c.chunk_offset < end and c.chunk_offset + c.size > offset]
        missing = [c for c in wanted if (self.index, c.offset, c.inner_offset) not in self._cache]
        i = 0
        while i < len(missing):           # one source read per run of adjacent members
            j = i + 1
            while j < len(missing) and missing[j].offset == missing[j - 1].end:
                j += 1
            start = missing[i].offset
            raw = self._raw(start, missing[j - 1].end)
            for c in missing[i:j]:
                data = gunzip_prefix(raw[c.offset - start:c.end - start],
                                     c.inner_offset + c.size,
                                     f"{entry.name} at {c.chunk_offset}")[c.inner_offset:]
                if sha256_digest(data) != c.digest:
                    raise DigestMismatch(f"layer {self.digest}: {entry.name}: chunk at offset "
                                         f"{c.chunk_offset} does not match its digest")
                self._cache.put((self.index, c.offset, c.inner_offset), data)
            i = j
        parts = [self._cache.get((self.index, c.offset, c.inner_offset)) for c in wanted]
        if any(p is None for p in parts):                 # evicted meanwhile: tiny cache
            return self.reader.read_file(entry)[offset:end]
        first = wanted[0].chunk_offset
        return b"".join(parts)[offset - first:end - first]

    def _raw(self, start, stop):
        """Compressed bytes [start, stop); a read fetches READ_AHEAD more for later files."""
        for wstart, data in reversed(self._windows):
            if wstart <= start and stop <= wstart + len(data):
                return data[start - wstart:stop - wstart]
        limit = min(self.source.size, self.reader.toc_offset)
        ahead = min(limit, start + READ_AHEAD)
        data = self.source.read_at(start, max(stop, ahead) - start)
        self._windows.append((start, data))
        total = sum(len(d) for _, d in self._windows)
        while total > WINDOW_BYTES and len(self._windows) > 1:
            total -= len(self._windows.pop(0)[1])
        return data[:stop - start]

    def close(self):
        self._windows = []
        self.source.close()


class _TarEntry:
    __slots__ = ("name", "type", "size", "mode", "mtime", "link_name", "children",
                 "data_offset")

    def __init__(self, name, type_, size=0, mode=0o755, mtime=0, link_name="",
                 data_offset=None):
        self.name = name
        self.type = type_
        self.size = size
        self.mode = mode
        self.mtime = mtime
        self.link_name = link_name
        self.children = {} if type_ == "dir" else None
        self.data_offset = data_offset


_TAR_TYPES = {tarfile.SYMTYPE: "symlink", tarfile.DIRTYPE: "dir", tarfile.CHRTYPE: "char",
              tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}


class TarLayer(_Layer):
    """A plain tar layer (decompressed to a local file), indexed once."""

    kind = "tar"

    def __init__(self, index, digest, path, fetched, kind="tar"):
        self.index = index
        self.digest = digest
        self.path = path
        self.fetched = fetched
        self.kind = kind
        self._root = _TarEntry("", "dir")
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _dir(self, name):
        node = self._root
        if not name:
            return node
        for part in name.split("/"):
            child = node.children.get(part)
            if child is None or child.type != "dir":
                child = node.children[part] = _TarEntry(part, "dir")
            node = child
        return node

    def _index(self):
        links = []
        try:
            with open(self.path, "rb") as f, \
                    tarfile.open(fileobj=f, mode="r:", errors="surrogateescape") as tar:
                for info in tar:
                    name = clean_name(info.name)
                    if not name:
                        continue
                    parent = self._dir(posixpath.dirname(name))
                    base = posixpath.basename(name)
                    if info.islnk():
                        links.append((parent, base, clean_name(info.linkname)))
                        continue
                    if info.isreg():
                        entry = _TarEntry(name, "reg", info.size, info.mode, info.mtime,
                                          data_offset=None if info.issparse()
                                          else info.offset_data)
                    else:
                        entry = _TarEntry(name, _TAR_TYPES.get(info.type, "reg"), 0,
                                          info.mode, info.mtime, info.linkname)
                    old = parent.children.get(base)
                    if old is not None and old.type == "dir" and entry.type == "dir":
                        old.mode, old.mtime = entry.mode, entry.mtime
                        continue
                    parent.children[base] = entry
        except (tarfile.TarError, EOFError) as exc:
            raise FormatError(f"layer {self.digest} is not a valid tar archive: {exc}") from None
        for parent, base, target in links:
            node = descend(self._root, target)
            if node is not None and node.type == "reg":
                parent.children[base] = node

    def _read(self, entry, offset, end):
        if entry.data_offset is None:
            raise FormatError(f"layer {self.digest}: {entry.name} is a sparse tar entry, "
                              f"which cannot be read")
        start = entry.data_offset + offset
        if start + (end - offset) > self._size:
            raise FormatError(f"layer {self.digest}: {entry.name} is truncated")
        return os.pread(self._fd, end - offset, start)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class EmptyLayer(_Layer):
    """A layer that could not be read (zstd, ...): it contributes nothing (an empty root)."""

    kind = "unreadable"
    fetched = 0

    def __init__(self, index, digest, why):
        self.index = index
        self.digest = digest
        self.why = why
        self._root = _TarEntry("", "dir")

    def close(self):
        pass


class _ChunkCache:
    """Decompressed chunks, least recently used evicted past a byte budget."""

    def __init__(self, budget=CHUNK_CACHE_BYTES):
        self.budget = budget
        self.used = 0
        self._items = OrderedDict()

    def __contains__(self, key):
        return key in self._items

    def get(self, key):
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key, data):
        self._items[key] = data
        self.used += len(data)
        while self.used > self.budget and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)
        return data


# -- opening layers of an image ---------------------------------------------

def _layer_format(media_type):
    if "zstd" in media_type:
        return None
    if media_type.endswith(("gzip", "tar.gzip")):
        return "gzip"
    if media_type.endswith((".tar", "diff.tar")) or media_type == "application/x-tar":
        return "tar"
    return None


def _random_access(endpoint, digest, size):
    """A read_at source for a blob, or None when the endpoint only streams."""
    if isinstance(endpoint, RegistryEndpoint):
        return endpoint.client.blob_source(endpoint.reference, digest, size)
    if isinstance(endpoint, LayoutEndpoint):
        return FileSource(endpoint.layout.blob_path(digest))
    return None


class _Unpacking:
    """File-like sink: hashes the blob bytes and writes them decompressed."""

    def __init__(self, out, gzip):
        self.out = out
        self.hasher = hashlib.sha256()
        self.gzip = gzip
        self._dec = None
        self._done_member = False

    def write(self, data):
        self.hasher.update(data)
        if not self.gzip:
            self.out.write(data)
            return
        while data:
            if self._dec is None:
                if self._done_member and not data.strip(b"\0"):
                    return                  # zero padding after the last member
                self._dec = zlib.decompressobj(31)
            dec = self._dec
            try:
                piece = dec.decompress(data, _BLOCK)
                self.out.write(piece)
                while len(piece) == _BLOCK and not dec.unconsumed_tail and not dec.eof:
                    piece = dec.decompress(b"", _BLOCK)     # output still inside zlib
                    self.out.write(piece)
            except zlib.error as exc:
                raise FormatError(f"corrupt gzip data ({exc})") from None
            if dec.eof:
                data = dec.unused_data
                self._dec = None
                self._done_member = True
            else:
                data = dec.unconsumed_tail

    def finish(self):
        if self.gzip and (self._dec is not None or not self._done_member):
            raise FormatError("gzip data ends in the middle of a member")


def open_layer(endpoint, desc, index, total, cache, note, workdir=None):
    """A layer object for the manifest layer descriptor ``desc``."""
    digest = desc["digest"]
    size = int(desc.get("size") or 0)
    media_type = desc.get("mediaType", "")
    annotations = desc.get("annotations") or {}
    label = f"layer {index + 1}/{total} {digest[7:19]}"
    fmt = _layer_format(media_type)
    if fmt is None:
        why = f"media type {media_type or '(none)'} cannot be read"
        note(f"{label}: {why}; the analysis treats it as empty and may miss its files")
        return EmptyLayer(index, digest, why)
    spool = getattr(endpoint, "spool", None)      # see image_convert.BlobSpool
    spooled = None
    if spool is not None and spool.wants(desc):
        spooled = spool.path(digest, size, label)
    if fmt == "gzip":
        source = FileSource(spooled) if spooled else _random_access(endpoint, digest, size)
        if source is not None and source.size >= 47:
            counting = CountingSource(source, f"layer {digest[:19]}", False)
            tail_len = min(counting.size, MAX_FOOTER_SIZE)
            try:
                footer = parse_footer(counting.read_at(counting.size - tail_len, tail_len),
                                      counting.size)
            except FormatError:
                footer = None
            if footer is not None:
                reader = StargzReader(counting, toc_digest=annotations.get(TOC_DIGEST_ANNOTATION),
                                      toc_offset=footer.toc_offset)
                return TocLayer(index, digest, reader, counting, cache)
        if spooled:
            source.close()             # not stargz: unpacked from the spooled file below
    if spooled:
        note(f"{label}: plain {fmt} layer (not eStargz): downloaded once "
             f"({human_bytes(size)}) for the analysis and the conversion; indexing its files")
    else:
        note(f"{label}: plain {fmt} layer (not eStargz): downloading it once "
             f"({human_bytes(size)}) to index its files")
    tmp = tempfile.NamedTemporaryFile(dir=workdir, prefix="analyze-layer-", suffix=".tar",
                                      delete=False)
    progress = Progress(f"{label}: {'unpacking' if spooled else 'downloading'}", sys.stderr)
    try:
        with tmp:
            sink = _Unpacking(tmp, fmt == "gzip")
            try:
                if spooled:
                    copy_file(spooled, size, sink, progress)
                else:
                    endpoint.blob_to_file(digest, size, sink, progress)
                sink.finish()
            except FormatError as exc:
                raise FormatError(f"{label}: {exc}") from None
        if hasher_digest(sink.hasher) != digest:
            raise DigestMismatch(f"{endpoint}: layer {digest} does not match its digest")
        return TarLayer(index, digest, tmp.name, size, fmt)
    except BaseException:
        try:
            os.unlink(tmp.name)
        except FileNotFoundError:
            pass
        raise
    finally:
        progress.close()


def image_manifests(endpoint, platform=None, all_platforms=False):
    """``[(platform, manifest dict)]`` of an endpoint: one platform, or all of an index."""
    body, media_type = endpoint.root_manifest()
    doc = json_object(body, f"{endpoint}: manifest")
    if media_type not in INDEX_TYPES and "manifests" not in doc:
        return [("", doc)]
    if all_platforms:
        out = []
        for desc in doc.get("manifests") or []:
            if desc.get("mediaType") not in _MANIFEST_TYPES + (None,):
                continue            # attestations, nested indexes
            p = desc.get("platform") or {}
            if p.get("os") == "unknown":
                continue            # buildkit attestation manifests
            name = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant"))
                            if x)
            out.append((name, json_object(endpoint.manifest(desc["digest"]),
                                        f"{endpoint}: manifest {desc['digest']}")))
        if not out:
            raise StargzError(f"{endpoint}: the index lists no image manifests")
        return out
    desc = select_platform(doc, parse_platform(platform))
    p = desc.get("platform") or {}
    name = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
    return [(name, json_object(endpoint.manifest(desc["digest"]),
                             f"{endpoint}: manifest {desc['digest']}"))]


def image_config(endpoint, manifest):
    desc = manifest.get("config") or {}
    if not desc.get("digest"):
        raise StargzError(f"{endpoint}: the manifest names no config")
    return json_object(endpoint.small_blob(desc["digest"]), f"{endpoint}: config")


class LayerOpener:
    """Opens layers of one endpoint, each digest once, and closes them all at the end."""

    def __init__(self, endpoint, note=None, workdir=None):
        self.endpoint = endpoint
        self.note = note or _stderr_note
        self.workdir = workdir
        self.cache = _ChunkCache()
        self._layers = {}

    def open(self, manifest):
        """An ImageFS for a manifest dict."""
        descs = manifest.get("layers") or []
        layers = []
        for i, desc in enumerate(descs):
            key = (desc.get("digest"), i)
            layer = self._layers.get(key)
            if layer is None:
                layer = self._layers[key] = open_layer(self.endpoint, desc, i, len(descs),
                                                       self.cache, self.note, self.workdir)
            layers.append(layer)
        return ImageFS(layers)

    def close(self):
        for layer in self._layers.values():
            layer.close()
        self._layers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- the merged view ---------------------------------------------------------

class ImageFS:
    """The merged, read-only filesystem of ``layers`` (bottom first)."""

    def __init__(self, layers):
        self.layers = list(layers)
        top_down = []
        for layer in reversed(self.layers):
            root = layer.root()
            top_down.append((layer, root))
            if layer.child(root, OPAQUE) is not None:
                break
        self._root_vis = top_down

    def _child(self, vis, name):
        """``(layer, entry, child visibility)`` of ``name`` in a merged directory, or None."""
        found = None
        child_vis = []
        for layer, dentry in vis:
            entry = layer.child(dentry, name)
            if entry is not None:
                if found is None:
                    found = (layer, entry)
                    if entry.type != "dir":
                        return layer, entry, None
                elif entry.type != "dir":
                    break                       # a non-directory hides everything below
                child_vis.append((layer, entry))
                if layer.child(entry, OPAQUE) is not None:
                    break
            if layer.child(dentry, WHITEOUT + name) is not None:
                break
        if found is None:
            return None
        return found[0], found[1], child_vis

    def resolve(self, path, follow=True):
        """The Node at ``path`` (absolute, or relative to ``/``), or None if absent.

        Symlinks are followed inside the image (the last component too when
        ``follow``); raises StargzError past 40 links.
        """
        if "\0" in path or not self.layers:
            return None
        parts = [p for p in path.split("/") if p not in ("", ".")]
        parts.reverse()                     # a stack: next component last
        top = self._root_vis[0]
        stack = [(None, top[0], top[1], self._root_vis)]   # (name, layer, entry, visibility)
        via = []
        links = 0
        while parts:
            name = parts.pop()
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            vis = stack[-1][3]
            if vis is None:
                return None                 # a file used as a directory
            hit = self._child(vis, name)
            if hit is None:
                return None
            layer, entry, child_vis = hit
            if entry.type == "symlink" and (parts or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise StargzError(f"{path}: too many levels of symbolic links in the image")
                via.append((_join(stack, name), layer.index))
                target = entry.link_name
                if not target:
                    return None
                if target.startswith("/"):
                    del stack[1:]
                parts.extend(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            stack.append((name, layer, entry, child_vis))
        _, layer, entry, _ = stack[-1]
        return Node(_join(stack), layer, entry, tuple(via))

    def lookup(self, path, follow=True):
        """Like ``resolve`` but a symlink loop counts as absent."""
        try:
            return self.resolve(path, follow)
        except StargzError:
            return None

    def is_file(self, path):
        node = self.lookup(path)
        return node is not None and node.type == "reg"

    def is_dir(self, path):
        node = self.lookup(path)
        return node is not None and node.type == "dir"

    def listdir(self, path):
        """Sorted names in the merged directory ``path`` (whiteouts applied)."""
        node = self.lookup(path)
        if node is None or node.type != "dir":
            return []
        vis = self._vis_of(node.path)
        names = {}
        hidden = set()
        for layer, dentry in vis:
            new_hidden = set()
            for name in layer.names(dentry):
                if name == OPAQUE:
                    continue
                if name.startswith(WHITEOUT):
                    new_hidden.add(name[len(WHITEOUT):])
                elif name not in hidden and name not in names:
                    names[name] = layer.index
            hidden |= new_hidden
        return sorted(names)

    def _vis_of(self, real_path):
        vis = self._root_vis
        for name in (p for p in real_path.split("/") if p):
            hit = self._child(vis, name)
            if hit is None or hit[2] is None:
                return []
            vis = hit[2]
        return vis

    def read(self, node, offset=0, length=None):
        """Bytes of a regular file (a Node or a path), verified where the layer allows."""
        if isinstance(node, str):
            found = self.resolve(node)
            if found is None:
                raise StargzError(f"{node}: no such file in the image")
            node = found
        if node.type != "reg":
            raise StargzError(f"{node.path}: not a regular file (it is a {node.type})")
        if length is None:
            length = node.size - offset
        return node.layer.read(node.entry, offset, max(0, length))


def _join(stack, extra=None):
    names = [item[0] for item in stack[1:]]
    if extra is not None:
        names.append(extra)
    return "/" + "/".join(names)
