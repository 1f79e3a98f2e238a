"""Fetch, cache and layer metrics of a mount, as JSON snapshots and Prometheus text.

Each plugin daemon (one per fuse-overlayfs mount) keeps one ``Metrics`` and
rewrites ``<metrics_dir>/<pid>.json`` (and ``<pid>.prom``, Prometheus text
format, for a node_exporter textfile collector) every ``metrics_period_sec``
and when it is released.  ``stargz-overlay metrics`` prints the Prometheus
text of every live daemon, ``stargz-overlay status`` shows the same figures
per layer (``layer_rows``).  Every sample carries a ``pid`` label, so the
files of several daemons never clash.

Fetch kinds: ``metadata`` (footer and TOC at mount), ``on_demand`` (an open
that missed the cache), ``prefetch`` (prioritized region or head),
``background`` (the rest of the layer).
"""

import json
import logging
import os
import threading
import time

log = logging.getLogger("stargz_overlay.plugin")

KINDS = ("metadata", "on_demand", "prefetch", "background")
PREFIX = "stargz_overlay_"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HELP = {
    "fetched_bytes_total": ("counter", "Compressed blob bytes received from the layer source"),
    "fetch_requests_total": ("counter", "Requests (HTTP Range GETs, or reads of a local blob)"),
    "fetch_errors_total": ("counter", "Requests that failed after their retries"),
    "fetch_request_seconds": ("histogram", "Time of one request, until its last byte"),
    "open_seconds": ("histogram", "Time to open a regular file (result: hit, fetched, waited)"),
    "cache_hits_total": ("counter", "Opens of regular files served from the cache"),
    "cache_misses_total": ("counter", "Opens of regular files that had to fetch"),
    "prefetch_waits_total": ("counter", "Opens that waited for an in-flight prefetch"),
    "files_stored_total": ("counter", "Files verified and stored in the cache"),
    "file_bytes_stored_total": ("counter", "Uncompressed bytes verified and stored"),
    "open_errors_total": ("counter", "Opens that failed (reason: fetch, nospace)"),
    "background_paused_seconds_total": ("counter",
                                        "Time background fetch yielded to foreground opens"),
    "layer_blob_bytes": ("gauge", "Size of the layer blob: what a full pull downloads"),
    "layer_file_bytes": ("gauge", "Uncompressed bytes of the layer's regular files"),
    "layer_local_bytes": ("gauge", "Uncompressed bytes of the layer already in the cache"),
    "layer_local_ratio": ("gauge", "Share of the layer's file bytes in the cache (1 = complete)"),
    "layer_bytes_saved": ("gauge", "Blob bytes not downloaded, compared with a full pull"),
    "layer_prefetch_seconds": ("gauge", "Duration of the layer's prefetch"),
    "bytes_saved": ("gauge", "Blob bytes not downloaded, all layers, compared with full pulls"),
    "cache_bytes": ("gauge", "Disk bytes of content in the cache"),
    "cache_evicted_bytes_total": ("counter", "Bytes evicted from the cache by this daemon"),
    "cache_full_errors_total": ("counter", "Stores refused because the cache disk was full"),
}


def _key(labels):
    return tuple(sorted(labels.items()))


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value):
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


class LayerStats:
    """Per-layer figures for ``status`` and the layer gauges."""

    def __init__(self, layer_id, ref="", blob_size=0, toc_digest="", kind=""):
        self.id = layer_id
        self.ref = ref
        self.blob_size = blob_size
        self.toc_digest = toc_digest
        self.kind = kind
        self.files = 0
        self.file_bytes = 0
        self.local_files = 0
        self.local_bytes = 0
        self.prefetch = "none"          # none | skipped | running | done | failed
        self.prefetch_bytes = 0         # blob bytes of the prefetched region
        self.prefetch_seconds = 0.0
        self.background = "off"         # off | waiting | running | done | failed
        self.fetched = dict.fromkeys(KINDS, 0)
        self.requests = dict.fromkeys(KINDS, 0)

    def as_dict(self):
        d = dict(vars(self))
        d["fetched"] = dict(self.fetched)
        d["requests"] = dict(self.requests)
        return d


