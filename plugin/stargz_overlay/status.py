"""What a layer store knows and what was fetched: the data behind ``stargz-overlay status``.

The store (``store_view``) and every container mount made by the mount
program write small JSON files into the store's state directory; ``status``
reads them, so it works whether or not anything is mounted::

    refs/<sha256(ref)[:32]>.json   an image the store resolved: ref, manifest, layers
    layers/<hex>.json              one layer (by the name containers/storage asked for):
                                   lazy or why not, TOC digest, sizes, use/release counts
    layers/<hex>.files             the layer's regular files, JSON [[digest, size], ...]
    stats/<blob hex>/<role>-<pid>.json
                                   counters of one process serving the layer lazily
                                   (role "store" or "mount"): opens, cache hits, blob
                                   reads and bytes received from the registry
    mounts/                        per-mount layer directories of the mount program

"% local" is measured, not counted: the share of a layer's file bytes whose
verified content is in the cache now.
"""

import hashlib
import json
import logging
import os
import threading
import time
import weakref

log = logging.getLogger("stargz_overlay.store")

FLUSH_INTERVAL = 0.5      # seconds between two writes of one process's counters


def _hex(digest):
    return digest.split(":", 1)[1] if ":" in digest else digest


def ref_key(ref):
    return hashlib.sha256(ref.encode("utf-8")).hexdigest()[:32]


def write_json(path, doc):
    """Atomically replace ``path`` with ``doc`` as JSON."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"), sort_keys=True)
    os.rename(tmp, path)


def read_json(path, default=None):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class StateDir:
    """Paths inside a store's state directory."""

    def __init__(self, root):
        self.root = os.path.abspath(root)

    def ref(self, ref):
        return os.path.join(self.root, "refs", ref_key(ref) + ".json")

    def layer(self, name):
        return os.path.join(self.root, "layers", _hex(name) + ".json")

    def files(self, digest):
        return os.path.join(self.root, "layers", _hex(digest) + ".files")

    def stats_dir(self, digest):
        return os.path.join(self.root, "stats", _hex(digest))

    @property
    def mounts(self):
        return os.path.join(self.root, "mounts")

    def write_layer(self, name, doc):
        write_json(self.layer(name), doc)

    def write_ref(self, ref, doc):
        write_json(self.ref(ref), doc)

    def write_files(self, digest, toc):
        """Record the (digest, size) of every distinct regular file of a layer."""
        seen = set()
        rows = []
        for entry in toc.entries:
            if entry.type != "reg" or entry.size == 0 or id(entry) in seen:
                continue
            seen.add(id(entry))
            rows.append([entry.digest, entry.size])
        path = self.files(digest)
        if not os.path.exists(path):
            write_json(path, rows)
        return len(rows), sum(size for _, size in rows)


class LayerStats:
    """Counters of one process serving one layer; persisted for ``status``.

    ``opened(hit)`` is called for every open of a non-empty regular file;
    the blob reads (on demand, prefetch, background) come from the layer's
    counting source.  Writes are throttled; a daemon thread, started by the
    first ``flush()`` (an open, or the store's prefetch at pull: after
    fuse-overlayfs has forked), writes every counter that changed since, so
    bytes fetched with no open (prefetch, background fetch) reach ``status``.
    """

    _flusher = None
    _live = None              # every LayerStats of this process (weak)
    _guard = threading.Lock()

    def __init__(self, state_dir, digest, role):
        self.dir = StateDir(state_dir).stats_dir(digest)
        self.role = role
        self.source = None        # the layer's CountingSource (reads, bytes)
        self.opens = self.hits = self.errors = 0
        self._last = 0.0
        self._written = self._counters()
        self._lock = threading.Lock()
        with LayerStats._guard:
            if LayerStats._live is None:
                LayerStats._live = weakref.WeakSet()
            LayerStats._live.add(self)

    def _counters(self):
        src = self.source
        return (self.opens, self.hits, self.errors, getattr(src, "reads", 0),
                getattr(src, "bytes", 0))

    def opened(self, hit):
        with self._lock:
            self.opens += 1
            self.hits += bool(hit)
        self.flush()

    def failed(self):
        with self._lock:
            self.errors += 1
        self.flush()

    def snapshot(self):
        src = self.source
        return {"role": self.role, "pid": os.getpid(), "opens": self.opens, "hits": self.hits,
                "misses": self.opens - self.hits, "errors": self.errors,
                "blob_reads": getattr(src, "reads", 0), "blob_bytes": getattr(src, "bytes", 0),
                "updated": time.time()}

    def flush(self, force=False):
        """Write the counters now, or (throttled) leave them to the flusher thread."""
        now = time.monotonic()
        if not force and now - self._last < FLUSH_INTERVAL:
            self._start_flusher()
            return
        self._last = now
        self._written = self._counters()
        try:
            write_json(os.path.join(self.dir, f"{self.role}-{os.getpid()}.json"),
                       self.snapshot())
        except OSError as exc:
            log.warning("cannot write layer statistics to %s: %s", self.dir, exc)
        self._start_flusher()

    @classmethod
    def _start_flusher(cls):
        with cls._guard:
            if cls._flusher is None or not cls._flusher.is_alive():
                cls._flusher = threading.Thread(target=cls._flush_loop, daemon=True,
                                                name="sz-status")
                cls._flusher.start()

    @classmethod
    def _flush_loop(cls):
        while True:
            time.sleep(FLUSH_INTERVAL)
            with cls._guard:
                changed = [s for s in cls._live if s._counters() != s._written]
            for stats in changed:
                stats.flush(force=True)


# -- the report ---------------------------------------------------------------

def _cache_path(cache_root, digest):
    hexd = _hex(digest)
    return os.path.join(cache_root, "sha256", hexd[:2], hexd)


