"""A forwarding HTTP proxy in front of a real docker-registry that injects faults.

Every knob is an attribute that tests change while requests flow; faults apply
to blob GETs (``/v2/<repo>/blobs/sha256:...``) unless said otherwise:

``latency``       seconds slept before forwarding any request
``fail_status``   answer blob GETs with this status (e.g. 500) ...
``fail_count``    ... this many times (None: until changed)
``retry_after``   Retry-After header sent with those answers
``hang``          accept blob GETs and never answer while true (the client must time out)
``redirect_to``   answer blob GETs with 307 to this base URL (e.g. a dead port)
``flip_byte``     blob offset whose byte is inverted in every single-range answer covering it
``rate``          blob body bytes per second (None: unthrottled)
``cut_after``     send only this many body bytes, then drop the connection

``log`` holds ``(method, path, range, status)`` of every request; ``blob_gets()``
the blob GETs that reached the registry.
"""

import socket
import threading
import time

from ..registryfixture import _BLOB_RE, Proxy, _ProxyHandler


class _FaultHandler(_ProxyHandler):
    """Blob GETs meet the armed fault first; bodies are paced by ``rate``."""

    block_size = 16384

    def _route(self, p, headers):
        is_blob = self.command == "GET" and _BLOB_RE.match(self.path.split("?")[0])
        if is_blob and self._fault(p):
            return None
        return self.path, headers, is_blob

    def _cut_after(self, p):
        return p.cut_after

    def _pace(self, p, n):
        if p.rate:
            time.sleep(n / p.rate)

    def _fault(self, p):
        """Answer with a fault if one is armed; True when answered."""
        with p.lock:
            if p.fail_status is not None and p.fail_count != 0:
                if p.fail_count is not None:
                    p.fail_count -= 1
                status, retry_after = p.fail_status, p.retry_after
                p.faults += 1
            else:
                status = None
        if status is not None:
            headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            self._simple(status, headers, b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}')
            return True
        if p.hang:
            with p.lock:
                p.faults += 1
            self._record("hung")
            while p.hang and not p._stopping.is_set():
                time.sleep(0.05)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        if p.redirect_to:
            with p.lock:
                p.faults += 1
            self._simple(307, {"Location": p.redirect_to.rstrip("/") + self.path})
            return True
        return False


class FaultProxy(Proxy):
    """registryfixture's ``Proxy`` (forwarding, log, ``flip_byte``) with the
    faults above; ``cut_after`` and ``rate`` act on every blob answer."""

    handler = _FaultHandler

    def __init__(self, upstream):
        self.fail_status = None
        self.fail_count = None
        self.retry_after = None
        self.hang = False
        self.redirect_to = None
        self.rate = None
        self.cut_after = None
        self._stopping = threading.Event()
        super().__init__(upstream)
        self.httpd.handle_error = lambda request, address: None   # cut/reset: expected

    def reset(self):
        """Back to a faithful proxy (the log is kept)."""
        self.latency = 0.0
        self.fail_status = self.fail_count = self.retry_after = None
        self.hang = False
        self.redirect_to = self.flip_byte = self.rate = self.cut_after = None

    def blob_gets(self, status=None):
        return [e for e in self.requests("GET", "blob") if status is None or e[3] == status]

    def stop(self):
        self._stopping.set()
        self.hang = False
        super().stop()
