"""A forwarding HTTP proxy in front of a real docker-registry that injects faults.

Every knob is an attribute that tests change while requests flow; faults apply
to blob GETs (``/v2/<repo>/blobs/sha256:...``) unless said otherwise:

``latency``       seconds slept before forwarding any request
``fail_status``   answer blob GETs with this status (e.g. 500) ...
``fail_count``    ... this many times (None: until changed)
``retry_after``   Retry-After header sent with those answers
``hang``          accept blob GETs and never answer while true (the client must time out)
``redirect_to``   answer blob GETs with 307 to this base URL (e.g. a dead port)
``flip_byte``     blob offset whose byte is inverted in every answer covering it
``rate``          blob body bytes per second (None: unthrottled)
``cut_after``     send only this many body bytes, then drop the connection

``log`` holds ``(method, path, range, status)`` of every request; ``blob_gets()``
the blob GETs that reached the registry.
"""

import http.client
import http.server
import re
import socket
import threading
import time

BLOB_RE = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FaultProxy:
    def __init__(self, upstream):
        self.upstream = upstream
        self.latency = 0.0
        self.fail_status = None
        self.fail_count = None
        self.retry_after = None
        self.hang = False
        self.redirect_to = None
        self.flip_byte = None
        self.rate = None
        self.cut_after = None
        self.log = []
        self.faults = 0           # faulty answers given (statistics)
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.httpd.handle_error = lambda request, address: None   # cut/reset: expected
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def reset(self):
        """Back to a faithful proxy (the log is kept)."""
        self.latency = 0.0
        self.fail_status = self.fail_count = self.retry_after = None
        self.hang = False
        self.redirect_to = self.flip_byte = self.rate = self.cut_after = None

    def blob_gets(self, status=None):
        with self.lock:
            return [e for e in self.log if e[0] == "GET" and BLOB_RE.match(e[1].split("?")[0])
                    and (status is None or e[3] == status)]

    def clear(self):
        with self.lock:
            self.log.clear()

    def stop(self):
        self._stopping.set()
        self.hang = False
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _record(self, status):
        p = self.server.owner
        with p.lock:
            p.log.append((self.command, self.path, self.headers.get("Range"), status))

    def _answer(self, status, headers=(), body=b""):
        self._record(status)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

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
            headers = [("Retry-After", str(retry_after))] if retry_after is not None else []
            self._answer(status, headers, b'{"errors":[{"code":"UNKNOWN","message":"injected"}]}')
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
            self._answer(307, [("Location", p.redirect_to.rstrip("/") + self.path)])
            return True
        return False

    def _handle(self):
        p = self.server.owner
        if p.latency:
            time.sleep(p.latency)
        is_blob = self.command == "GET" and BLOB_RE.match(self.path.split("?")[0])
        if is_blob and self._fault(p):
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "keep-alive")}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(p.upstream, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
        except OSError:
            conn.close()
            return self._answer(502)
        try:
            self._relay(p, resp, is_blob)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            conn.close()

    def _relay(self, p, resp, is_blob):
        self._record(resp.status)
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() in ("connection", "keep-alive", "transfer-encoding"):
                continue
            if k.lower() == "location" and v.startswith(f"http://{p.upstream}"):
                v = v.replace(f"http://{p.upstream}", f"http://{p.host}", 1)
            self.send_header(k, v)
        chunked = (resp.getheader("Content-Length") is None and self.command != "HEAD"
                   and resp.status not in (204, 304))
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        faulty = is_blob and resp.status in (200, 206)
        m = RANGE_RE.match(resp.getheader("Content-Range") or "")
        pos = int(m.group(1)) if m else 0
        sent = 0
        cut = p.cut_after if faulty else None
        flipped = False
        while True:
            block = resp.read(16384)
            if not block:
                break
            if faulty and p.flip_byte is not None and pos <= p.flip_byte < pos + len(block):
                i = p.flip_byte - pos
                block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1:]
                flipped = True
            if cut is not None and sent + len(block) > cut:
                self.wfile.write(block[:cut - sent])
                self.wfile.flush()
                with p.lock:
                    p.faults += 1
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if faulty and p.rate:
                time.sleep(len(block) / p.rate)
            pos += len(block)
            sent += len(block)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        if flipped:
            with p.lock:
                p.faults += 1

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle
