"""What every blob fetch goes through: accounting, connection limits, priorities, streams.

- ``MeteredSource`` wraps a layer's blob source: it counts bytes, requests
  and latency per fetch kind (``fetch_kind``: on_demand by default,
  prefetch, background, metadata), logs reads (``log_reads``) and holds a
  per-registry connection slot (``HostLimiter``) for each request.
- ``RangeStream`` reads ``[start, end)`` of a blob with ONE request and
  hands the bytes out forward-only as they arrive, so a consumer can verify
  and store file after file of a prefetched region without waiting for (or
  holding in memory) the whole region.  A connection that breaks mid-body
  is resumed from where it stopped.
- ``ForegroundGate`` tells background fetching when foreground opens are
  waiting (pause) and when traffic has settled (resume);
  ``RateLimiter``/``LinkEstimate`` bound background bandwidth.

Threads are started only through ``start_thread`` (named ``sz-*`` in
/proc, so they are told apart from fuse-overlayfs's own threads), and only
in the daemon, never before fuse-overlayfs forks.
"""

import contextlib
import ctypes
import logging
import threading
import time

from .errors import RangeNotSupported, SourceError, StargzError

log = logging.getLogger("stargz_overlay.plugin")

STREAM_BLOCK = 256 << 10       # bytes handed over per pull of a stream
TAIL_GUESS = 64 << 10          # registry blobs: bytes read with the footer (the TOC, mostly)
BACKGROUND_RCVBUF = 256 << 10  # receive buffer of background connections: bounds what
                               # still arrives after background fetching pauses
LOCAL_WINDOW = 16 << 20        # bytes per read when a source cannot stream
_local = threading.local()


# -- fetch kinds -------------------------------------------------------------

def current_kind():
    return getattr(_local, "kind", "on_demand")


@contextlib.contextmanager
def fetch_kind(kind):
    """Account the fetches of this thread inside the block as ``kind``."""
    previous = current_kind()
    _local.kind = kind
    try:
        yield
    finally:
        _local.kind = previous


# -- threads -----------------------------------------------------------------

def _set_thread_name(name):
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)      # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def start_thread(name, target, *args):
    """Start a daemon thread called ``name`` (also its /proc comm) running ``target``."""
    def run():
        _set_thread_name(name)
        try:
            target(*args)
        except Exception:               # noqa: BLE001 - a worker must log, not vanish
            log.exception("thread %s failed", name)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


# -- limits and priorities -----------------------------------------------------

class HostLimiter:
    """At most ``limit`` requests at once per registry host; foreground goes first.

    Background requests leave one slot free for foreground ones and never
    overtake a waiting foreground request.
    """

    def __init__(self, limit):
        self.limit = max(1, limit)
        self._cond = threading.Condition()
        self._active = {}
        self._fg_waiting = {}
        self.peak = {}

    @contextlib.contextmanager
    def slot(self, host, background=False):
        if host is None:
            yield
            return
        with self._cond:
            if background:
                cap = self.limit - 1 if self.limit > 1 else 1
                while self._active.get(host, 0) >= cap or self._fg_waiting.get(host, 0):
                    self._cond.wait()
            else:
                self._fg_waiting[host] = self._fg_waiting.get(host, 0) + 1
                while self._active.get(host, 0) >= self.limit:
                    self._cond.wait()
                self._fg_waiting[host] -= 1
            n = self._active[host] = self._active.get(host, 0) + 1
            self.peak[host] = max(self.peak.get(host, 0), n)
        try:
            yield
        finally:
            with self._cond:
                self._active[host] -= 1
                self._cond.notify_all()


