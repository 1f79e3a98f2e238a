"""The plugin's access record (config key ``record_file``): what a workload touched.

One line per successful callback, appended in call order by the daemon::

    LAYER \\t OP \\t PATH \\t CONTENT

``LAYER`` is the layer's id (its blob digest, or ``file:PATH`` for a blob
without one); ``OP`` is ``open`` (a regular file's content was opened: read
or exec), ``opendir``, ``stat`` or ``readlink`` (a symlink was followed);
``PATH`` is the name as asked for and ``CONTENT`` the TOC entry that holds
what was served: for a hardlink its target, for a symlink followed inside the
layer the final file (each hop is also written as a ``readlink`` line).
fuse-overlayfs only opens and reads links on the layer that serves the name,
so the lines of ``open`` and ``readlink`` name the top-most layer providing it.
Tabs and newlines in names are escaped as ``\\t``, ``\\n`` and ``\\\\``.
"""

import os
import threading
from dataclasses import dataclass

OPS = ("open", "opendir", "stat", "readlink")


def _escape(text):
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _unescape(text):
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append({"t": "\t", "n": "\n"}.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


class AccessLog:
    """Appends access lines to one file (opened lazily, O_APPEND: the daemon's own)."""

    def __init__(self, path):
        self.path = path
        self._fd = -1
        self._lock = threading.Lock()

    def write(self, layer, op, path, content):
        line = "\t".join(_escape(x) for x in (layer, op, path, content)) + "\n"
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o600)
            os.write(self._fd, line.encode("utf-8", "surrogateescape"))

    def record(self, view, op, path):
        """Record ``op`` on ``path`` of ``view`` (a LayerView), resolving what serves it."""
        if not hasattr(view, "resolve"):
            return                    # the store's namespace, not a layer
        fetch = getattr(view, "fetch", None)
        layer = fetch.id if fetch is not None else view.label
        name, entry, hops = view.resolve(path, follow=op == "open")
        for link in hops:
            self.write(layer, "readlink", link, link)
        if op == "open" and entry is not None and entry.type == "dir":
            op = "opendir"
        self.write(layer, op, path, entry.name if entry is not None else name)


@dataclass
class Access:
    layer: str
    op: str
    path: str
    content: str


def read_accesses(path):
    """The Access records of a record file, in order (a missing file: none)."""
    out = []
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return out
    with f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 4 and parts[1] in OPS:
                out.append(Access(*(_unescape(p) for p in parts)))
    return out
