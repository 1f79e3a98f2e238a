"""Progress lines for long work, shown only when stderr is a terminal."""

import sys
import time


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """Callable ``(done, total)`` that redraws one status line at most 10 times a second."""

    def __init__(self, label, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._last = 0.0
        self._shown = False

    def __call__(self, done, total):
        now = time.monotonic()
        if not self.enabled or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        percent = f"{100 * done / total:3.0f}%" if total else "   "
        self.stream.write(f"\r{self.label}: {percent} {human_bytes(done)} of "
                          f"{human_bytes(total)}\033[K")
        self.stream.flush()
        self._shown = True

    def close(self):
        """Clear the status line."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False