class ForegroundGate:
    """Foreground opens in progress (and what they wait for), and when the last one ended."""

    def __init__(self, silence):
        self.silence = silence            # seconds of quiet before background may run
        self._cond = threading.Condition()
        self._active = 0
        self._wanted = {}                 # key (digest) -> opens waiting for it
        self._last = time.monotonic()

    @contextlib.contextmanager
    def busy(self, key=None):
        """An open that waits for the content ``key`` (e.g. its digest)."""
        with self._cond:
            self._active += 1
            self._wanted[key] = self._wanted.get(key, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._wanted[key] -= 1
                if not self._wanted[key]:
                    del self._wanted[key]
                self._last = time.monotonic()
                self._cond.notify_all()

    def note(self):
        """Foreground activity that did not wait (e.g. prefetch progress, the first call)."""
        with self._cond:
            self._last = time.monotonic()

    def wait_quiet(self, producing=None):
        """Block until no open is waiting and none ended within ``silence``; seconds waited.

        A background fetch producing content ``producing`` that an open waits for
        is never paused (the open needs it; pausing would deadlock them).
        """
        started = time.monotonic()
        with self._cond:
            while True:
                now = time.monotonic()
                if producing is not None and producing in self._wanted:
                    return now - started
                if self._active:
                    self._cond.wait(1.0)
                    continue
                left = self._last + self.silence - now
                if left <= 0:
                    return now - started
                self._cond.wait(left)


class LinkEstimate:
    """The link's rate as seen by foreground transfers (the best of recent large ones)."""

    MIN_BYTES = 128 << 10

    def __init__(self):
        self._samples = []
        self._lock = threading.Lock()

    def observe(self, nbytes, seconds):
        if nbytes < self.MIN_BYTES or seconds <= 0:
            return
        with self._lock:
            self._samples = (self._samples + [nbytes / seconds])[-8:]

    @property
    def rate(self):
        """Bytes per second, or 0 while unknown."""
        with self._lock:
            return max(self._samples) if self._samples else 0.0


class RateLimiter:
    """Token bucket whose rate (bytes/s, 0 = unlimited) may change over time."""

    def __init__(self, rate_fn, burst=1 << 20):
        self.rate_fn = rate_fn
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes):
        """Wait until ``nbytes`` may be received; return the seconds waited."""
        rate = self.rate_fn()
        if not rate:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= nbytes
            delay = -self._tokens / rate if self._tokens < 0 else 0.0
        if delay > 0:
            time.sleep(delay)
        return delay


# -- metered sources -----------------------------------------------------------

def source_host(source):
    """The registry host a source reads from, or None for local blobs."""
    reference = getattr(source, "reference", None)
    return getattr(reference, "registry", None) if reference is not None else None


