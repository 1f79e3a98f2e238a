"""Fetch state of the mounted layers: what is local, in-flight prefetches, pins, workers.

``FetchContext`` is per plugin process (metrics, connection limits, the
foreground gate, the link estimate, the background fetcher).
``LayerFetch`` is per layer: ``LayerView.open`` goes through
``open_file``, which answers cache hits at once, makes an open of a file
that an in-flight prefetch is about to deliver wait for it (up to
``prefetch_timeout_sec``) instead of requesting the same bytes again, and
otherwise fetches on demand, marked as a foreground wait so that background
fetching pauses.  The layer pins all its files' digests, and its TOC's, in the
cache for as long as it is mounted.
"""

import errno
import logging
import os
import threading
import time

from .cache import EMPTY_SHA256
from .fetch_control import ForegroundGate, HostLimiter, LinkEstimate, MeteredSource, fetch_kind
from .metrics import Metrics

log = logging.getLogger("stargz_overlay.plugin")


class FetchContext:
    """Process-wide fetch plumbing, created before the fork (no threads)."""

    def __init__(self, config, cache):
        self.config = config
        self.cache = cache
        self.metrics = Metrics()
        self.limiter = HostLimiter(config.max_concurrency)
        self.gate = ForegroundGate(config.background_fetch.silence_period_msec / 1000.0)
        self.link = LinkEstimate()
        self.layers = []            # LayerFetch, in load order
        self.writer = None
        self.background = None
        self.started = False

    def metered(self, source, layer_id, label, ref=""):
        """Wrap a layer's blob source so that every request is accounted."""
        self.metrics.layer(layer_id, ref=ref, blob_size=source.size)
        return MeteredSource(source, layer_id, label, self.metrics, self.limiter, self.link,
                             log_reads=self.config.log_reads,
                             retries=self.config.registry.retries)

    def start(self):
        """In the daemon, on its first callback: metrics writer, prefetch, background fetch."""
        if self.started:
            return
        self.started = True
        self.gate.note()             # the container starts now: quiet counts from here
        from .metrics import Writer
        self.writer = Writer(self.metrics, self.config, self.cache)
        self.writer.start()
        if self.config.prefetch:
            from . import prefetch
            for layer in self.layers:
                prefetch.start(layer)
        else:
            for layer in self.layers:
                layer.stats.prefetch = "off"
                layer.prefetch_done.set()
        if self.config.background:
            from .background import BackgroundFetcher
            self.background = BackgroundFetcher(self, list(self.layers))
            self.background.start()

    def close(self):
        if self.writer is not None:
            self.writer.stop.set()
            from .metrics import remove_files
            remove_files(self.config.metrics_dir)


class LayerFetch:
    """One mounted layer's fetch state (see the module docstring)."""

    def __init__(self, view, ctx, layer_id, mounted=True):
        """``mounted``: a mount's layer, pinned and prefetched/background-fetched by
        ``ctx.start()``.  The store's layers (``store_view``: prefetch at pull) are
        neither: the store starts their prefetch itself, and a pulled image that no
        container runs does not keep its files from eviction."""
        self.view = view
        self.ctx = ctx
        self.id = layer_id
        self.entries = view.toc.data_entries()
        reader = view.reader
        self.stats = ctx.metrics.layer(layer_id)
        self.stats.toc_digest = reader.toc_digest
        self.stats.kind = reader.kind
        self.stats.files = len(self.entries)
        self.stats.file_bytes = sum(e.size for e in self.entries)
        self._lock = threading.Lock()
        self.local = set()                  # Entry.ino of files known to be in the cache
        self.pending = {}                   # Entry.ino -> Event, files of an in-flight prefetch
        self.prefetch_done = threading.Event()
        self.closed = False
        digests = {e.digest for e in self.entries if e.digest}
        digests.add(EMPTY_SHA256)
        digests.add(reader.toc_digest)       # the TOC JSON is cached under its digest too
        self.pin = (ctx.cache.pin(digests, label=f"{layer_id} {view.label}")
                    if mounted else None)
        view.fetch = self
        if mounted:
            ctx.layers.append(self)

    # -- bookkeeping --

    def stored(self, entry, digest, computed=False):
        """``entry``'s content is in the cache (called by LayerView.file_path)."""
        if computed and self.pin is not None:
            self.pin.add(digest)
        with self._lock:
            if entry.ino in self.local or entry.size == 0:
                return
            self.local.add(entry.ino)
            self.stats.local_files += 1
            self.stats.local_bytes += entry.size

    def is_local(self, entry):
        """Is the content of ``entry`` in the cache (verified)?  Marks it local if so."""
        if entry.size == 0 or entry.ino in self.local:
            return True
        digest = entry.digest or self.view._computed.get(entry.ino)
        if digest is not None and self.ctx.cache.lookup(digest, entry.size) is not None:
            self.stored(entry, digest)
            return True
        return False

    def content_key(self, entry):
        """What an open of ``entry`` waits for (shared with background fetching)."""
        return entry.digest or self.view._computed.get(entry.ino) or (self.id, entry.ino)

    @property
    def complete(self):
        return len(self.local) >= len(self.entries)

    # -- opening --

    def open_file(self, entry, name):
        """Cache path of a regular file's content (see the module docstring)."""
        view = self.view
        if entry.size == 0:
            return view.file_path(entry, name)
        started = time.monotonic()
        metrics = self.ctx.metrics
        digest = entry.digest or view._computed.get(entry.ino)
        if digest is not None:
            path = self.ctx.cache.lookup(digest, entry.size)
            if path is not None:
                self.stored(entry, digest)
                metrics.inc("cache_hits_total", layer=self.id)
                metrics.observe("open_seconds", time.monotonic() - started, result="hit")
                return path
        result = "fetched"
        try:
            with self.ctx.gate.busy(self.content_key(entry)):
                event = self.pending.get(entry.ino)
                if event is not None:
                    metrics.inc("prefetch_waits_total", layer=self.id)
                    if not self._wait_prefetch(event, digest):
                        log.info("%s: %s: prefetch still running after %.0f s; fetching it "
                                 "directly", view.label, name,
                                 self.ctx.config.prefetch_timeout_sec)
                    digest = entry.digest or view._computed.get(entry.ino)
                    if digest is not None:
                        path = self.ctx.cache.lookup(digest, entry.size)
                        if path is not None:
                            metrics.inc("cache_hits_total", layer=self.id)
                            metrics.observe("open_seconds", time.monotonic() - started,
                                            result="waited")
                            return path
                metrics.inc("cache_misses_total", layer=self.id)
                with fetch_kind("on_demand"):
                    path = view.file_path(entry, name)
        except OSError as exc:
            reason = "nospace" if exc.errno == errno.ENOSPC else "fetch"
            metrics.inc("open_errors_total", layer=self.id, reason=reason)
            raise
        metrics.observe("open_seconds", time.monotonic() - started, result=result)
        return path

    def _wait_prefetch(self, event, digest):
        """Wait until the prefetch has passed the file (or it appeared in the cache,
        e.g. from another mount's prefetch); False after prefetch_timeout_sec."""
        deadline = time.monotonic() + self.ctx.config.prefetch_timeout_sec
        path = self.ctx.cache.path(digest) if digest else None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if event.wait(min(left, 0.05)):
                return True
            if path is not None and os.path.exists(path):
                return True

    def close(self):
        self.closed = True
        if self.pin is not None:
            self.pin.release()