class Metrics:
    """Thread-safe counters, histograms and layer stats of one plugin process."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters = {}      # (name, labels key) -> number
        self.histograms = {}    # (name, labels key) -> Histogram
        self.layers = {}        # layer id -> LayerStats
        self.started = time.time()

    def layer(self, layer_id, **info):
        with self._lock:
            stats = self.layers.get(layer_id)
            if stats is None:
                stats = self.layers[layer_id] = LayerStats(layer_id, **info)
            return stats

    def inc(self, name, value=1, **labels):
        key = (name, _key(labels))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + value

    def observe(self, name, value, **labels):
        key = (name, _key(labels))
        with self._lock:
            hist = self.histograms.get(key)
            if hist is None:
                hist = self.histograms[key] = Histogram()
            hist.observe(value)

    def fetched(self, layer_id, kind, nbytes, requests=0):
        """Account blob bytes (and requests) received for ``layer_id``."""
        with self._lock:
            stats = self.layers.get(layer_id)
            if stats is not None:
                stats.fetched[kind] = stats.fetched.get(kind, 0) + nbytes
                stats.requests[kind] = stats.requests.get(kind, 0) + requests
        if nbytes:
            self.inc("fetched_bytes_total", nbytes, layer=layer_id, kind=kind)
        if requests:
            self.inc("fetch_requests_total", requests, layer=layer_id, kind=kind)

    def counter(self, name, **labels):
        """Sum of counter ``name`` over the samples matching ``labels``."""
        want = set(labels.items())
        with self._lock:
            return sum(v for (n, k), v in self.counters.items()
                       if n == name and want <= set(k))

    def snapshot(self, cache=None):
        """A JSON-able picture of everything (what the metrics files hold)."""
        with self._lock:
            counters = [[n, dict(k), v] for (n, k), v in self.counters.items()]
            hists = [[n, dict(k), list(h.buckets), list(h.counts), h.sum, h.count]
                     for (n, k), h in self.histograms.items()]
            layers = [s.as_dict() for s in self.layers.values()]
        snap = {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                "written_at": time.time(), "started": self.started, "counters": counters,
                "histograms": hists, "layers": layers}
        if cache is not None:
            snap["cache"] = {"root": cache.root, "max_size": cache.max_size,
                             "evicted_bytes": cache.evicted_bytes,
                             "full_errors": cache.full_errors,
                             "bytes": (cache.last_report.remaining_bytes
                                       if cache.last_report is not None else None)}
        return snap


# -- files -----------------------------------------------------------------

def _start_ticks(pid):
    """Start time of ``pid`` in clock ticks (tells a live daemon from a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def write_files(directory, snap, prometheus=True):
    """Atomically (re)write ``<pid>.json`` and ``<pid>.prom`` in ``directory``."""
    os.makedirs(directory, mode=0o755, exist_ok=True)
    base = os.path.join(directory, str(snap["pid"]))
    outputs = [(base + ".json", json.dumps(snap, separators=(",", ":")))]
    if prometheus:
        outputs.append((base + ".prom", render([snap])))
    for path, text in outputs:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.rename(tmp, path)


def remove_files(directory, pid=None):
    pid = pid or os.getpid()
    for ext in (".json", ".prom"):
        try:
            os.unlink(os.path.join(directory, f"{pid}{ext}"))
        except OSError:
            pass


def read_snapshots(directory, clean=False):
    """Snapshots of the live daemons in ``directory`` (stale files removed if ``clean``)."""
    out = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                snap = json.load(f)
        except (OSError, ValueError):
            continue
        if _start_ticks(snap.get("pid")) != snap.get("start_ticks"):
            if clean:
                remove_files(directory, snap.get("pid"))
            continue
        out.append(snap)
    return out


# -- Prometheus text ---------------------------------------------------------

def _labels(labels):
    if not labels:
        return ""
    parts = []
    for k, v in sorted(labels.items()):
        v = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{v}"')
    return "{" + ",".join(parts) + "}"


def _num(v):
    if isinstance(v, float):
        return repr(v) if v != int(v) or abs(v) >= 1e15 else str(int(v))
    return str(v)


def layer_gauges(layer):
    """(name, value) gauges of one layer dict from a snapshot."""
    fetched = sum(layer["fetched"].values())
    ratio = layer["local_bytes"] / layer["file_bytes"] if layer["file_bytes"] else 1.0
    return [("layer_blob_bytes", layer["blob_size"]),
            ("layer_file_bytes", layer["file_bytes"]),
            ("layer_local_bytes", layer["local_bytes"]),
            ("layer_local_ratio", round(ratio, 6)),
            ("layer_bytes_saved", max(layer["blob_size"] - fetched, 0)),
            ("layer_prefetch_seconds", round(layer["prefetch_seconds"], 6))]


def render(snapshots, extra=()):
    """Prometheus text exposition of ``snapshots`` (plus ``extra`` (name, labels, value))."""
    families = {}

    def add(name, labels, value, suffix=""):
        families.setdefault(name, []).append((suffix, labels, value))

    for snap in snapshots:
        pid = {"pid": str(snap["pid"])}
        for name, labels, value in snap["counters"]:
            add(name, {**pid, **labels}, value)
        for name, labels, bounds, counts, total, count in snap["histograms"]:
            base = {**pid, **labels}
            for bound, n in zip(bounds, counts):
                add(name, {**base, "le": _num(float(bound))}, n, "_bucket")
            add(name, {**base, "le": "+Inf"}, count, "_bucket")
            add(name, base, total, "_sum")
            add(name, base, count, "_count")
        saved = 0
        for layer in snap["layers"]:
            labels = {**pid, "layer": layer["id"]}
            for name, value in layer_gauges(layer):
                add(name, labels, value)
            saved += max(layer["blob_size"] - sum(layer["fetched"].values()), 0)
        add("bytes_saved", pid, saved)
        cache = snap.get("cache")
        if cache:
            add("cache_evicted_bytes_total", pid, cache["evicted_bytes"])
            add("cache_full_errors_total", pid, cache["full_errors"])
    for name, labels, value in extra:
        add(name, labels, value)
    lines = []
    for name in sorted(families):
        kind, text = HELP.get(name, ("untyped", name))
        lines.append(f"# HELP {PREFIX}{name} {text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for suffix, labels, value in families[name]:
            lines.append(f"{PREFIX}{name}{suffix}{_labels(labels)} {_num(value)}")
    return "\n".join(lines) + "\n"


# -- status ------------------------------------------------------------------

def layer_rows(snapshots):
    """One dict per mounted layer of every live daemon, for ``status``."""
    rows = []
    for snap in snapshots:
        for layer in snap["layers"]:
            row = dict(layer)
            row["pid"] = snap["pid"]
            row["fetched_total"] = sum(layer["fetched"].values())
            row["local_ratio"] = (layer["local_bytes"] / layer["file_bytes"]
                                  if layer["file_bytes"] else 1.0)
            row["bytes_saved"] = max(layer["blob_size"] - row["fetched_total"], 0)
            rows.append(row)
    return rows


def figures_by_layer(snapshots):
    """Per layer digest, the fetch figures of every live daemon serving it, merged.

    ``{digest: {"fetched": {kind: bytes}, "requests": {kind: n}, "local_bytes",
    "file_bytes", "local_ratio", "blob_size", "bytes_saved", "prefetch",
    "background", "mounts"}}`` (fetched/requests summed over the daemons).
    """
    out = {}
    for row in layer_rows(snapshots):
        fig = out.get(row["id"])
        if fig is None:
            fig = out[row["id"]] = {"fetched": dict.fromkeys(KINDS, 0),
                                    "requests": dict.fromkeys(KINDS, 0), "local_bytes": 0,
                                    "file_bytes": row["file_bytes"],
                                    "blob_size": row["blob_size"], "prefetch": [],
                                    "background": [], "mounts": 0}
        for kind in KINDS:
            fig["fetched"][kind] += row["fetched"].get(kind, 0)
            fig["requests"][kind] += row["requests"].get(kind, 0)
        fig["local_bytes"] = max(fig["local_bytes"], row["local_bytes"])
        fig["prefetch"].append(row["prefetch"])
        fig["background"].append(row["background"])
        fig["mounts"] += 1
    for fig in out.values():
        fig["local_ratio"] = fig["local_bytes"] / fig["file_bytes"] if fig["file_bytes"] else 1.0
        fig["bytes_saved"] = max(fig["blob_size"] - sum(fig["fetched"].values()), 0)
        fig["prefetch"] = ",".join(sorted(set(fig["prefetch"])))
        fig["background"] = ",".join(sorted(set(fig["background"])))
    return out


def figures_line(fig):
    """One line of text for a layer's merged figures (``status``)."""
    f = fig["fetched"]
    return (f"fetched {_mib(sum(f.values()))} MiB: on demand {_mib(f['on_demand'])}, prefetch "
            f"{_mib(f['prefetch'])} ({fig['prefetch']}), background {_mib(f['background'])} "
            f"({fig['background']}), metadata {_mib(f['metadata'])}; "
            f"{fig['local_ratio'] * 100:.1f}% local; saved {_mib(fig['bytes_saved'])} MiB of "
            f"a {_mib(fig['blob_size'])} MiB full pull ({fig['mounts']} live mount"
            f"{'s' if fig['mounts'] != 1 else ''})")


def _mib(n):
    return f"{n / (1 << 20):.1f}"


class Writer:
    """Daemon thread rewriting the metrics files; also runs periodic cache collection."""

    def __init__(self, metrics, config, cache):
        self.metrics = metrics
        self.config = config
        self.cache = cache
        self.stop = threading.Event()
        self._next_gc = time.monotonic() + min(config.directory_cache.gc_interval_sec, 30.0)
        self.thread = None
        self._warned = False

    def start(self):
        from .fetch_control import start_thread
        self.thread = start_thread("sz-metrics", self._run)

    def write(self):
        try:
            write_files(self.config.metrics_dir, self.metrics.snapshot(self.cache),
                        prometheus=not self.config.no_prometheus)
        except OSError as exc:
            (log.debug if self._warned else log.warning)(
                "cannot write metrics to %s: %s", self.config.metrics_dir, exc)
            self._warned = True

    def _run(self):
        period = self.config.metrics_period_sec
        while True:
            self.write()
            if time.monotonic() >= self._next_gc:
                self._next_gc = time.monotonic() + self.config.directory_cache.gc_interval_sec
                try:
                    report = self.cache.maybe_collect()
                    if report is not None:
                        log.info("cache collection: %s", report.summary())
                except OSError as exc:
                    log.warning("cache collection failed: %s", exc)
            if self.stop.wait(period):
                return
