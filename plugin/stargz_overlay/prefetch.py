"""Prefetch of a layer's prioritized region, streamed through ONE request.

An eStargz layer with ``.prefetch.landmark`` holds the files a workload reads
at start-up before the landmark.  When the layer is first used (in the
forked daemon, never before fuse-overlayfs forks), or already when the
store resolves it at ``podman pull`` (``store_view``), one thread per layer
requests the whole region ``[0, landmark)`` with a single Range request and,
as the bytes stream in, verifies (per chunk and per file) and stores file
after file in the cache.  An open of a file still ahead in the stream waits
for it (``LayerFetch.open_file``) and is released as soon as that file is
stored, not when the whole region has arrived.

``.no.prefetch.landmark`` means "nothing to prefetch".  A layer without any
landmark (plain stargz, eStargz converted without prioritized files) gets
its head prefetched the same way when ``prefetch_size`` is set: the files
that end within the first ``prefetch_size`` bytes of the blob.

Files already in the cache are left out by trimming the range; if every
file is local, no request is made at all.
"""

import copy
import logging
import os
import threading
import time

from .errors import StargzError
from .fetch_control import fetch_kind, start_thread
from .toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK

log = logging.getLogger("stargz_overlay.plugin")


def _files(view):
    """Regular files with content, once each, in blob order."""
    out = [e for e in view.toc.data_entries() if e.chunks]
    out.sort(key=lambda e: e.chunks[0].offset)
    return out


def plan(view, prefetch_size=0):
    """``(start, end, entries, why)`` of the region to prefetch, or ``(None, why)``."""
    mark = view.toc.landmark
    if mark is not None and mark.name == NO_PREFETCH_LANDMARK:
        return None, "the layer says nothing is to be prefetched (.no.prefetch.landmark)"
    rng = view.reader.prefetch_range()
    if mark is not None and mark.name == PREFETCH_LANDMARK and rng is not None:
        end = rng[1]
        entries = [e for e in _files(view) if e.chunks[-1].end <= end]
        return (rng[0], end, entries, "prioritized files (.prefetch.landmark)"), None
    if prefetch_size <= 0:
        return None, "no landmark and prefetch_size is 0"
    entries = [e for e in _files(view) if e.chunks[-1].end <= prefetch_size]
    if not entries:
        return None, f"no file ends within the first {prefetch_size} bytes"
    return (0, entries[-1].chunks[-1].end, entries, f"head of the layer ({prefetch_size} "
            f"bytes)"), None


def start(layer):
    """Plan the layer's prefetch and, if there is one, start its thread."""
    view = layer.view
    planned, why = plan(view, layer.ctx.config.prefetch_size)
    if planned is None:
        layer.stats.prefetch = "skipped"
        log.info("%s: no prefetch: %s", view.label, why)
        layer.prefetch_done.set()
        return None
    start_, end, entries, why = planned
    for entry in entries:                       # before the thread runs: opens see them
        layer.pending.setdefault(entry.ino, threading.Event())
    layer.stats.prefetch = "running"
    return start_thread(f"sz-prefetch{view.label[5:].split('(')[0]}", run, layer, start_, end,
                        entries, why)


def run(layer, start, end, entries, why):
    view = layer.view
    started = time.monotonic()
    done = failed = 0
    claim = None
    try:
        # One mount of a layer prefetches it; another one started at the same time
        # waits here, then finds the files in the shared cache (its opens meanwhile
        # watch the cache for their files).
        claim = layer.ctx.cache.claim("prefetch", layer.id, blocking=True)
        todo = [e for e in entries if not _present(layer, e)]
        wanted = {e.ino for e in todo}
        for entry in entries:
            if entry.ino not in wanted:
                _release(layer, entry)
        if not todo:
            layer.stats.prefetch = "done"
            log.info("%s: prefetch: all %d %s are already cached", view.label, len(entries),
                     why)
            return
        if len(todo) < len(entries):          # trim to the files still missing
            start = todo[0].chunks[0].offset
            end = todo[-1].chunks[-1].end
        layer.stats.prefetch_bytes = end - start
        source = view.reader.source
        with fetch_kind("prefetch"), source.stream(start, end) as stream:
            reader = copy.copy(view.reader)
            reader.source = stream
            for entry in todo:
                try:
                    view.file_path(entry, entry.name, reader=reader)
                    done += 1
                except OSError as exc:
                    failed += 1
                    log.warning("%s: prefetch of %s failed: %s", view.label, entry.name,
                                exc.strerror or exc)
                    if stream.broken is not None:
                        break
                finally:
                    _release(layer, entry)
                    layer.ctx.gate.note()
            if stream.broken is None:
                stream.drain()
            else:
                raise stream.broken
    except (StargzError, OSError) as exc:
        layer.stats.prefetch = "failed"
        log.warning("%s: prefetch stopped after %d of %d files: %s", view.label, done,
                    len(entries), exc)
        return
    finally:
        if claim is not None:
            os.close(claim)
        for entry in entries:
            _release(layer, entry)
        layer.stats.prefetch_seconds = time.monotonic() - started
        layer.prefetch_done.set()
    layer.stats.prefetch = "done" if not failed else "failed"
    log.info("%s: prefetched %d %s (%d bytes of blob in one request) in %.2f s%s",
             view.label, done, why, end - start, time.monotonic() - started,
             f"; {failed} failed" if failed else "")


def _present(layer, entry):
    """Is the content of ``entry`` in the cache?  (Not re-hashed here: that would delay
    the request; an open verifies it before use.)"""
    if entry.ino in layer.local:
        return True
    digest = entry.digest or layer.view._computed.get(entry.ino)
    return digest is not None and os.path.exists(layer.ctx.cache.path(digest))


def _release(layer, entry):
    event = layer.pending.pop(entry.ino, None)
    if event is not None:
        event.set()
