"""Background prefetch of a layer's prioritized files (those before ``.prefetch.landmark``).

Runs in one thread per layer, started lazily in the forked daemon (never in
fuse-overlayfs's pre-fork parent, where a thread would vanish or deadlock the
daemon).  The prioritized region is read in a few large reads (one HTTP
Range request each for registry layers) and every file in it goes through
the same verified cache as an ``openat``, so a concurrent open of the same
file waits for this fetch instead of fetching again.
"""

import copy
import logging
import threading

from .errors import SourceError, StargzError

log = logging.getLogger("stargz_overlay.plugin")
WINDOW = 16 << 20        # bytes of blob per read


class _Window:
    """A source answering reads inside one prefetched window from memory."""

    def __init__(self, inner, start, data):
        self.inner = inner
        self.size = inner.size
        self.start = start
        self.data = data

    def read_at(self, offset, length):
        lo = offset - self.start
        if lo < 0 or lo + length > len(self.data):
            raise SourceError(f"prefetch window does not hold {offset}+{length}")
        return self.data[lo:lo + length]


def prioritized_entries(view):
    """Regular files whose bytes lie in the prefetch range, in blob order."""
    rng = view.reader.prefetch_range()
    if rng is None:
        return []
    seen = set()
    out = []
    for entry in view.toc.entries:
        if (entry.type == "reg" and entry.size and entry.chunks
                and entry.chunks[-1].end <= rng[1] and id(entry) not in seen):
            seen.add(id(entry))
            out.append(entry)
    out.sort(key=lambda e: e.chunks[0].offset)
    return out


def windows(entries):
    """Group entries into runs whose blob bytes span at most WINDOW (one read each)."""
    group = []
    for entry in entries:
        if group and entry.chunks[-1].end - group[0].chunks[0].offset > WINDOW:
            yield group
            group = []
        group.append(entry)
    if group:
        yield group


def prefetch_layer(view):
    entries = prioritized_entries(view)
    if not entries:
        return
    done = 0
    try:
        for group in windows(entries):
            start, end = group[0].chunks[0].offset, group[-1].chunks[-1].end
            todo = [e for e in group if not view.cached(e)]
            if not todo:
                done += len(group)
                continue
            data = view.reader.source.read_at(start, end - start)
            reader = copy.copy(view.reader)
            reader.source = _Window(view.reader.source, start, data)
            for entry in group:
                view.file_path(entry, entry.name, reader=reader)
                done += 1
    except (StargzError, OSError) as exc:
        log.warning("%s: prefetch stopped after %d of %d files: %s", view.label, done,
                    len(entries), exc)
        return
    log.info("%s: prefetched %d prioritized files", view.label, done)


def start(views):
    """Start one daemon thread per layer that has prioritized files; return them."""
    threads = []
    for view in views:
        if view.reader.prefetch_range() is None:
            continue
        t = threading.Thread(target=prefetch_layer, args=(view,), daemon=True,
                             name=f"prefetch-{view.label.split('(')[0]}")
        t.start()
        threads.append(t)
    return threads
