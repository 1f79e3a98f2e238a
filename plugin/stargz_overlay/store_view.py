"""Plugin views for Podman/CRI-O/Buildah: the Additional Layer Store and its layers.

Two DATA kinds (``layer_spec``) are served here, chosen by ``plugin_state``:

``store``: the Additional Layer Store (ALS) of containers/storage, as the only
lower layer of a read-only fuse-overlayfs mount (``stargz-overlay store``)::

    stargz-overlay-store.json        marker: state directory and configuration
    store/                           the ALS path for storage.conf ("MNT/store:ref")
    store/<base64(ref)>/<digest>/    a layer, resolved on demand at first lookup
        diff/                        the layer's tree, files fetched lazily
        info                         containers/storage layer JSON (digests, sizes)
        blob                         the compressed blob (fetched when read: push/save)
        use                          dangling symlink: containers/storage's "use"
                                     notification (create) fails with ENOENT, as
                                     notification-aware stores must answer

fuse-overlayfs 1.10 loads the root directory at mount and, once a directory
is loaded, never asks its lower layers about names missing from it.  Run
with ``-o static_nlink``, lookups in a directory that was never loaded reach
``statat`` name by name, so ``store/``, ``store/<ref>/`` and the layer
directories are never allowed to load: their listing fails (ENOENT).  That
keeps every new reference and layer digest on demand, even after an ``ls``.
The failing load is also what ``rmdir`` of a layer directory (containers/
storage's "release" notification) runs into, so rmdir answers ENOENT too and
is counted as a release; a ``readlink`` of ``use`` is counted as a use.  A
layer that is not stargz/eStargz, has no TOC digest annotation, or whose TOC
does not match it, is absent (ENOENT), so Podman pulls it normally; the
reason goes to the log and to ``status``.

Resolving a layer reads its footer and TOC once: the verified TOC JSON is
kept in the content cache under its digest, and the TOC offset and blob
format go into the layer's state, so that containers' mounts open the layer
without reading either again (``toc_cache.open_reader``).  With
prefetch on (``noprefetch = false``), resolving also starts the layer's
prefetch (``prefetch``: the region before ``.prefetch.landmark``, one
request) into the shared cache, so the prioritized files are local or in
flight by the time a container starts; its mount takes the same claim and
waits for them instead of fetching them again.

``store-layer``: one layer of an image mounted for a container by the mount
program (``mount_program``): a registry layer whose opens are counted for
``status``.
"""

import base64
import binascii
import errno
import logging
import os
import shutil
import stat
import threading
import time

from .errors import DigestMismatch, FormatError, InvalidReference, StargzError
from .fetch_control import fetch_kind
from .layer_spec import LayerSpec, encode
from .layer_view import INO_BASE, LayerView, fs_error, lock_directory, normalize
from .reference import is_sha256_digest
from .status import LayerStats, StateDir, ref_key, write_json

log = logging.getLogger("stargz_overlay.store")

NAMESPACE = "store"
MARKER = "stargz-overlay-store.json"
USE_TARGET = b".use/notify"     # never exists: creating "use" fails with ENOENT
GZIP_COMPRESSION = 2            # containers/storage archive.Gzip
RETRY_AFTER = 2.0               # seconds before a transient failure is retried
REF_TTL = 30.0                  # a resolved tag answers unknown digests for this long
BLOB_BLOCK = 4 << 20
RESOLVERS = 4                   # layers of one image resolved in parallel
DT_DIR, DT_REG = 4, 8


def load_layer(state, spec, workdir, label):
    """Called by ``plugin_state.load_layer`` for the ``store`` and ``store-layer`` kinds."""
    if spec.kind == "store-layer":
        # a registry layer, loaded the plugin's usual way; only its opens are counted here
        registry = LayerSpec("registry", ref=spec.ref, digest=spec.digest, toc=spec.toc,
                             size=spec.size, config=spec.config, toc_offset=spec.toc_offset,
                             format=spec.format)
        slot_id, fd = state.load_layer(encode(registry), workdir)
        track(state.views[slot_id], LayerStats(spec.path, spec.digest, "mount"))
        return slot_id, fd
    slot = state.next_slot
    view = StoreView(state, spec, workdir, slot, label)
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    state.next_slot += 1
    state.views[slot + 1] = view
    log.info("%s: serving the Additional Layer Store", label)
    return slot + 1, fd


def track(view, stats):
    """Count ``view``'s opens of regular files (cache hit or not) into ``stats``."""
    open_file, close = view.open, view.close
    stats.source = view.reader.source

    def tracked_open(path, flags):
        entry = view.paths.get(normalize(path))
        counted = entry is not None and entry.type == "reg" and entry.size > 0
        hit = counted and view.cached(entry)
        try:
            fd = open_file(path, flags)
        except OSError:
            if counted:
                stats.failed()
            raise
        if counted:
            stats.opened(hit)
        return fd

    def tracked_close():
        try:
            stats.flush(force=True)
        finally:
            close()

    view.open = tracked_open
    view.close = tracked_close
    return view


# -- the store ---------------------------------------------------------------

class _NoReader:
    """Stands in for a reader where plugin_state expects one (the namespace has no blob)."""

    class source:
        reads = 0
        bytes = 0

    @staticmethod
    def prefetch_range():
        return None


class _Node:
    """A name of the store's own tree (outside the layers' diff trees)."""

    __slots__ = ("kind", "path", "size", "layer")

    def __init__(self, kind, path, size=0, layer=None):
        self.kind = kind          # root, marker, namespace, ref, layer, info, blob, use
        self.path = path
        self.size = size
        self.layer = layer


class _Layer:
    """One ``<ref>/<name>`` the store was asked about, lazily served or not."""

    def __init__(self, ref, name):
        self.ref = ref
        self.name = name
        self.lazy = False
        self.reason = ""
        self.permanent = False
        self.when = 0.0
        self.digest = None        # blob digest
        self.doc = {}
        self.info = None          # path of the info file
        self.size = 0
        self.uses = 0
        self.releases = 0


