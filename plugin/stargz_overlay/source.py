"""Random-access byte sources that stargz layers are read from.

The format library only ever calls ``read_at(offset, length)`` and reads
``size``; a local file, a registry blob and bytes in memory all provide that.
"""

import os

from .errors import SourceError


class FileSource:
    """A blob in a local file, read with ``pread``."""

    def __init__(self, path):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open {path}: {exc.strerror}") from None
        self.size = os.fstat(self._fd).st_size

    def read_at(self, offset, length):
        """Return exactly ``length`` bytes at ``offset``, or raise SourceError."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SourceError(
                f"{self.path}: range {offset}+{length} is outside the blob ({self.size} bytes)")
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise SourceError(f"{self.path}: short read at {offset}")
        return data

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BytesSource:
    """A blob held in memory; ``reads`` lists every ``(offset, length)`` asked for."""

    def __init__(self, data):
        self.data = data
        self.size = len(data)
        self.reads = []

    def read_at(self, offset, length):
        """Return exactly ``length`` bytes at ``offset``, or raise SourceError."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SourceError(f"range {offset}+{length} is outside the blob "
                              f"({self.size} bytes)")
        self.reads.append((offset, length))
        return self.data[offset:offset + length]
