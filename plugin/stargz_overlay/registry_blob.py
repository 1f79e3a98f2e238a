"""A registry blob as a random-access source: ``size``, ``read_at``, ``read_ranges``.

Reads use HTTP Range requests.  Several ranges go out as one multi-range
request (``multipart/byteranges``) while the host answers them; a host that
refuses (400/416/501) or answers 200 is remembered and served single ranges.
A whole blob is never downloaded when a range was asked: a 200 answer is
aborted unread.  Redirects to blob storage are followed and the target URL
is cached until it expires.  Nearby ranges are merged into one.
``open_range`` hands out one range as a streamed response instead, for
readers that consume a long range as it arrives.
"""

import copy
import logging
import re
import socket
import threading
import time
from datetime import datetime, timezone
from urllib.parse import parse_qs, urljoin, urlsplit

from .auth import scope_for
from .errors import NotFoundError, RangeNotSupported, RegistryError, SourceError
from .registry import Deadline, _Retry

log = logging.getLogger(__name__)

_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)\Z")
_REDIRECTS = (301, 302, 303, 307, 308)
_MULTI_REFUSED = (400, 416, 501)
REDIRECT_MAX_TTL = 15 * 60
REDIRECT_MARGIN = 30


def coalesce(ranges, gap):
    """Sorted ``[(start, end)]`` (end exclusive) covering ``ranges``; gaps <= gap merged."""
    spans = sorted((off, off + n) for off, n in ranges if n > 0)
    out = []
    for start, end in spans:
        if out and start <= out[-1][1] + gap:
            if end > out[-1][1]:
                out[-1][1] = end
        else:
            out.append([start, end])
    return [tuple(s) for s in out]