def local_bytes(state, digest, cache_root):
    """(file bytes, bytes whose content is in the cache), or (None, None) if unknown."""
    rows = read_json(state.files(digest))
    if rows is None:
        return None, None
    total = local = 0
    for file_digest, size in rows:
        total += size
        if file_digest and cache_root and os.path.exists(_cache_path(cache_root, file_digest)):
            local += size
    return total, local


def layer_counters(state, digest):
    """Counters summed over every process that served the layer, and the live ones."""
    out = {"opens": 0, "hits": 0, "misses": 0, "errors": 0, "blob_reads": 0,
           "blob_bytes": 0, "processes": 0, "mounts": 0}
    directory = state.stats_dir(digest)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        doc = read_json(os.path.join(directory, name))
        if not doc:
            continue
        out["processes"] += 1
        if doc.get("role") == "mount":
            out["mounts"] += 1
        for key in ("opens", "hits", "misses", "errors", "blob_reads", "blob_bytes"):
            out[key] += int(doc.get(key) or 0)
    return out


def collect(state_dir, cache_root=None, metrics_dir=None):
    """Everything ``status`` shows, as one JSON-able dict.

    With ``metrics_dir``, each lazy layer also gets the live fetch figures of
    the mounts serving it (``fetch``: bytes on demand/prefetch/background,
    prefetch and background state, bytes saved; see ``metrics``), and layers
    mounted outside the store are listed under ``live_layers``.
    """
    from .metrics import figures_by_layer, read_snapshots
    figures = figures_by_layer(read_snapshots(metrics_dir)) if metrics_dir else {}
    state = StateDir(state_dir)
    layers = {}
    for name in sorted(_listdir(os.path.join(state.root, "layers"))):
        if name.endswith(".json"):
            doc = read_json(os.path.join(state.root, "layers", name))
            if doc and doc.get("digest"):
                layers.setdefault(doc["digest"], doc)
    images = []
    for name in sorted(_listdir(os.path.join(state.root, "refs"))):
        doc = read_json(os.path.join(state.root, "refs", name))
        if doc and doc.get("ref"):
            images.append(doc)
    images.sort(key=lambda d: d.get("ref", ""))

    def row(desc):
        digest = desc["digest"]
        doc = layers.get(digest)
        r = {"digest": digest, "size": desc.get("size"), "media_type": desc.get("media_type")}
        if doc is None:
            r.update(mode="not asked", reason="containers/storage never asked the store for "
                     "this layer (it was local already, or the pull has not reached it)")
            return r
        r.update(mode="lazy" if doc.get("lazy") else "pulled", reason=doc.get("reason", ""),
                 kind=doc.get("kind"), toc=doc.get("toc"), uses=doc.get("uses", 0),
                 releases=doc.get("releases", 0))
        if doc.get("lazy"):
            counters = layer_counters(state, digest)
            total, local = local_bytes(state, digest, cache_root)
            r.update(counters)
            r["file_bytes"] = total
            r["local_bytes"] = local
            r["local_ratio"] = (local / total if total else 1.0) if total is not None else None
            if digest in figures:
                r["fetch"] = figures[digest]
        return r

    out_images = []
    seen = set()
    for img in images:
        rows = [row(d) for d in img.get("layers", [])]
        seen.update(r["digest"] for r in rows)
        out_images.append({"ref": img["ref"], "manifest_digest": img.get("manifest_digest"),
                           "platform": img.get("platform"), "layers": rows})
    orphans = [row({"digest": d, "size": doc.get("size"), "media_type": doc.get("media_type")})
               for d, doc in sorted(layers.items()) if d not in seen]
    seen.update(layers)
    live = {d: fig for d, fig in sorted(figures.items()) if d not in seen}
    return {"state_dir": state.root, "cache_dir": cache_root, "images": out_images,
            "other_layers": orphans, "live_layers": live}


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _size(n):
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_report(report):
    """Human-readable text of ``collect()``'s result."""
    from .metrics import figures_line
    lines = [f"store state: {report['state_dir']}"]
    if not report["images"] and not report["other_layers"]:
        lines.append("no image has been looked up through the store yet")

    def layer_lines(rows):
        out = []
        for r in rows:
            head = f"  {r['digest'][:19]}  {_size(r.get('size')):>9}  {r['mode']:<9}"
            if r["mode"] == "lazy":
                ratio = r.get("local_ratio")
                local = f"{ratio * 100:5.1f}% local" if ratio is not None else "  ?% local"
                reads = r.get('blob_reads', 0)
                out.append(f"{head} fetched {_size(r.get('blob_bytes', 0)):>9} in "
                           f"{reads} read{'' if reads == 1 else 's'}, {local} "
                           f"({_size(r.get('local_bytes'))} of {_size(r.get('file_bytes'))}), "
                           f"{r.get('hits', 0)} cache hits / {r.get('opens', 0)} opens; "
                           f"{r.get('kind')}, TOC verified")
            else:
                out.append(f"{head} {r.get('reason', '')}")
            if r.get("fetch"):
                out.append(f"  {'':19}  {'':>9}  {'':<9} {figures_line(r['fetch'])}")
        return out

    for img in report["images"]:
        lines.append(f"image {img['ref']} ({img.get('platform') or '?'}, "
                     f"manifest {str(img.get('manifest_digest'))[:19]})")
        lines += layer_lines(img["layers"])
    if report["other_layers"]:
        lines.append("layers of images no longer resolved:")
        lines += layer_lines(report["other_layers"])
    if report.get("live_layers"):
        lines.append("other mounted layers (stargz-overlay mount):")
        lines += [f"  {d[:19]}  {figures_line(fig)}" for d, fig in report["live_layers"].items()]
    return "\n".join(lines)
