"""Content-addressed on-disk cache of verified file contents, with pins and LRU eviction.

Layout under ``root`` (directories 0700, content files 0400)::

    sha256/<2 hex>/<64 hex>   verified contents, named by their sha256
    tmp/fetch-*               contents being written (flock'ed by their writer)
    pins/*.pin                digests a live layer needs (flock'ed by its process)
    lock                      byte-range locks: one fetch per digest across processes
    gc.lock                   flock: eviction (exclusive) vs publishing a pin (shared)

One copy serves every hardlink, layer and image holding the same bytes.  A
file is written to ``tmp/``, checked against its digest and size, and only
then renamed into place: a name in ``sha256/`` is always complete and
verified.  A crash (even ``kill -9``) leaves at most a temp file, which the
next collection removes once its writer is gone.  A file already in the
cache is re-hashed the first time a process uses it (a power loss can leave
a renamed file whose data never reached the disk), so publishing needs no
fsync; ``fsync=True`` adds an fdatasync before the rename anyway.

Concurrent fetches of one digest happen once: threads of a process wait on a
per-digest lock, processes on a POSIX byte-range lock of ``lock``.

Eviction (``collect``) removes least recently used content first (the access
time, which ``lookup`` bumps explicitly, at most every ``TOUCH_INTERVAL``
seconds per file and process).  It never removes:

- content pinned by a live layer: every mounted layer pins *all* the digests
  of its files, fetched or not, because a container may still open any of
  them and a layer that is 100% local must stay so through a registry
  outage; a pin dies with its process (its flock is then free);
- a file open in any process (``/proc/*/fd``), or one a fetch is publishing;
- anything used in the last ``GRACE`` seconds.

So the size limit is a target for unused content: content in use is kept
even when it alone exceeds the limit (``collect`` says so).
"""

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import tempfile
import threading
import time

from .errors import DigestMismatch, StargzError

log = logging.getLogger("stargz_overlay.cache")

EMPTY_SHA256 = "sha256:" + hashlib.sha256(b"").hexdigest()
TOUCH_INTERVAL = 600      # seconds between access-time bumps of one file by one process
GRACE = 60                # content used this recently is never evicted
CONFIGURED = object()     # collect(): use the cache's own size limit
FREE_MARGIN = 1 << 20     # bytes kept free beyond a file being stored


class CacheError(StargzError):
    """The cache directory cannot be used."""

    errno = errno.EIO


class CacheFull(CacheError):
    """The cache's filesystem has no room for a file, even after evicting unused content."""

    errno = errno.ENOSPC


def _hex(digest):
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest[7:]


class GcReport:
    """What one ``collect`` found and did."""

    def __init__(self):
        self.files = 0            # content files before eviction
        self.bytes = 0            # their disk usage
        self.pinned_files = 0
        self.pinned_bytes = 0
        self.open_files = 0
        self.live_pins = 0
        self.dead_pins = 0
        self.evicted_files = 0
        self.evicted_bytes = 0
        self.tmp_removed = 0
        self.tmp_busy = 0
        self.over_limit = False   # still above the limit (in-use content alone exceeds it)

    @property
    def remaining_bytes(self):
        return self.bytes - self.evicted_bytes

    def summary(self):
        text = (f"{self.files} files, {_human(self.bytes)}: evicted {self.evicted_files} "
                f"files ({_human(self.evicted_bytes)}), kept {_human(self.remaining_bytes)}; "
                f"{self.pinned_files} files ({_human(self.pinned_bytes)}) in use by "
                f"{self.live_pins} mounted layers, {self.open_files} open; removed "
                f"{self.tmp_removed} interrupted fetches")
        if self.over_limit:
            text += "; content in use alone is over the size limit"
        return text

    def as_dict(self):
        d = dict(vars(self))
        d["remaining_bytes"] = self.remaining_bytes
        return d


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Pin:
    """A live layer's claim on digests; released by ``release()`` or by its process dying."""

    def __init__(self, cache, fd, path):
        self.cache = cache
        self.fd = fd
        self.path = path
        self._lock = threading.Lock()

    def add(self, digest):
        """Pin one more digest (e.g. one computed after fetching a file without a TOC digest)."""
        with self._lock:
            if self.fd >= 0:
                os.write(self.fd, (digest + "\n").encode())

    def release(self):
        with self._lock:
            if self.fd < 0:
                return
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


