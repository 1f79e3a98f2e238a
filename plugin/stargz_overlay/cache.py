"""Content-addressed on-disk cache of verified file contents.

Files live at ``<root>/sha256/<2 hex>/<64 hex>``, keyed by the sha256 of
their content, so one copy serves every hardlink, layer and image that holds
the same bytes.  A file is written to ``<root>/tmp``, checked against its
digest and size, and only then renamed into place: a name in ``sha256/`` is
always complete and verified.  Directories are 0700, files 0400.

A file already in the cache is re-hashed the first time a process uses it
(a crash can leave a renamed file whose data never reached the disk, and
nothing else vouches for it), so publishing needs no fsync; ``fsync=True``
adds an fdatasync before the rename anyway.

Concurrent fetches of one digest happen once: threads of a process wait on a
per-digest lock, processes on a POSIX byte-range lock of ``<root>/lock`` at
an offset derived from the digest.
"""

import errno
import fcntl
import hashlib
import os
import tempfile
import threading
import time

from .errors import DigestMismatch, StargzError

EMPTY_SHA256 = "sha256:" + hashlib.sha256(b"").hexdigest()


class CacheError(StargzError):
    """The cache directory cannot be used."""


def _hex(digest):
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest[7:]


class ContentCache:
    """Verified file contents by digest under ``root``."""

    def __init__(self, root, fsync=False):
        self.root = os.path.abspath(root)
        self.fsync = fsync
        try:
            for sub in ("", "sha256", "tmp"):
                os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)
            self._lock_fd = os.open(os.path.join(self.root, "lock"),
                                    os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {self.root}: {exc.strerror}") from None
        self._guard = threading.Lock()
        self._locks = {}          # digest -> [threading.Lock, users]
        self.fetches = 0          # contents written by this process (statistics)
        self._verified = set()    # digests checked (or written) by this process
        self.clear_stale_tmp()

    def path(self, digest):
        hexd = _hex(digest)
        return os.path.join(self.root, "sha256", hexd[:2], hexd)

    def lookup(self, digest, size):
        """Path of the cached content, or None (missing, or damaged and removed)."""
        path = self.path(digest)
        if digest in self._verified:
            return path
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
            try:
                os.unlink(path)       # damaged (e.g. by a crash): fetch it again
            except OSError:
                pass
            return None
        self._verified.add(digest)
        return path

    def get(self, digest, size, produce):
        """Path of the content ``digest``; fetch it with ``produce()`` when missing.

        ``produce()`` returns an iterable of byte blocks that make up the whole
        content; it is called at most once per missing digest, however many
        threads or processes ask at the same time.  Raises DigestMismatch if
        the bytes are not ``size`` long or do not hash to ``digest``.
        """
        path = self.lookup(digest, size)
        if path is not None:
            return path
        with self._digest_lock(digest):
            path = self.lookup(digest, size)
            if path is not None:
                return path
            return self._store(produce(), size, digest)

    def put(self, blocks, size):
        """Store content whose digest is not known in advance; return (digest, path)."""
        return self._store(blocks, size, None, publish_as_computed=True)

    def empty(self):
        """Path of the empty file (no fetch needed)."""
        path = self.lookup(EMPTY_SHA256, 0)
        if path is None:
            path = self._store([], 0, EMPTY_SHA256)
        return path

    # -- internals --

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
        fd, tmp = tempfile.mkstemp(dir=tmpdir, prefix="fetch-")
        try:
            hasher = hashlib.sha256()
            written = 0
            with os.fdopen(fd, "wb", closefd=True) as f:
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
            os.chmod(tmp, 0o400)
            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
            os.rename(tmp, final)
            tmp = None
            self._verified.add(computed)
            self.fetches += 1
            return (computed, final) if publish_as_computed else final
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise CacheError(f"cannot write to cache {self.root}: {exc.strerror}") from None
            raise
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def clear_stale_tmp(self, age=3600):
        """Remove leftovers of interrupted fetches older than ``age`` seconds."""
        tmpdir = os.path.join(self.root, "tmp")
        limit = time.time() - age
        for name in os.listdir(tmpdir):
            path = os.path.join(tmpdir, name)
            try:
                if os.lstat(path).st_mtime < limit:
                    os.unlink(path)
            except OSError:
                pass