def _redirect_ttl(url, default):
    """How long a pre-signed storage URL stays usable (seconds), from its query."""
    q = {k.lower(): v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    now = time.time()
    ttl = None
    try:
        if "x-amz-expires" in q:
            ttl = int(q["x-amz-expires"])
            if "x-amz-date" in q:
                signed = datetime.strptime(q["x-amz-date"], "%Y%m%dT%H%M%SZ")
                ttl = signed.replace(tzinfo=timezone.utc).timestamp() + ttl - now
        elif "expires" in q:
            ttl = int(q["expires"]) - now
        elif "se" in q:                     # Azure SAS
            end = datetime.fromisoformat(q["se"].replace("Z", "+00:00"))
            ttl = end.timestamp() - now
    except (ValueError, OverflowError):
        ttl = None
    if ttl is None:
        return default
    return max(0.0, min(ttl - REDIRECT_MARGIN, REDIRECT_MAX_TTL))


def parse_multipart(body, content_type):
    """``multipart/byteranges`` body -> ``[(start, bytes)]``."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise _Retry("multipart answer without a boundary")
    delim = b"--" + m.group(1).encode()
    parts = []
    pos = body.find(delim)
    while pos >= 0:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            return parts
        head_end = body.find(b"\r\n\r\n", pos)
        if head_end < 0:
            break
        headers = {}
        for line in body[pos:head_end].split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip().decode("latin-1")
        cr = _CONTENT_RANGE_RE.match(headers.get(b"content-range", ""))
        if not cr:
            raise _Retry("multipart part without a valid Content-Range")
        start, last = int(cr.group(1)), int(cr.group(2))
        data_start = head_end + 4
        data = body[data_start:data_start + last - start + 1]
        if len(data) != last - start + 1:
            raise _Retry("multipart part shorter than its Content-Range")
        parts.append((start, data))
        pos = body.find(delim, data_start + len(data))
    raise _Retry("truncated multipart answer")


_twins = {}
_twins_lock = threading.Lock()


def _small_buffer_twin(ep, rcvbuf):
    """A twin of Endpoint ``ep`` (same auth, same host state) whose connections have a
    ``rcvbuf``-byte receive buffer instead of an autotuned one of megabytes."""
    with _twins_lock:
        twin = _twins.get((id(ep), rcvbuf))
        if twin is not None and twin[0] is ep:
            return twin[1]
        import requests
        from urllib3.connection import HTTPConnection
        options = HTTPConnection.default_socket_options + [
            (socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)]
        quiet = copy.copy(ep)
        session = requests.Session()
        session.headers.update(ep.session.headers)
        session.verify = ep.session.verify
        session.trust_env = ep.session.trust_env
        for prefix, adapter in ep.session.adapters.items():
            twin_adapter = copy.copy(adapter)
            twin_adapter.init_poolmanager(adapter._pool_connections, adapter._pool_maxsize,
                                          block=adapter._pool_block, socket_options=options)
            session.mount(prefix, twin_adapter)
        quiet.session = session
        _twins[(id(ep), rcvbuf)] = (ep, quiet)
        return quiet


class RegistryBlob:
    """One blob of a repository, tried at its pull sources in order."""

    def __init__(self, client, sources, digest, size=None):
        self.client = client
        self.sources = list(sources)
        self.digest = digest
        self._current = 0
        self._lock = threading.Lock()
        self._redirect = None          # (url, expires_monotonic)
        self._size = size

    def __repr__(self):
        return f"RegistryBlob({self.reference}, {self.digest})"

    @property
    def reference(self):
        return self.sources[self._current].reference

    @property
    def size(self):
        if self._size is None:
            self._size = self._with_fallback(self._head)
        return self._size

    def close(self):
        pass

    # -- public reads ----------------------------------------------------
    def read_at(self, offset, length):
        """Exactly ``length`` bytes at ``offset`` or SourceError/RegistryError."""
        return self.read_ranges([(offset, length)])[0]

    def open_range(self, start, end, rcvbuf=None):
        """A streamed answer (``iter_content``, ``close``) for bytes ``[start, end)``: one
        GET, 206 (200 when the range is the whole blob).  ``rcvbuf`` (bytes): a small
        receive buffer for the connection, so that a reader that stops reading stops
        the sender within about that many bytes (background streams).
        RangeNotSupported when the registry ignores Range requests."""
        if not 0 <= start < end <= self.size:
            raise SourceError(f"{self}: range {start}-{end} is outside the blob "
                              f"({self.size} bytes)")
        return self._with_fallback(lambda src: self._open_stream(src, start, end, rcvbuf))

    def read_ranges(self, ranges):
        """The bytes of each ``(offset, length)``, in the order given."""
        ranges = [(int(o), int(n)) for o, n in ranges]
        size = self.size
        for off, n in ranges:
            if off < 0 or n < 0 or off + n > size:
                raise SourceError(f"{self}: range {off}+{n} is outside the blob "
                                  f"({size} bytes)")
        spans = coalesce(ranges, self.client.coalesce_gap)
        if not spans:
            return [b"" for _ in ranges]
        got = self._with_fallback(lambda src: self._fetch_spans(src, spans))
        out = []
        for off, n in ranges:
            if n == 0:
                out.append(b"")
                continue
            for start, data in got:
                if start <= off and off + n <= start + len(data):
                    out.append(data[off - start:off - start + n])
                    break
            else:      # cannot happen: every range lies inside a fetched span
                raise SourceError(f"{self}: range {off}+{n} was not delivered")
        return out

    # -- sources and fallback --------------------------------------------
    def _with_fallback(self, fn):
        errors = []
        start = self._current
        for i in list(range(start, len(self.sources))) + list(range(0, start)):
            src = self.sources[i]
            try:
                result = fn(src)
            except RangeNotSupported:
                raise
            except RegistryError as exc:
                errors.append(exc)
                if len(self.sources) > 1:
                    log.warning("%s: %s", src.reference, exc)
                continue
            if i != self._current:
                with self._lock:
                    self._current = i
                    self._redirect = None
            return result
        if len(errors) == 1:
            raise errors[0]
        raise RegistryError(f"blob {self.digest}: every source failed: "
                            + "; ".join(str(e) for e in errors))

    def _endpoint(self, src):
        return self.client.endpoint(src.reference.registry, src.insecure)

    def _path(self, src):
        return f"/v2/{src.reference.repository}/blobs/{self.digest}"

    def _head(self, src):
        ep = self._endpoint(src)
        resp = self.client.call(ep, "HEAD", self._path(src), what=f"size of blob {self.digest}",
                                deadline=Deadline(self.client.deadline),
                                scopes=[scope_for(src.reference.repository)])
        resp.close()
        if resp.status_code != 200:
            raise self.client._status_error(resp, f"blob {self.digest}", ep)
        try:
            return int(resp.headers["Content-Length"])
        except (KeyError, ValueError):
            raise RegistryError(f"{ep.host}: blob {self.digest}: no Content-Length "
                                f"in the HEAD answer") from None

    # -- fetching --------------------------------------------------------
    def _fetch_spans(self, src, spans):
        """``[(start, bytes)]`` for every ``(start, end)`` span."""
        deadline = Deadline(self.client.deadline)
        if len(spans) == 1:
            return [self._get(src, spans, deadline)[0]]
        out = []
        pending = list(spans)
        step = max(1, self.client.max_ranges_per_request)
        while pending:
            batch, pending = pending[:step], pending[step:]
            pieces = self._get(src, batch, deadline) if self._multi_allowed(src) else None
            if pieces is None:        # refused just now, or known to be refused
                pieces = [self._get(src, [span], deadline)[0] for span in batch]
            out.extend(pieces)
            missing = [s for s in batch
                       if not any(p <= s[0] and s[1] <= p + len(d) for p, d in pieces)]
            for span in missing:
                out.extend(self._get(src, [span], deadline))
        return out

    def _multi_allowed(self, src):
        url = self._cached_redirect()
        netloc = urlsplit(url).netloc if url else self._endpoint(src).host
        return self.client._range_quirks.get(netloc) != "no-multi"

    def _cached_redirect(self):
        with self._lock:
            if self._redirect and self._redirect[1] > time.monotonic():
                return self._redirect[0]
            self._redirect = None
            return None

    def _get(self, src, spans, deadline):
        """One GET for ``spans``; None when a multi-range request was refused."""
        ep = self._endpoint(src)
        header = "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in spans)
        multi = len(spans) > 1
        stats = self.client.stats
        fresh = None                    # a redirect target received just now
        for _ in range(3):
            url = fresh or self._cached_redirect()
            if url is not None and fresh is None:
                stats.add("redirect_cache_hits")
            fresh = None
            if url is not None:
                target, auth, where = self.client.storage_endpoint(url), False, url
            else:
                target, auth, where = ep, True, self._path(src)
            redirected = {}

            def handle(resp, target=target):
                if resp.status_code in _REDIRECTS and resp.headers.get("Location"):
                    redirected["url"] = urljoin(resp.url, resp.headers["Location"])
                    return None
                return self._handle_range(resp, target, spans, deadline)

            stats.add("multi_range_requests" if multi else "range_requests")
            try:
                result = self.client.call(
                    target, "GET", where, what=f"blob {self.digest} bytes {header[6:]}"[:160],
                    deadline=deadline, scopes=[scope_for(src.reference.repository)],
                    headers={"Range": header}, auth=auth, allow_redirects=False,
                    handler=handle)
            except (NotFoundError, RegistryError) as exc:
                if url is not None and not isinstance(exc, RangeNotSupported):
                    log.info("%s: cached redirect failed (%s); asking the registry again",
                             self.digest, exc)
                    with self._lock:
                        self._redirect = None
                    continue
                raise
            if "url" in redirected:
                stats.add("redirects")
                fresh = redirected["url"]
                ttl = _redirect_ttl(fresh, self.client.redirect_ttl)
                with self._lock:
                    self._redirect = (fresh, time.monotonic() + ttl) if ttl > 0 else None
                continue
            return result
        raise RegistryError(f"{ep.host}: blob {self.digest}: too many redirects")

    def _open_stream(self, src, start, end, rcvbuf):
        client = self.client
        header = f"bytes={start}-{end - 1}"
        what = f"blob {self.digest} bytes {start}-{end - 1}"
        ep = self._endpoint(src)
        if rcvbuf:
            ep = _small_buffer_twin(ep, rcvbuf)
        deadline = Deadline(client.deadline)
        url = self._cached_redirect()
        for _ in range(3):
            if url is not None:
                target, auth, where = client.storage_endpoint(url), False, url
            else:
                target, auth, where = ep, True, self._path(src)
            client.stats.add("range_requests")
            resp = client.call(target, "GET", where, what=what, deadline=deadline,
                               scopes=[scope_for(src.reference.repository)],
                               headers={"Range": header}, auth=auth, allow_redirects=False)
            status = resp.status_code
            if status in _REDIRECTS and resp.headers.get("Location"):
                url = urljoin(resp.url, resp.headers["Location"])
                client.stats.add("redirects")
                resp.close()
                continue
            if status == 206:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {start}-{end - 1}/"):
                    resp.close()
                    raise RegistryError(f"{target.host}: {what}: answered {content_range!r}")
                return resp
            if status == 200 and start == 0 and end == self.size:
                return resp
            if status == 200:
                resp.close()
                client.stats.add("full_body_aborts")
                raise RangeNotSupported(f"{target.host}: {what}: the registry ignores Range "
                                        f"requests (it answered with the whole blob)")
            error = client._status_error(resp, f"blob {self.digest}", target)
            resp.close()
            raise error
        raise RegistryError(f"{what}: too many redirects")

    def _handle_range(self, resp, target, spans, deadline):
        status = resp.status_code
        netloc = urlsplit(resp.url).netloc
        multi = len(spans) > 1
        want = sum(e - s for s, e in spans)
        what = f"{target.host}: blob {self.digest}"
        if status == 206:
            ctype = resp.headers.get("Content-Type", "")
            if ctype.lower().startswith("multipart/byteranges"):
                body = self.client.read_body(resp, want + 1024 + 256 * len(spans), deadline,
                                             what)
                pieces = parse_multipart(body, ctype)
            else:
                cr = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                if not cr:
                    raise RegistryError(f"{what}: 206 answer without a valid Content-Range")
                start, last = int(cr.group(1)), int(cr.group(2))
                if cr.group(3) != "*" and int(cr.group(3)) != self.size:
                    raise RegistryError(f"{what}: the registry says the blob has "
                                        f"{cr.group(3)} bytes, the manifest says {self.size}")
                body = self.client.read_body(resp, last - start + 1, deadline, what)
                pieces = [(start, body)]
            if multi and self.client._range_quirks.get(netloc) is None:
                self.client._range_quirks[netloc] = "multi"
            if not multi:
                s, e = spans[0]
                if not any(p <= s and e <= p + len(d) for p, d in pieces):
                    raise RegistryError(f"{what}: asked for bytes {s}-{e - 1}, got "
                                        f"{resp.headers.get('Content-Range')}")
            return pieces
        if status == 200:
            whole = len(spans) == 1 and spans[0] == (0, self.size)
            if whole:
                return [(0, self.client.read_body(resp, self.size, deadline, what))]
            self.client.stats.add("full_body_aborts")
            if multi:
                log.warning("%s answered a multi-range request with the whole blob; "
                            "using single ranges for this host from now on", netloc)
                self.client._range_quirks[netloc] = "no-multi"
                return None
            log.warning("%s ignores Range requests (answered 200 with the whole blob)", netloc)
            raise RangeNotSupported(
                f"{what}: the registry ignores Range requests (it answered with the whole "
                f"blob); lazy reads are impossible from {netloc}")
        if multi and status in _MULTI_REFUSED:
            log.warning("%s refused a multi-range request (HTTP %d); using single ranges "
                        "for this host from now on", netloc, status)
            self.client._range_quirks[netloc] = "no-multi"
            return None
        if status == 416:
            raise RegistryError(f"{what}: range not satisfiable (blob shorter than the "
                                f"{self.size} bytes expected?)")
        raise self.client._status_error(resp, f"blob {self.digest}", target)

    def __str__(self):
        return f"{self.reference.registry}/{self.reference.repository}@{self.digest}"