class ContentCache:
    """Verified file contents by digest under ``root``."""

    def __init__(self, root, fsync=False, max_size=0, clean=True):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self.max_size = max_size      # bytes; 0 = no limit (a full disk still evicts)
        try:
            for sub in ("", "sha256", "tmp", "pins"):
                os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            # POSIX locks belong to the process and die when *any* fd of the file
            # is closed: this fd is the only one the process ever opens on "lock".
            self._lock_fd = os.open(os.path.join(self.root, "lock"),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {self.root}: {exc.strerror}") from None
        self._guard = threading.Lock()
        self._locks = {}          # digest -> [threading.Lock, users]
        self.fetches = 0          # contents written by this process (statistics)
        self.bytes_written = 0
        self.evicted_bytes = 0
        self.full_errors = 0
        self._verified = set()    # digests checked (or written) by this process
        self._touched = {}        # digest -> monotonic time of the last access-time bump
        self._gc_guard = threading.Lock()
        self.last_report = None
        self._used_base = None    # (content bytes at the last scan, bytes_written then)
        self._warned_over = False
        if clean:
            self.clear_stale_tmp()

    def path(self, digest):
        hexd = _hex(digest)
        return os.path.join(self.root, "sha256", hexd[:2], hexd)

    # -- reading --

    def lookup(self, digest, size):
        """Path of the cached content, or None (missing, or damaged and removed)."""
        path = self.path(digest)
        if digest in self._verified:
            if self._touch(digest, path):
                return path
            self._verified.discard(digest)       # evicted since (by a gc of another process)
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            hasher = hashlib.sha256()
            total = 0
            while True:
                block = os.read(fd, 1 << 20)
                if not block:
                    break
                total += len(block)
                hasher.update(block)
        finally:
            os.close(fd)
        if total != size or "sha256:" + hasher.hexdigest() != digest:
            self._damaged(path)
            return None
        self._verified.add(digest)
        self._touch(digest, path, force=True)
        return path

    def read(self, digest, limit):
        """The cached content ``digest`` as bytes, verified, or None (missing, over
        ``limit`` bytes, or damaged and removed).  For small contents whose size is
        not known in advance (a layer's TOC JSON, cached under its TOC digest)."""
        path = self.path(digest)
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > limit:
                    return None
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read cache file %s: %s", path, exc.strerror)
            return None
        if len(data) > limit:
            return None
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self._verified.discard(digest)
            self._damaged(path)
            return None
        self._verified.add(digest)
        self._touch(digest, path, force=True)
        return data

    @staticmethod
    def _damaged(path):
        log.warning("cache file %s is damaged (e.g. by a crash); fetching it again", path)
        try:
            os.unlink(path)
        except OSError:
            pass

    def _touch(self, digest, path, force=False):
        """Record a use for LRU eviction (the access time); False if the file is gone."""
        now = time.monotonic()
        last = self._touched.get(digest)
        if not force and last is not None and now - last < TOUCH_INTERVAL:
            return True
        try:
            st = os.stat(path)
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
        except FileNotFoundError:
            self._touched.pop(digest, None)
            return False
        except OSError:
            pass
        self._touched[digest] = now
        return True

    def get(self, digest, size, produce):
        """Path of the content ``digest``; fetch it with ``produce()`` when missing.

        ``produce()`` returns an iterable of byte blocks that make up the whole
        content; it is called at most once per missing digest, however many
        threads or processes ask at the same time.  Raises DigestMismatch if
        the bytes are not ``size`` long or do not hash to ``digest``, CacheFull
        if there is no room for them.
        """
        path = self.lookup(digest, size)
        if path is not None:
            return path
        with self._digest_lock(digest):
            path = self.lookup(digest, size)
            if path is not None:
                return path
            self._make_room(size)
            return self._store(produce(), size, digest)

    def put(self, blocks, size):
        """Store content whose digest is not known in advance; return (digest, path)."""
        self._make_room(size)
        return self._store(blocks, size, None, publish_as_computed=True)

    def empty(self):
        """Path of the empty file (no fetch needed)."""
        path = self.lookup(EMPTY_SHA256, 0)
        if path is None:
            path = self._store([], 0, EMPTY_SHA256)
        return path

    # -- pins --

    def pin(self, digests, label=""):
        """Pin ``digests`` for the life of this process (or until ``release()``)."""
        pins = os.path.join(self.root, "pins")
        fd, tmp = tempfile.mkstemp(dir=pins, prefix=".new-")
        try:
            os.set_inheritable(fd, False)
            fcntl.flock(fd, fcntl.LOCK_EX)
            text = "".join(d + "\n" for d in digests if d)
            os.write(fd, (f"# {label}\n" if label else "").encode() + text.encode())
            name = os.path.join(pins, f"{os.getpid()}-{secrets.token_hex(6)}.pin")
            with self._gc_lock(fcntl.LOCK_SH):
                os.rename(tmp, name)
        except OSError as exc:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise CacheError(f"cannot pin content in {self.root}: {exc.strerror}") from None
        return Pin(self, fd, name)

    # -- coordination between mounts --

    def claim(self, task, key, blocking=False):
        """An flock'ed fd saying "this process does ``task`` for ``key``" (close it to
        release; a dying process releases it too), or None if another process holds it
        and ``blocking`` is False.  Mounts of one layer use it so that only one of them
        prefetches or background-fetches it; the others find the files in this cache.
        """
        directory = os.path.join(self.root, task)
        name = hashlib.sha256(key.encode()).hexdigest()
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            log.warning("cannot coordinate %s with other mounts in %s: %s", task, directory,
                        exc.strerror)
            return os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)   # go on, uncoordinated
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    # -- eviction --

    def usage(self):
        """(files, bytes on disk) of the content in the cache."""
        files = total = 0
        for _, _, size, _ in self._scan():
            files += 1
            total += size
        return files, total

    def collect(self, max_size=CONFIGURED, need_free=0, dry_run=False, wait=True):
        """Evict unused content, least recently used first; return a GcReport.

        Evicts until the content takes at most ``max_size`` bytes (0 = evict
        everything unused; None = no size target; default: the cache's limit,
        where 0 means none) and, with ``need_free``, until the filesystem has
        that many bytes available.  Returns None if another collection is
        running and ``wait`` is False.
        """
        if max_size is CONFIGURED:
            max_size = self.max_size or None
        report = GcReport()
        if not self._gc_guard.acquire(blocking=wait):
            return None
        try:
            try:
                held = self._gc_lock(fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.__enter__()
            except BlockingIOError:
                return None
            try:
                self._collect(report, max_size, need_free, dry_run)
            finally:
                held.__exit__(None, None, None)
        finally:
            self._gc_guard.release()
        self.last_report = report
        if not dry_run:
            self._used_base = (report.remaining_bytes, self.bytes_written)
        return report

    def _collect(self, report, max_size, need_free, dry_run):
        self._clear_tmp(report, dry_run)
        pinned = self._live_pins(report, dry_run)
        open_paths = _open_files(os.path.join(self.root, "sha256"))
        entries = list(self._scan())
        report.files = len(entries)
        report.bytes = sum(e[2] for e in entries)
        now = time.time()
        candidates = []
        for digest, path, size, atime in entries:
            if digest in pinned:
                report.pinned_files += 1
                report.pinned_bytes += size
            elif path in open_paths:
                report.open_files += 1
            elif now - atime >= GRACE:
                candidates.append((atime, digest, path, size))
        candidates.sort()
        total = report.bytes

        def satisfied():
            if max_size is not None and total > max_size:
                return False
            return not need_free or _available(self.root) >= need_free

        for atime, digest, path, size in candidates:
            if satisfied():
                break
            if dry_run:
                total -= size
                report.evicted_files += 1
                report.evicted_bytes += size
                continue
            if self._evict(digest, path):
                total -= size
                report.evicted_files += 1
                report.evicted_bytes += size
        report.over_limit = max_size is not None and total > max_size
        if not dry_run:
            self.evicted_bytes += report.evicted_bytes

    def _evict(self, digest, path):
        """Unlink one content file unless a thread or process is fetching it right now."""
        with self._guard:
            if digest in self._locks:
                return False
        offset = int(_hex(digest)[:15], 16)
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError:
            return False
        try:
            os.unlink(path)
            self._verified.discard(digest)
            self._touched.pop(digest, None)
            return True
        except OSError:
            return False
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, offset)

    def _scan(self):
        """(digest, path, disk bytes, access time) of every content file."""
        top = os.path.join(self.root, "sha256")
        try:
            subdirs = list(os.scandir(top))
        except FileNotFoundError:
            return
        for sub in subdirs:
            if not sub.is_dir(follow_symlinks=False):
                continue
            try:
                files = list(os.scandir(sub.path))
            except OSError:
                continue
            for f in files:
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue
                if len(f.name) != 64:
                    continue
                size = max(st.st_size, st.st_blocks * 512) if st.st_size else 0
                yield "sha256:" + f.name, f.path, size, st.st_atime

    def _live_pins(self, report, dry_run):
        pinned = set()
        pins = os.path.join(self.root, "pins")
        for name in os.listdir(pins):
            path = os.path.join(pins, name)
            if not name.endswith(".pin"):
                continue          # ".new-*": being published (we hold the gc lock) or dead
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    report.live_pins += 1
                    with os.fdopen(os.dup(fd), "r", encoding="ascii", errors="replace") as f:
                        pinned.update(line.strip() for line in f
                                      if line.startswith("sha256:"))
                    continue
                report.dead_pins += 1
                if not dry_run:
                    os.unlink(path)
            finally:
                os.close(fd)
        for name in os.listdir(pins):       # leftovers of a crash while publishing a pin
            if name.startswith(".new-") and not dry_run:
                self._remove_if_unlocked(os.path.join(pins, name))
        return pinned

    def _clear_tmp(self, report, dry_run):
        tmpdir = os.path.join(self.root, "tmp")
        for name in os.listdir(tmpdir):
            path = os.path.join(tmpdir, name)
            if dry_run:
                continue
            removed = self._remove_if_unlocked(path)
            if removed:
                report.tmp_removed += 1
            else:
                report.tmp_busy += 1

    @staticmethod
    def _remove_if_unlocked(path):
        """Unlink ``path`` if no process holds a flock on it (its writer is gone)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            os.unlink(path)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def clear_stale_tmp(self):
        """Remove temp files of interrupted fetches (their writers hold no lock any more)."""
        report = GcReport()
        self._clear_tmp(report, False)
        return report.tmp_removed

    def _gc_lock(self, mode):
        root = self.root

        class _Held:
            def __enter__(self):
                self.fd = os.open(os.path.join(root, "gc.lock"),
                                  os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(self.fd, mode)
                except OSError:
                    os.close(self.fd)
                    raise
                return self

            def __exit__(self, *exc):
                os.close(self.fd)       # drops the flock

        return _Held()

    def _make_room(self, size):
        """Before storing ``size`` bytes: evict for the size limit and for disk space."""
        if self.max_size:
            if self._used_base is None:
                self._used_base = (self.usage()[1], self.bytes_written)
            base, at = self._used_base
            if base + self.bytes_written - at + size > self.max_size:
                report = self.collect(max(self.max_size - size, 0), wait=False)
                if report is not None and report.over_limit and not self._warned_over:
                    self._warned_over = True
                    log.warning("cache %s: content in use (%s) exceeds the %s limit; "
                                "keeping it", self.root, _human(report.remaining_bytes),
                                _human(self.max_size))
        need = size + FREE_MARGIN
        if _available(self.root) < need:
            self.collect(None, need_free=need)
            if _available(self.root) < need:
                self.full_errors += 1
                raise CacheFull(f"cache {self.root} is full: no room for {_human(size)} "
                                f"(only {_human(_available(self.root))} free and nothing "
                                f"unused left to evict); free disk space or move cache_dir")

    def maybe_collect(self):
        """Periodic check (daemon): collect when over the size limit; the report or None."""
        if not self.max_size:
            return None
        used = self.usage()[1]
        self._used_base = (used, self.bytes_written)
        if used <= self.max_size:
            return None
        return self.collect(wait=False)

    # -- writing --

    def _digest_lock(self, digest):
        cache = self

        class _Held:
            def __enter__(self):
                with cache._guard:
                    slot = cache._locks.setdefault(digest, [threading.Lock(), 0])
                    slot[1] += 1
                slot[0].acquire()
                self.slot = slot
                self.offset = int(_hex(digest)[:15], 16)
                try:
                    fcntl.lockf(cache._lock_fd, fcntl.LOCK_EX, 1, self.offset)
                except OSError:
                    self._release_thread_lock()
                    raise
                return self

            def _release_thread_lock(self):
                self.slot[0].release()
                with cache._guard:
                    self.slot[1] -= 1
                    if self.slot[1] == 0:
                        cache._locks.pop(digest, None)

            def __exit__(self, *exc):
                try:
                    fcntl.lockf(cache._lock_fd, fcntl.LOCK_UN, 1, self.offset)
                finally:
                    self._release_thread_lock()

        return _Held()

    def _store(self, blocks, size, digest, publish_as_computed=False):
        tmpdir = os.path.join(self.root, "tmp")
        try:
            fd, tmp = tempfile.mkstemp(dir=tmpdir, prefix="fetch-")
        except OSError as exc:
            raise self._write_error(exc) from None
        try:
            os.set_inheritable(fd, False)
            fcntl.flock(fd, fcntl.LOCK_EX)     # "being written": gc leaves it alone
            hasher = hashlib.sha256()
            written = 0
            with os.fdopen(os.dup(fd), "wb", closefd=True) as f:
                for block in blocks:
                    written += len(block)
                    if written > size:
                        raise DigestMismatch(f"content is longer than its {size} bytes")
                    hasher.update(block)
                    f.write(block)
                f.flush()
                if self.fsync:
                    os.fdatasync(f.fileno())
            computed = "sha256:" + hasher.hexdigest()
            if written != size:
                raise DigestMismatch(f"content is {written} bytes, expected {size}")
            if digest is not None and computed != digest:
                raise DigestMismatch(f"content hashes to {computed}, expected {digest}")
            final = self.path(computed if publish_as_computed else digest)
            os.fchmod(fd, 0o400)
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
            os.rename(tmp, final)
            tmp = None
            self._verified.add(computed)
            self._touched[computed] = time.monotonic()
            self.fetches += 1
            self.bytes_written += size
            return (computed, final) if publish_as_computed else final
        except OSError as exc:
            raise self._write_error(exc) from None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            os.close(fd)

    def _write_error(self, exc):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.full_errors += 1
            return CacheFull(f"cache {self.root} is full ({exc.strerror}); free disk space, "
                             f"lower [directory_cache] max_size or move cache_dir")
        return CacheError(f"cannot write to cache {self.root}: {exc.strerror}")


def _available(path):
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _open_files(prefix):
    """Paths under ``prefix`` that some process holds open (as far as /proc shows)."""
    found = set()
    prefix = prefix.rstrip("/") + "/"
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                found.add(target.removesuffix(" (deleted)"))
    return found