class MeteredSource:
    """A blob source that accounts every request (see the module docstring)."""

    def __init__(self, inner, layer_id, label, metrics, limiter, link=None, log_reads=False,
                 retries=3):
        self.inner = inner
        self.size = inner.size
        self.layer_id = layer_id
        self.label = label
        self.metrics = metrics
        self.limiter = limiter
        self.link = link
        self.log_reads = log_reads
        self.retries = retries
        self.host = source_host(inner)
        self.reads = 0
        self.bytes = 0
        self._tail = None               # the blob's last TAIL_GUESS bytes, while loading
        self._tail_used = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _logged(self, offset, length):
        self.reads += 1
        self.bytes += length
        if self.log_reads:
            log.info("blob-read %s offset=%d length=%d", self.label, offset, length)

    def read_at(self, offset, length):
        tail = self._tail
        if tail is not None and offset >= self.size - len(tail):
            lo = offset - (self.size - len(tail))
            return tail[lo:lo + length]
        if (self.host is not None and not self._tail_used and offset + length == self.size
                and length < TAIL_GUESS < self.size):
            # The footer read at mount: take the TOC (usually smaller) with it,
            # one round trip instead of two.
            self._tail_used = True
            self._tail = self._read(self.size - TAIL_GUESS, TAIL_GUESS)
            return self._tail[TAIL_GUESS - length:]
        self._tail = None                # loading is over
        return self._read(offset, length)

    def loaded(self):
        """The layer is open: forget the tail read with the footer."""
        self._tail = None

    def _read(self, offset, length):
        kind = current_kind()
        with self.limiter.slot(self.host, background=kind == "background"):
            self._logged(offset, length)
            started = time.monotonic()
            try:
                data = self.inner.read_at(offset, length)
            except StargzError:
                self.metrics.inc("fetch_errors_total", layer=self.layer_id, kind=kind)
                self.metrics.fetched(self.layer_id, kind, 0, requests=1)
                raise
            elapsed = time.monotonic() - started
        self.metrics.fetched(self.layer_id, kind, len(data), requests=1)
        self.metrics.observe("fetch_request_seconds", elapsed, kind=kind)
        if self.link is not None and kind in ("on_demand", "prefetch"):
            self.link.observe(len(data), elapsed)
        return data

    def stream(self, start, end, throttle=None):
        """A RangeStream of ``[start, end)`` accounted to the current fetch kind."""
        return RangeStream(self, start, end, current_kind(), throttle)

    def close(self):
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class RangeStream:
    """Bytes ``[start, end)`` of a blob through one request, handed out forward-only.

    ``read_at(offset, length)`` (any offset not before what was already handed
    out) blocks until the bytes have arrived.  Use as a context manager, or
    call ``close()``.  ``throttle(nbytes)``, if given, is called before each
    pull (background fetch pauses and paces there).
    """

    def __init__(self, metered, start, end, kind, throttle=None):
        if not 0 <= start <= end <= metered.size:
            raise SourceError(f"stream range {start}-{end} is outside the blob")
        self.metered = metered
        self.start = start
        self.end = end
        self.kind = kind
        self.throttle = throttle
        self.size = metered.size
        self.base = start               # blob offset of buf[0]
        self.buf = bytearray()
        self.received = 0
        self.requests = 0
        self._pulls = None              # iterator of blocks of the current request
        self._response = None
        self._slot = None
        self._started = time.monotonic()
        self._first_byte = None
        self._closed = False
        self.broken = None              # the error that ended the stream, if any

    # -- consumer side --

    def read_at(self, offset, length):
        if self.broken is not None:
            raise SourceError(f"stream of {self.start}-{self.end} failed: {self.broken}")
        if offset < self.base:
            raise SourceError(f"stream of {self.start}-{self.end} is already past {offset}")
        if offset + length > self.end:
            raise SourceError(f"{offset}+{length} lies outside the stream {self.start}-"
                              f"{self.end}")
        self._fill(offset + length)
        del self.buf[:offset - self.base]
        self.base = offset
        return bytes(self.buf[:length])

    def drain(self):
        """Read the rest of the range (so the request completes) and discard it."""
        while self.base + len(self.buf) < self.end:
            self._fill(min(self.end, self.base + len(self.buf) + STREAM_BLOCK))
            self.base += len(self.buf)
            self.buf.clear()

    @property
    def position(self):
        """Blob offset up to which bytes have arrived."""
        return self.base + len(self.buf)

    def _fill(self, upto):
        while self.base + len(self.buf) < upto:
            if self.throttle is not None:
                self.throttle(STREAM_BLOCK)
            try:
                block = self._pull()
            except StargzError as exc:
                self.broken = exc
                self._close_request()
                raise
            self.buf += block

    # -- transport --

    def _pull(self):
        attempts = 0
        while True:
            if self._pulls is None:
                self._open(self.base + len(self.buf))
            try:
                block = next(self._pulls, b"")
                failure = None
            except Exception as exc:        # noqa: BLE001 - requests/urllib3/socket errors
                block = None
                failure = exc
            if block:
                if self._first_byte is None:
                    self._first_byte = time.monotonic()
                self.received += len(block)
                self.metered.metrics.fetched(self.metered.layer_id, self.kind, len(block))
                return block
            pos = self.base + len(self.buf)
            self._close_request()
            if failure is None:
                failure = SourceError(f"the answer ended at {pos}, before {self.end}")
            attempts += 1
            self.metered.metrics.inc("fetch_errors_total", layer=self.metered.layer_id,
                                     kind=self.kind)
            if attempts > self.metered.retries or isinstance(failure, RangeNotSupported):
                raise SourceError(f"{self.metered.label}: stream of bytes {self.start}-"
                                  f"{self.end} broke at {pos}: {failure}")
            log.info("%s: stream broke at %d (%s); resuming", self.metered.label, pos, failure)

    def _open(self, pos):
        metered = self.metered
        if self._slot is None:
            self._slot = metered.limiter.slot(metered.host, background=self.kind == "background")
            self._slot.__enter__()
        inner = metered.inner
        if hasattr(inner, "open_range"):
            self._count_request(pos, self.end - pos)
            self._response = inner.open_range(
                pos, self.end, rcvbuf=BACKGROUND_RCVBUF if self.kind == "background" else None)
            client = inner.client

            def blocks(resp=self._response):
                for block in resp.iter_content(STREAM_BLOCK):
                    client.stats.add("bytes_received", len(block))
                    yield block
            self._pulls = blocks()
        else:
            def windows(pos=pos):
                while pos < self.end:
                    n = min(LOCAL_WINDOW, self.end - pos)
                    self._count_request(pos, n)
                    data = inner.read_at(pos, n)
                    pos += n
                    yield data
            self._pulls = windows()

    def _count_request(self, pos, length):
        self.requests += 1
        self.metered._logged(pos, length)
        self.metered.metrics.fetched(self.metered.layer_id, self.kind, 0, requests=1)

    def _close_request(self):
        self._pulls = None
        if self._response is not None:
            self._response.close()
            self._response = None

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._close_request()
        if self._slot is not None:
            self._slot.__exit__(None, None, None)
            self._slot = None
        elapsed = time.monotonic() - self._started
        metered = self.metered
        metered.metrics.observe("fetch_request_seconds", elapsed, kind=self.kind)
        if (metered.link is not None and self.kind in ("on_demand", "prefetch")
                and self._first_byte is not None):
            metered.link.observe(self.received, time.monotonic() - self._first_byte)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