class StoreView:
    """The Additional Layer Store namespace, answered by one plugin layer."""

    def __init__(self, state, spec, workdir, slot, label):
        self.state = state
        self.config = state.config
        self.cache = state.cache
        self.label = label
        self.reader = _NoReader()
        self.fetch = None
        self.workdir = workdir
        self.store = StateDir(spec.path)
        self.config_path = spec.config or state.config.path or ""
        self.ino_base = INO_BASE + slot * (1 << 32)
        self.dev = os.makedev(0xfe, 0x100 + slot)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.mtime = int(time.time())
        self._inos = {}
        self._lock = threading.RLock()
        self._registry = None
        self._images = {}         # ref -> (Image, monotonic time)
        self._image_locks = {}    # ref -> Lock (one manifest fetch at a time per ref)
        self._layers = {}         # (ref, name) -> _Layer
        self._views = {}          # blob digest -> LayerView
        self._tasks = {}          # (ref, name) -> Future of the _Layer being resolved
        self._pool = None
        self._slots = {}          # blob digest -> slot (stable inode ranges)
        self._next_slot = slot + 1
        self._lock_fd = lock_directory(
            self.workdir, f"the store state directory {self.store.root} is in use by another store")
        self._prepare()

    # -- set-up ----------------------------------------------------------

    def _prepare(self):
        for sub in ("root", "ns", "files", "layers"):
            path = os.path.join(self.workdir, sub)
            if os.path.lexists(path):
                shutil.rmtree(path)
        root = os.path.join(self.workdir, "root")
        os.makedirs(os.path.join(root, NAMESPACE), mode=0o755)
        open(os.path.join(root, MARKER), "wb").close()
        os.makedirs(os.path.join(self.workdir, "ns"), mode=0o755)
        # one entry, so that reading a namespace directory reaches dirent_fields (and fails)
        open(os.path.join(self.workdir, "ns", "unlistable"), "wb").close()
        os.makedirs(os.path.join(self.workdir, "files"), mode=0o755)
        os.makedirs(os.path.join(self.workdir, "layers"), mode=0o700)
        self.marker = os.path.join(self.workdir, "files", "marker.json")
        write_json(self.marker, {"version": 1, "state_dir": self.store.root,
                                 "config": self.config_path, "namespace": NAMESPACE})
        os.chmod(self.marker, 0o444)

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for view in list(self._views.values()):
            _close_view(view)
        self._views.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._registry is not None:
            self._registry.close()

    # -- names -----------------------------------------------------------

    def _ino(self, path):
        ino = self._inos.get(path)
        if ino is None:
            ino = self._inos[path] = self.ino_base + 1 + len(self._inos)
        return ino

    def _resolve(self, path):
        """(node, None) for the store's own names, (layer view, rest) inside a diff tree."""
        name = normalize(path)
        if name == "":
            return _Node("root", ""), None
        parts = name.split("/")
        if any(p.startswith(".wh.") for p in parts[:4]):
            raise fs_error(errno.ENOENT)
        if len(parts) == 1:
            if name == MARKER:
                return _Node("marker", name, os.path.getsize(self.marker)), None
            if name == NAMESPACE:
                return _Node("namespace", name), None
            raise fs_error(errno.ENOENT)
        if parts[0] != NAMESPACE:
            raise fs_error(errno.ENOENT)
        ref = decode_ref(parts[1])
        if ref is None:
            raise fs_error(errno.ENOENT)
        if len(parts) == 2:
            return _Node("ref", name), None
        layer = self._layer(ref, parts[2])
        if not layer.lazy:
            raise fs_error(errno.ENOENT)
        if len(parts) == 3:
            return _Node("layer", name, layer=layer), None
        leaf = parts[3]
        if leaf == "diff":
            return self._view(layer), "/".join(parts[4:])
        if len(parts) > 4:
            raise fs_error(errno.ENOTDIR if leaf in ("info", "blob", "use") else errno.ENOENT)
        if leaf == "info":
            return _Node("info", name, os.path.getsize(layer.info), layer), None
        if leaf == "blob":
            return _Node("blob", name, layer.size, layer), None
        if leaf == "use":
            return _Node("use", name, len(USE_TARGET), layer), None
        raise fs_error(errno.ENOENT)

    # -- the data_source answers (same interface as LayerView) -----------

    def exists(self, path):
        try:
            node, rest = self._resolve(path)
        except OSError:
            return False
        return node.exists(rest) if rest is not None else True

    def lookup(self, path):
        node, rest = self._resolve(path)
        if rest is not None:
            return node, node.lookup(rest)
        return node

    def stat_fields(self, found):
        if isinstance(found, tuple):
            view, entry = found
            return view.stat_fields(entry)
        node = found
        if node.kind in ("root", "namespace", "ref", "layer"):
            mode, size, nlink = stat.S_IFDIR | 0o755, 4096, 2
        elif node.kind == "use":
            mode, size, nlink = stat.S_IFLNK | 0o777, node.size, 1
        else:
            mode, size, nlink = stat.S_IFREG | 0o444, node.size, 1
        return (self.dev, self._ino(node.path), mode, nlink, self.uid, self.gid, 0, 0, size,
                self.mtime)

    def dirent_fields(self, dir_path, name):
        node, rest = self._resolve(dir_path)
        if rest is not None:
            return node.dirent_fields(rest, name)
        if node.kind == "root":
            if name == NAMESPACE:
                return self._ino(NAMESPACE), DT_DIR
            if name == MARKER:
                return self._ino(MARKER), DT_REG
            return None
        # never let fuse-overlayfs mark a namespace directory as loaded (see the module doc)
        raise fs_error(errno.ENOENT)

    def open_dir(self, path):
        node, rest = self._resolve(path)
        if rest is not None:
            return node.open_dir(normalize(rest))
        if node.kind == "layer":
            self._released(node.layer)
        if node.kind not in ("root", "namespace", "ref", "layer"):
            raise fs_error(errno.ENOTDIR)
        return self._own_dir(node)

    def _own_dir(self, node):
        """fd of the real directory that stands for one of the store's own directories."""
        sub = "root" if node.kind == "root" else "ns"
        return os.open(os.path.join(self.workdir, sub),
                       os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def open(self, path, flags):
        node, rest = self._resolve(path)
        if rest is not None:
            return node.open(rest, flags)
        if node.kind in ("root", "namespace", "ref", "layer"):
            return self._own_dir(node)
        if flags & os.O_DIRECTORY:
            raise fs_error(errno.ENOTDIR)
        if node.kind == "use":
            raise fs_error(errno.ELOOP)
        if node.kind == "marker":
            target = self.marker
        elif node.kind == "info":
            target = node.layer.info
        else:
            target = self._blob(node.layer)
        return os.open(target, os.O_RDONLY | os.O_CLOEXEC | (flags & os.O_NONBLOCK))

    def readlink(self, path):
        node, rest = self._resolve(path)
        if rest is not None:
            return node.readlink(rest)
        if node.kind != "use":
            raise fs_error(errno.EINVAL)
        self._used(node.layer)
        return USE_TARGET

    def xattr_names(self, path):
        node, rest = self._resolve(path)
        return node.xattr_names(rest) if rest is not None else b""

    def xattr(self, path, name):
        node, rest = self._resolve(path)
        if rest is not None:
            return node.xattr(rest, name)
        raise fs_error(errno.ENODATA)

    # -- layers ----------------------------------------------------------

    def _client(self):
        if self._registry is None:
            from .registry_layers import make_client
            self._registry = make_client(self.config)
        return self._registry

    def _layer(self, ref, name):
        """The _Layer for ``<ref>/<name>``, resolved (or re-tried) as needed.

        containers/storage asks for an image's layers one after the other; the
        first lookup resolves the manifest and then every layer of the image in
        parallel (footer and TOC reads), so the next lookups find them ready.
        """
        with self._lock:
            layer = self._layers.get((ref, name))
            if layer is not None and (layer.lazy or layer.permanent
                                      or time.monotonic() - layer.when < RETRY_AFTER):
                return layer
            task = self._tasks.get((ref, name))
            if task is None or task.done():     # never asked, or a stale failure
                task = self._submit(ref, name, siblings=True)
        return task.result()

    def _submit(self, ref, name, siblings):
        """Resolve ``<ref>/<name>`` on a worker thread (called with the lock held)."""
        if self._pool is None:      # first lookup: in the serving daemon, never pre-fork
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(RESOLVERS, thread_name_prefix="sz-store")
        task = self._pool.submit(self._resolve_named, ref, name, siblings)
        self._tasks[(ref, name)] = task
        return task

    def _resolve_named(self, ref, name, siblings):
        layer = _Layer(ref, name)
        started = time.monotonic()
        try:
            self._resolve_layer(layer, siblings)
        except DigestMismatch as exc:
            self._absent(layer, f"TOC does not match the manifest's TOC digest "
                                f"annotation: {exc}", permanent=True)
        except FormatError as exc:
            self._absent(layer, f"not a usable stargz layer: {exc}", permanent=True)
        except StargzError as exc:
            self._absent(layer, f"cannot resolve it now ({exc}); asked again after "
                                f"{RETRY_AFTER:.0f} s", permanent=False)
        except OSError as exc:
            self._absent(layer, f"local error: {exc}", permanent=False)
        except Exception as exc:        # noqa: BLE001 - a worker must always answer
            log.exception("%s %s: resolving failed", ref, name)
            self._absent(layer, f"internal error: {exc}", permanent=False)
        layer.when = time.monotonic()
        if layer.lazy:
            log.info("%s %s: served lazily (%s; resolved in %.2f s)", ref, name,
                     layer.reason, layer.when - started)
        else:
            log.warning("%s %s: not served lazily, containers/storage pulls it: %s",
                        ref, name, layer.reason)
        with self._lock:
            old = self._layers.get((ref, name))
            if old is not None:
                layer.uses, layer.releases = old.uses, old.releases
            self._layers[(ref, name)] = layer
        self._save(layer)
        return layer

    def _absent(self, layer, reason, permanent):
        layer.lazy = False
        layer.reason = reason
        layer.permanent = permanent

    def _image(self, ref, name):
        """The image ``ref`` as resolved recently, fetched again for an unknown digest."""
        with self._lock:
            guard = self._image_locks.setdefault(ref, threading.Lock())
        with guard:
            return self._image_locked(ref, name)

    def _image_locked(self, ref, name):
        cached = self._images.get(ref)
        if cached is not None:
            image, when = cached
            if _find_layer(image, name) is not None or time.monotonic() - when < REF_TTL:
                return image
        image = self._client().resolve(ref)
        self._images[ref] = (image, time.monotonic())
        self.store.write_ref(ref, {
            "ref": ref, "manifest_digest": image.manifest_digest, "platform": image.platform,
            "index_digest": image.index_digest, "resolved_at": time.time(),
            "layers": [{"digest": x.digest, "size": x.size, "media_type": x.media_type}
                       for x in image.layers]})
        return image

    def _other_platforms(self, image, name):
        """The layer in another platform's manifest of the same index (``--platform`` pulls)."""
        if not image.index_digest:
            return None
        client = self._client()
        doc = client.get_manifest(image.reference, image.index_digest)[0]
        from .reference import parse_reference
        repo = parse_reference(image.reference).name
        for desc in doc.get("manifests") or []:
            digest = desc.get("digest")
            if not digest or digest == image.manifest_digest:
                continue
            other = client.resolve(f"{repo}@{digest}", platform=_platform_of(desc))
            if _find_layer(other, name) is not None:
                return other
        return None

    def _resolve_layer(self, layer, siblings=False):
        if not is_sha256_digest(layer.name):
            raise FormatError(f"{layer.name!r} is not a layer digest")
        image = self._image(layer.ref, layer.name)
        if siblings:
            with self._lock:
                for other in image.layers:
                    key = (layer.ref, other.digest)
                    if (other.digest != layer.name and key not in self._layers
                            and key not in self._tasks):
                        self._submit(layer.ref, other.digest, siblings=False)
        found = _find_layer(image, layer.name)
        if found is None:
            other = self._other_platforms(image, layer.name)
            found = _find_layer(other, layer.name) if other is not None else None
            image = other if found is not None else image
        if found is None:
            self._absent(layer, f"no layer {layer.name} in {layer.ref} "
                                f"({image.platform} manifest {image.manifest_digest[:19]})",
                         permanent=False)
            return
        index, desc = found
        layer.digest = desc.digest
        layer.size = desc.size
        layer.doc = {"media_type": desc.media_type, "size": desc.size, "index": index,
                     "toc": desc.toc_digest, "manifest_digest": image.manifest_digest}
        client = self._client()
        kind = client.classify_layer(image, desc)       # the footer: one small read
        if kind.kind is None:
            self._absent(layer, kind.reason,
                         permanent=not kind.reason.startswith("could not read"))
            return
        if desc.toc_digest is None:
            self._absent(layer, f"{kind.kind} layer without a TOC digest annotation: its TOC "
                                f"cannot be verified", permanent=True)
            return
        diff_ids = (image.config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(image.layers):
            self._absent(layer, f"the image config lists {len(diff_ids)} diff IDs for "
                                f"{len(image.layers)} layers", permanent=True)
            return
        with self._lock:
            view = self._views.get(desc.digest)
        if view is None:
            reader = self._reader(image.reference, desc.digest, desc.size, desc.toc_digest,
                                  kind.toc_offset, kind.kind)
            with self._lock:
                view = self._views.get(desc.digest) or self._open_view(desc.digest, reader,
                                                                       reader.source.label)
            files, file_bytes = self.store.write_files(desc.digest, reader.toc)
            layer.doc.update(files=files, file_bytes=file_bytes)
        kind_name = view.reader.kind
        layer.doc["kind"] = kind_name
        layer.doc["toc_offset"] = view.reader.toc_offset
        reason = (f"{'eStargz' if kind_name == 'estargz' else 'legacy stargz'} footer, TOC "
                  f"verified against the toc.digest annotation")
        info = {"compressed-diff-digest": desc.digest, "compressed-size": desc.size,
                "diff-digest": diff_ids[index], "compression": GZIP_COMPRESSION}
        if desc.uncompressed_size is not None:
            info["diff-size"] = desc.uncompressed_size
        layer.info = os.path.join(self.workdir, "files",
                                  f"{ref_key(layer.ref)[:16]}-{_hex(layer.name)}.info")
        write_json(layer.info, info)
        layer.doc["diff_id"] = diff_ids[index]
        layer.lazy = True
        layer.permanent = True
        layer.reason = reason

    def _open_view(self, digest, reader, label):
        slot = self._slots.get(digest)
        if slot is None:
            slot = self._slots[digest] = self._next_slot
            self._next_slot += 1
        view = LayerView(reader, os.path.join(self.workdir, "layers", _hex(digest)), self.cache,
                         slot, label)
        stats = LayerStats(self.store.root, digest, "store")
        track(view, stats)
        self._views[digest] = view
        if self.config.prefetch:
            self._prefetch(view, digest)
            stats.flush()             # the prefetch's bytes reach status with no open
        return view

    def _reader(self, ref, digest, size, toc_digest, toc_offset, kind):
        """The layer's reader, through a metered source; the TOC from the cache if there."""
        from .toc_cache import open_reader
        label = f"store({ref} {digest[:19]})"
        source = self.state.fetch.metered(self._client().blob_source(ref, digest, size),
                                          digest, label, ref=ref)
        with fetch_kind("metadata"):
            reader = open_reader(source, self.cache, toc_digest, toc_offset, kind, label)
        source.loaded()
        return reader

    def _prefetch(self, view, digest):
        """Start the layer's prefetch into the shared cache (a worker thread: serving)."""
        from . import prefetch
        from .layer_fetch import LayerFetch
        try:
            fetch = LayerFetch(view, self.state.fetch, digest, mounted=False)
        except StargzError as exc:
            log.warning("%s: no prefetch: %s", view.label, exc)
            return
        prefetch.start(fetch)

    def _view(self, layer):
        with self._lock:
            view = self._views.get(layer.digest)
            if view is None:      # released earlier: open it again
                doc = layer.doc
                try:
                    reader = self._reader(layer.ref, layer.digest, layer.size, doc.get("toc"),
                                          doc.get("toc_offset"), doc.get("kind"))
                except StargzError as exc:
                    log.error("%s %s: cannot open the layer again: %s", layer.ref,
                              layer.name, exc)
                    raise fs_error(errno.EIO) from None
                view = self._open_view(layer.digest, reader, reader.source.label)
            return view

    def _blob(self, layer):
        """Path of the whole compressed blob, verified against its digest (fetched once)."""
        source = self._view(layer).reader.source

        def blocks():
            offset = 0
            while offset < layer.size:
                n = min(BLOB_BLOCK, layer.size - offset)
                yield source.read_at(offset, n)
                offset += n

        try:
            return self.cache.get(layer.digest, layer.size, blocks)
        except StargzError as exc:
            log.error("%s %s: cannot fetch the blob: %s", layer.ref, layer.name, exc)
            raise fs_error(errno.EIO) from None

    def _used(self, layer):
        with self._lock:
            layer.uses += 1
            self._save(layer)

    def _released(self, layer):
        with self._lock:
            layer.releases += 1
            holders = sum(x.uses - x.releases for x in self._layers.values()
                          if x.digest == layer.digest)
            if holders <= 0 and layer.digest in self._views:
                log.info("%s %s: released by containers/storage; its files stay cached, the "
                         "layer is opened again when asked for", layer.ref, layer.name)
                _close_view(self._views.pop(layer.digest))
            self._save(layer)

    def _save(self, layer):
        doc = dict(layer.doc, ref=layer.ref, name=layer.name, digest=layer.digest or layer.name,
                   lazy=layer.lazy, reason=layer.reason, uses=layer.uses,
                   releases=layer.releases, updated=time.time(), size=layer.size or None,
                   config=self.config_path)
        try:
            self.store.write_layer(layer.name, doc)
            if layer.digest and layer.digest != layer.name:
                self.store.write_layer(layer.digest, doc)
        except OSError as exc:
            log.warning("cannot record layer state in %s: %s", self.store.root, exc)


def _close_view(view):
    if view.fetch is not None:
        view.fetch.close()
    view.close()


def _platform_of(desc):
    p = desc.get("platform") or {}
    parts = [p.get("os", ""), p.get("architecture", "")] + ([p["variant"]] if p.get("variant")
                                                          else [])
    return "/".join(parts) if all(parts) else None


def _hex(text):
    return text.split(":", 1)[1] if ":" in text else text


def _find_layer(image, name):
    """(index, Layer) of the layer named by blob digest or TOC digest, or None."""
    for i, layer in enumerate(image.layers):
        if layer.digest == name or layer.toc_digest == name:
            return i, layer
    return None


def decode_ref(name):
    """The image reference a store directory name encodes (standard base64), or None.

    containers/storage names the directory ``base64.StdEncoding(ref)``.  That
    alphabet has ``/``, but a reference's characters (``[a-z0-9._:/@-]`` and
    upper-case in tags) never make a 6-bit group of all ones at a position that
    would need it, so a real reference always encodes to one path component.
    """
    try:
        raw = base64.b64decode(name.encode("ascii"), validate=True)
        ref = raw.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    from .reference import parse_reference
    try:
        parsed = parse_reference(ref)
    except InvalidReference:
        return None
    if parsed.is_short:
        return None
    return ref


def encode_ref(ref):
    """The store directory containers/storage asks for ``ref`` (``decode_ref``'s inverse)."""
    return base64.b64encode(ref.encode("utf-8")).decode("ascii")
