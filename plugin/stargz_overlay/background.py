"""Background fetch: make every mounted layer 100% local, without getting in the way.

After the start-up traffic settles (every layer's prefetch has finished and
no foreground open has waited for ``silence_period_msec``), the files of
each layer that are not yet in the cache are fetched in blob order, in
large ranges (consecutive missing files coalesced into requests of up to
``span_size`` bytes of blob), each range streamed through one request and
stored file by file like a prefetch.  While a foreground open waits, the
stream pauses between blocks; the rate is capped at ``bandwidth_share`` of
the link rate measured by foreground transfers and at ``max_rate_mbit``.
``concurrency`` ranges are fetched at once.  Failed ranges are retried in
later rounds with a growing delay, until the layer is complete; then a
registry outage no longer matters to its containers.
"""

import copy
import logging
import os
import queue
import threading
import time

from .errors import StargzError
from .fetch_control import RateLimiter, fetch_kind, start_thread

log = logging.getLogger("stargz_overlay.plugin")

MAX_GAP = 256 << 10           # bytes of already-local files a range may span to stay one request
RETRY_DELAYS = (5, 15, 60, 300)
OTHER_MOUNT_RECHECK = 2       # seconds, while another mount fetches our layers


def spans(entries, span_size, max_gap=MAX_GAP):
    """Group blob-ordered ``entries`` into ranges ``(start, end, [entries])``."""
    out = []
    for entry in entries:
        first, last = entry.chunks[0].offset, entry.chunks[-1].end
        if out:
            span = out[-1]
            if first - span[1] <= max_gap and last - span[0] <= span_size:
                span[1] = max(span[1], last)
                span[2].append(entry)
                continue
        out.append([first, last, [entry]])
    return [tuple(span) for span in out]


class BackgroundFetcher:
    """One per plugin process; see the module docstring."""

    def __init__(self, ctx, layers):
        self.ctx = ctx
        self.layers = layers
        cfg = ctx.config.background_fetch
        self.cfg = cfg
        self.rate = RateLimiter(self._rate, burst=256 << 10)
        self.paused = 0.0
        self._producing = threading.local()      # content key each worker is fetching

    def _rate(self):
        """Bytes/s allowed now (0 = unlimited)."""
        limits = []
        if self.cfg.max_rate_mbit:
            limits.append(self.cfg.max_rate_mbit * 1e6 / 8)
        link = self.ctx.link.rate
        if self.cfg.bandwidth_share and link:
            limits.append(link * self.cfg.bandwidth_share)
        return min(limits) if limits else 0.0

    def start(self):
        for layer in self.layers:
            layer.stats.background = "waiting"
        return start_thread("sz-bgfetch", self._run)

    def throttle(self, nbytes):
        paused = self.ctx.gate.wait_quiet(getattr(self._producing, "key", None))
        if paused > 0.001:
            self.paused += paused
            self.ctx.metrics.inc("background_paused_seconds_total", paused)
        self.rate.consume(nbytes)

    def _run(self):
        for layer in self.layers:
            layer.prefetch_done.wait()
        rounds = 0
        while True:
            self.ctx.gate.wait_quiet()
            jobs = queue.Queue()
            held = []
            for layer in self.layers:
                if layer.closed or layer.complete:
                    continue
                lock = self.ctx.cache.claim("background", layer.id)
                if lock is None:
                    layer.stats.background = "other mount"
                    continue
                held.append(lock)
                layer.stats.background = "running"
                missing = [e for e in layer.entries if e.ino not in layer.local and e.chunks]
                missing.sort(key=lambda e: e.chunks[0].offset)
                for span in spans(missing, self.cfg.span_size):
                    jobs.put((layer, span))
            try:
                if jobs.empty() and self._finish():
                    return
                workers = [start_thread(f"sz-bgfetch{i}", self._worker, jobs)
                           for i in range(self.cfg.concurrency)]
                for worker in workers:
                    worker.join()
            finally:
                for fd in held:
                    os.close(fd)
            if self._finish():
                return
            if not held:        # only layers another mount is fetching: look again soon
                delay = OTHER_MOUNT_RECHECK
            else:
                delay = RETRY_DELAYS[min(rounds, len(RETRY_DELAYS) - 1)]
                rounds += 1
            log.info("background fetch: %s; looking again in %d s",
                     ", ".join(f"{layer.view.label} {len(layer.local)}/{len(layer.entries)} "
                               f"files local" for layer in self.layers if not layer.complete),
                     delay)
            time.sleep(delay)

    def _finish(self):
        """Mark complete layers; True when nothing is left to fetch."""
        left = False
        for layer in self.layers:
            if layer.closed:
                continue
            if layer.complete:
                if layer.stats.background != "done":
                    layer.stats.background = "done"
                    log.info("%s: 100%% local (%d files, %d bytes); background fetch done",
                             layer.view.label, len(layer.entries), layer.stats.file_bytes)
            else:
                if layer.stats.background != "other mount":
                    layer.stats.background = "retrying"
                left = True
        return not left

    def _worker(self, jobs):
        while True:
            try:
                layer, (start, end, entries) = jobs.get_nowait()
            except queue.Empty:
                return
            if layer.closed:
                continue
            self.throttle(0)
            todo = [e for e in entries if not layer.is_local(e)]
            if not todo:
                continue
            start, end = todo[0].chunks[0].offset, todo[-1].chunks[-1].end
            self._fetch_span(layer, start, end, todo)

    def _fetch_span(self, layer, start, end, todo):
        view = layer.view
        try:
            with fetch_kind("background"), \
                    view.reader.source.stream(start, end, throttle=self.throttle) as stream:
                reader = copy.copy(view.reader)
                reader.source = stream
                for entry in todo:
                    if layer.closed:
                        return
                    self._producing.key = layer.content_key(entry)
                    try:
                        view.file_path(entry, entry.name, reader=reader)
                    except OSError as exc:
                        log.warning("%s: background fetch of %s failed: %s", view.label,
                                    entry.name, exc.strerror or exc)
                        if stream.broken is not None:
                            return
                self._producing.key = None
                stream.drain()
        except (StargzError, OSError) as exc:
            log.warning("%s: background fetch of bytes %d-%d failed: %s", view.label, start,
                        end, exc)
        finally:
            self._producing.key = None
