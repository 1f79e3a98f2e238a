"""OCI/Docker registry client: resolve images, read blobs by range, push.

One pooled ``requests.Session`` per host (thread-safe for our use: each
request takes its own pooled connection), TLS verified with the system CAs
plus ``certs.d/HOST:PORT/*.crt`` and client ``*.cert``/``*.key`` pairs,
connect/read timeouts, retries with exponential backoff on connection errors,
5xx and 429, and an overall deadline per operation so that a dead or hung
registry becomes a RegistryError in bounded time, never a hang.

A registry configured insecure is tried with TLS first and with plain HTTP
when the TLS handshake fails, as containers/image does.  With ``scheme_hints``
(a file shared by the processes of one installation) a host that answered
only plain HTTP is remembered, so that later processes skip the failed
handshake; see ``SchemeHints``.
"""

import glob
import hashlib
import json
import logging
import os
import platform as _platform
import random
import re
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .digests import hasher_digest, sha256_digest
from . import __version__
from .auth import AuthFiles, HostAuth, scope_for
from .errors import (AuthError, ConfigError, DigestMismatch, FormatError, InvalidReference,
                     NotFoundError, RegistryError, StargzError)
from .reference import Reference, api_host, check_digest, parse_reference
from .registries_conf import PullSource, RegistriesConf

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
GZIP_LAYER_TYPES = ("application/vnd.oci.image.layer.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")
ENV_CERTS_DIR = "STARGZ_OVERLAY_CERTS_DIR"
MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 16 << 20
RETRY_STATUSES = (429, 500, 502, 503, 504)
READ_BLOCK = 1 << 16


# -- platforms ------------------------------------------------------------

_ARCH = {"x86_64": ("amd64", ""), "amd64": ("amd64", ""), "i386": ("386", ""),
         "i686": ("386", ""), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
         "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
         "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
         "mips64": ("mips64", ""), "loongarch64": ("loong64", "")}


def host_platform():
    """This machine as ``(os, architecture, variant)``."""
    arch, variant = _ARCH.get(_platform.machine().lower(), (_platform.machine().lower(), ""))
    return (_platform.system().lower() or "linux", arch, variant)


def parse_platform(text):
    """``os/arch[/variant]`` -> tuple; None -> this machine."""
    if text is None:
        return host_platform()
    if isinstance(text, tuple):
        return (text + ("", "", ""))[:3]
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidReference(f"invalid platform {text!r}: want OS/ARCH[/VARIANT]")
    return (parts[0], parts[1], parts[2] if len(parts) == 3 else "")


def format_platform(p):
    return "/".join(x for x in p if x)


def _variant_equal(arch, a, b):
    if arch == "arm64":
        a, b = a or "v8", b or "v8"
    return a == b


def select_platform(index, want):
    """The index entry for platform ``want`` (os, arch, variant) or NotFoundError."""
    os_, arch, variant = want
    matches = []
    offered = []
    for desc in index.get("manifests") or []:
        p = desc.get("platform") or {}
        offered.append(format_platform((p.get("os", "?"), p.get("architecture", "?"),
                                        p.get("variant", ""))))
        if p.get("os") != os_ or p.get("architecture") != arch:
            continue
        if desc.get("mediaType") not in MANIFEST_TYPES + INDEX_TYPES + (None,):
            continue
        matches.append(desc)
    exact = [d for d in matches
             if _variant_equal(arch, d["platform"].get("variant", ""), variant)]
    if exact:
        return exact[0]
    if matches and not variant:
        return matches[0]
    raise NotFoundError(f"no manifest for platform {format_platform(want)} in the index "
                        f"(it has {', '.join(offered) or 'no platforms'})")


# -- data -----------------------------------------------------------------

@dataclass
class Layer:
    digest: str
    size: int
    media_type: str
    annotations: dict = field(default_factory=dict)

    @property
    def toc_digest(self):
        return self.annotations.get(TOC_DIGEST_ANNOTATION)

    @property
    def uncompressed_size(self):
        value = self.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None


@dataclass
class Image:
    reference: str            # fully qualified, as asked (not the mirror)
    manifest_digest: str
    manifest: dict
    config: dict
    platform: str
    layers: list
    media_type: str = OCI_MANIFEST
    manifest_bytes: bytes = b""
    index_digest: str | None = None
    source: str = ""          # reference actually used (a mirror, maybe)


@dataclass
class LayerKind:
    kind: str | None          # "estargz", "stargz" or None (not lazily usable)
    reason: str
    toc_offset: int | None = None


class Stats:
    """Counters for tests and metrics; ``as_dict()`` for a snapshot."""

    FIELDS = ("requests", "bytes_received", "bytes_sent", "retries", "range_requests",
              "multi_range_requests", "redirects", "redirect_cache_hits", "full_body_aborts",
              "tokens")

    def __init__(self):
        self._lock = threading.Lock()
        for name in self.FIELDS:
            setattr(self, name, 0)

    def add(self, name, n=1):
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self):
        with self._lock:
            return {name: getattr(self, name) for name in self.FIELDS}

    def __getitem__(self, name):
        return getattr(self, name)

    def reset(self):
        with self._lock:
            for name in self.FIELDS:
                setattr(self, name, 0)


def json_object(body, what, error=StargzError):
    """``body`` (a manifest, index or config) parsed as a JSON object, or ``error``
    naming ``what``."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise error(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise error(f"{what} is not a JSON object")
    return doc


def _check_content(data, digest, what):
    algo, _, hexpart = digest.partition(":")
    if algo not in hashlib.algorithms_available or algo not in ("sha256", "sha384", "sha512"):
        raise RegistryError(f"{what}: unsupported digest algorithm {algo!r}")
    if hashlib.new(algo, data).hexdigest() != hexpart:
        raise DigestMismatch(f"{what}: content does not match its digest {digest}")


# -- TLS ------------------------------------------------------------------

class _TLSAdapter(HTTPAdapter):
    """An adapter that verifies with our own SSLContext (system CAs + certs.d)."""

    def __init__(self, ssl_context=None, **kw):
        self._ssl_context = ssl_context
        super().__init__(**kw)

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        if self._ssl_context is not None and host.get("scheme") == "https" and verify:
            for key in ("ca_certs", "ca_cert_dir", "cert_file", "key_file"):
                pool.pop(key, None)
            pool["ssl_context"] = self._ssl_context
            pool["cert_reqs"] = "CERT_REQUIRED"
        return host, pool

    def cert_verify(self, conn, url, verify, cert):
        if self._ssl_context is not None and verify:
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None
            return
        super().cert_verify(conn, url, verify, cert)


def _ssl_context(hostport, certs_dirs):
    """System CAs plus ``DIR/HOST:PORT/*.crt``, client ``*.cert`` + ``*.key``."""
    ctx = ssl.create_default_context()
    for root in certs_dirs:
        d = os.path.join(root, hostport)
        if not os.path.isdir(d):
            continue
        for ca in sorted(glob.glob(os.path.join(glob.escape(d), "*.crt"))):
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load CA certificate {ca}: {exc}") from None
        for cert in sorted(glob.glob(os.path.join(glob.escape(d), "*.cert"))):
            key = cert[:-len(".cert")] + ".key"
            if not os.path.exists(key):
                raise ConfigError(f"missing key {key} for client certificate {cert}")
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load client certificate {cert}: {exc}") from None
        for key in glob.glob(os.path.join(glob.escape(d), "*.key")):
            if not os.path.exists(key[:-len(".key")] + ".cert"):
                raise ConfigError(f"missing client certificate {key[:-4]}.cert for key {key}")
        break      # the first directory that exists wins, as in containers/image
    return ctx


# -- scheme hints ---------------------------------------------------------

class SchemeHints:
    """Hosts configured insecure that answered plain HTTP only, remembered in a JSON file.

    Each new process would otherwise fail a TLS handshake with such a host
    before falling back to plain HTTP (one or two round trips).  A hint is
    only ever used for an endpoint that is insecure when it is used (it never
    downgrades a registry configured secure), is confirmed by the first answer
    and dropped when the host turns out to speak TLS (a TLS server's "plain
    HTTP sent to an HTTPS port" 400, or a closed connection, sends the request
    to TLS).  Best effort: an unreadable or unwritable file means no hints.
    """

    def __init__(self, path):
        self.path = path
        self._lock = threading.Lock()

    def _load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                hosts = json.load(f).get("plain_http")
        except (OSError, ValueError, AttributeError):
            return {}
        return dict(hosts) if isinstance(hosts, dict) else {}

    def plain_http(self, host):
        return host in self._load()

    def set(self, host, plain):
        """Remember (``plain``) or forget that ``host`` answers plain HTTP only."""
        with self._lock:
            hosts = self._load()
            if (host in hosts) == plain:
                return
            if plain:
                hosts[host] = int(time.time())
            else:
                del hosts[host]
            tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump({"plain_http": hosts}, f)
                os.replace(tmp, self.path)      # readers see the old or the new file
            except OSError as exc:
                log.debug("cannot update scheme hints %s: %s", self.path, exc)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass


def _tls_port_answer(resp):
    """A plain-HTTP request answered by a TLS server's 400 ("... HTTPS server/port").

    A registry's own 400 (a JSON error body) is left unread."""
    if resp.status_code != 400 or "json" in resp.headers.get("Content-Type", ""):
        return False
    try:
        body = resp.raw.read(1024, decode_content=True) if resp.raw else b""
    except Exception:        # noqa: BLE001 - best effort only
        return False
    return b"https" in body.lower()


# -- endpoints ------------------------------------------------------------

class Endpoint:
    """Connection state for one host[:port]: scheme, session, auth, quirks."""

    def __init__(self, client, host, insecure):
        self.client = client
        self.host = host
        self.insecure = insecure
        self.scheme = "https"
        self.hint = None              # "hinted", "learned", "retls": see SchemeHints
        self.lock = threading.Lock()
        self.multirange = None        # None unknown, True works, False refused
        self.session = requests.Session()
        self.session.headers["User-Agent"] = client.user_agent
        self.session.headers["Accept-Encoding"] = "identity"
        self.session.trust_env = False      # no ~/.netrc; proxies are taken below
        self.proxies = _proxies_for(host)
        pool = client.pool_size
        if insecure:
            self.session.verify = False
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool, max_retries=0)
        else:
            adapter = _TLSAdapter(_ssl_context(host, client.certs_dirs), pool_connections=1,
                                  pool_maxsize=pool, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=pool,
                                                  max_retries=0))
        self.auth = None

    def url(self, path):
        return f"{self.scheme}://{self.host}{path}"

    def close(self):
        self.session.close()


def _proxies_for(host):
    """``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` as Podman honours them; never for loopback."""
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    if name in ("127.0.0.1", "localhost", "[::1]"):
        return {}
    return requests.utils.get_environ_proxies(f"https://{host}")


class _Retry(Exception):
    """Raised by a response handler: the answer was transient, try again."""

    def __init__(self, reason, delay=None):
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


def _retry_after(resp):
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _describe_exc(exc):
    text = str(exc)
    for marker, nice in (("Connection refused", "connection refused"),
                         ("timed out", "timed out"), ("Read timed out", "read timed out"),
                         ("RemoteDisconnected", "connection closed by the registry"),
                         ("Connection reset", "connection reset"),
                         ("Name or service not known", "unknown host"),
                         ("IncompleteRead", "connection closed in the middle of a response"),
                         ("Connection broken", "connection broken")):
        if marker in text:
            return nice
    return text.splitlines()[0][:200] if text else exc.__class__.__name__


def registry_error_message(resp):
    """The ``errors[0].message`` of a registry error body, if any (bounded read)."""
    try:
        body = resp.raw.read(65536, decode_content=True) if resp.raw else b""
        doc = json.loads(body)
        errs = doc.get("errors") or []
        if errs:
            e = errs[0]
            return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    except Exception:        # noqa: BLE001 - best effort only
        pass
    return ""


class Deadline:
    """An absolute time limit for one operation (all its retries)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self):
        return self.end - time.monotonic()

    def expired(self):
        return self.remaining() <= 0


class RegistryClient:
    """See the module docstring.  Thread-safe; share one per process."""

    def __init__(self, registries_conf=None, auth_files=None, certs_dir=None, tls_verify=True,
                 connect_timeout=10.0, read_timeout=30.0, retries=3, backoff=0.25,
                 deadline=120.0, platform=None, coalesce_gap=32 << 10,
                 max_ranges_per_request=64, pool_size=16, redirect_ttl=60.0,
                 user_agent=None, env=None, scheme_hints=None):
        env = os.environ if env is None else env
        if isinstance(registries_conf, RegistriesConf):
            self.conf = registries_conf
        else:
            self.conf = RegistriesConf.load(registries_conf)
        if isinstance(auth_files, AuthFiles):
            self.auth_files = auth_files
        else:
            self.auth_files = AuthFiles(auth_files, env=env)
        if certs_dir is None:
            certs_dir = env.get(ENV_CERTS_DIR) or list(CERTS_DIRS)
        self.certs_dirs = [certs_dir] if isinstance(certs_dir, str) else list(certs_dir)
        self.tls_verify = tls_verify
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.backoff = backoff
        self.deadline = deadline
        self.platform = parse_platform(platform)
        self.coalesce_gap = coalesce_gap
        self.max_ranges_per_request = max_ranges_per_request
        self.pool_size = pool_size
        self.redirect_ttl = redirect_ttl
        self.user_agent = user_agent or f"stargz-overlay/{__version__}"
        self.scheme_hints = SchemeHints(scheme_hints) if scheme_hints else None
        self.stats = Stats()
        self._lock = threading.Lock()
        self._endpoints = {}
        self._storage = {}           # netloc -> Endpoint for redirect targets
        self._pulled_from = {}       # str(reference) -> PullSource that served it
        self._range_quirks = {}      # netloc -> "multi" | "ignores" flags

    # -- plumbing --------------------------------------------------------
    def close(self):
        with self._lock:
            for ep in list(self._endpoints.values()) + list(self._storage.values()):
                ep.close()
            self._endpoints.clear()
            self._storage.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def endpoint(self, registry, insecure=False):
        """The Endpoint for a registry name (``docker.io`` maps to its API host)."""
        host = api_host(registry)
        insecure = insecure or not self.tls_verify or self.conf.is_insecure(registry)
        key = (host, insecure)
        with self._lock:
            ep = self._endpoints.get(key)
            if ep is None:
                ep = Endpoint(self, host, insecure)
                if insecure and self.scheme_hints and self.scheme_hints.plain_http(host):
                    ep.scheme, ep.hint = "http", "hinted"
                ep.auth = HostAuth(
                    host, lambda reg=registry: self.auth_files.lookup(reg),
                    self._token_http, self.auth_files.describe())
                self._endpoints[key] = ep
            return ep

    def storage_endpoint(self, url):
        """An Endpoint for a redirect target (blob storage) given a full URL."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        with self._lock:
            ep = self._storage.get(key)
            if ep is None:
                insecure = parts.scheme == "http" or not self.tls_verify
                ep = Endpoint(self, parts.netloc, insecure)
                ep.scheme = parts.scheme
                self._storage[key] = ep
            return ep

    def _token_http(self, method, url, **kw):
        """One request to a token server (retried like any other request)."""
        ep = self.storage_endpoint(url)
        deadline = Deadline(self.deadline)
        self.stats.add("tokens")
        return self.call(ep, method, url, what=f"token from {urlsplit(url).netloc}",
                         deadline=deadline, auth=False, **kw)

    def call(self, ep, method, path, *, what, deadline, scopes=(), headers=None,
             params=None, data=None, auth=True, allow_redirects=True, handler=None):
        """Send one request with auth, retries and the deadline.

        ``path`` is a path on ``ep`` or an absolute URL.  ``data`` may be a
        callable returning a fresh body (so uploads can be retried).
        ``handler(resp)`` consumes the response and may raise ``_Retry``;
        without one the (unread, streamed) response is returned.
        """
        attempt = 0
        auth_rounds = 0
        started = time.monotonic()
        while True:
            url = path if "://" in path else ep.url(path)
            hdrs = dict(headers or {})
            had_auth = False
            if auth and ep.auth is not None:
                auth_hdr = ep.auth.headers(scopes)
                had_auth = bool(auth_hdr)
                hdrs.update(auth_hdr)
            remaining = deadline.remaining()
            if remaining <= 0:
                raise RegistryError(f"{ep.host}: {what}: no answer within the "
                                    f"{deadline.seconds:g} s deadline")
            timeout = (min(self.connect_timeout, remaining), min(self.read_timeout, remaining))
            body = data() if callable(data) else data
            failure = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                    resp = ep.session.request(method, url, headers=hdrs, params=params,
                                              data=body, stream=True, timeout=timeout,
                                              allow_redirects=allow_redirects,
                                              proxies=ep.proxies)
                self.stats.add("requests")
            except requests.exceptions.SSLError as exc:
                if ep.insecure and ep.scheme == "https" and "://" not in path:
                    self.stats.add("requests")      # the failed TLS handshake was a round trip
                    log.info("%s: TLS failed (%s); insecure registry, trying plain HTTP",
                             ep.host, _describe_exc(exc))
                    ep.scheme, ep.hint = "http", "learned"
                    continue
                raise RegistryError(f"{ep.host}: TLS error ({_tls_reason(exc)}) during "
                                    f"{what}") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                    requests.exceptions.ChunkedEncodingError) as exc:
                failure = _describe_exc(exc)
                resp = None
                refused = failure == "connection refused"
                timed_out = isinstance(exc, requests.exceptions.Timeout)
                if ep.hint == "hinted" and "://" not in path and not (refused or timed_out):
                    log.info("%s: plain HTTP failed (%s); trying TLS", ep.host, failure)
                    ep.scheme, ep.hint = "https", "retls"
                    continue
            except requests.exceptions.RequestException as exc:
                raise RegistryError(f"{ep.host}: {what}: {_describe_exc(exc)}") from None
            finally:
                if hasattr(body, "close"):
                    body.close()
            delay = None
            if resp is not None and ep.hint is not None and "://" not in path:
                if self._settle_scheme(ep, resp):
                    continue
            if resp is not None:
                if resp.status_code == 401 and auth and ep.auth is not None:
                    resp.close()
                    auth_rounds += 1
                    if auth_rounds > 2:
                        raise ep.auth.denied(what)
                    ep.auth.challenged(resp, scopes, had_auth, what)
                    continue
                if resp.status_code in RETRY_STATUSES:
                    failure = f"HTTP {resp.status_code}"
                    delay = _retry_after(resp)
                    resp.close()
                elif handler is None:
                    return resp
                else:
                    try:
                        return handler(resp)
                    except _Retry as exc:
                        failure, delay = exc.reason, exc.delay
                    except (requests.exceptions.ConnectionError,
                            requests.exceptions.Timeout,
                            requests.exceptions.ChunkedEncodingError,
                            urllib3.exceptions.HTTPError, OSError) as exc:
                        failure = _describe_exc(exc)
                    finally:
                        resp.close()
            attempt += 1
            if delay is None:
                delay = self.backoff * (2 ** (attempt - 1)) * (0.75 + random.random() / 2)
            if attempt > self.retries or deadline.remaining() < delay:
                elapsed = time.monotonic() - started
                raise RegistryError(f"{ep.host}: {what}: {failure} ({attempt} attempt"
                                    f"{'s' if attempt > 1 else ''} in {elapsed:.1f} s)")
            log.info("%s: %s: %s; retrying in %.2f s", ep.host, what, failure, delay)
            self.stats.add("retries")
            time.sleep(delay)

    def _settle_scheme(self, ep, resp):
        """First answer after a scheme guess: update the hints; True -> resend with TLS."""
        hint, ep.hint = ep.hint, None
        hints = self.scheme_hints
        if ep.scheme == "http" and hint == "hinted" and _tls_port_answer(resp):
            resp.close()
            log.info("%s: the registry now speaks TLS; trying TLS", ep.host)
            ep.scheme, ep.hint = "https", "retls"
            return True
        if hints is not None and hint in ("learned", "retls"):
            hints.set(ep.host, ep.scheme == "http")
        return False

    def read_body(self, resp, limit, deadline, what):
        """Read a whole (bounded) body; raises _Retry-able errors from the socket."""
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RegistryError(f"{what}: {length} bytes is more than the {limit} allowed")
        parts = []
        total = 0
        while True:
            if deadline.expired():
                raise RegistryError(f"{what}: body not received within the "
                                    f"{deadline.seconds:g} s deadline")
            block = resp.raw.read(READ_BLOCK, decode_content=False)
            if not block:
                break
            total += len(block)
            self.stats.add("bytes_received", len(block))
            if total > limit:
                raise RegistryError(f"{what}: more than the {limit} bytes allowed")
            parts.append(block)
        data = b"".join(parts)
        if length is not None and length.isdigit() and len(data) != int(length):
            raise _Retry(f"short body ({len(data)} of {length} bytes)")
        return data

    def _status_error(self, resp, what, ep):
        msg = registry_error_message(resp)
        detail = f": {msg}" if msg else ""
        if resp.status_code == 404:
            return NotFoundError(f"{ep.host}: {what}: not found{detail}")
        if resp.status_code == 403:
            return AuthError(f"{ep.host}: {what}: access denied{detail}")
        return RegistryError(f"{ep.host}: {what}: HTTP {resp.status_code}{detail}")

    # -- references and sources -----------------------------------------
    def sources(self, reference):
        """PullSources for a reference string/Reference, the one that worked first."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        out = []
        for cand in self.conf.candidates(ref):
            out.extend(self.conf.sources(cand))
        used = self._pulled_from.get(str(ref))
        if used is not None and used in out:
            out.remove(used)
            out.insert(0, used)
        return out

    # -- manifests -------------------------------------------------------
    def _get_manifest(self, src, locator, deadline):
        ref = src.reference
        ep = self.endpoint(ref.registry, src.insecure)
        what = f"manifest {ref.repository}:{locator}" if ":" not in locator else \
            f"manifest {ref.repository}@{locator}"

        def handle(resp):
            if resp.status_code != 200:
                raise self._status_error(resp, what, ep)
            body = self.read_body(resp, MAX_MANIFEST_SIZE, deadline, f"{ep.host}: {what}")
            return body, resp.headers.get("Content-Type", "").split(";")[0].strip()

        body, ctype = self.call(ep, "GET", f"/v2/{ref.repository}/manifests/{locator}",
                                what=what, deadline=deadline,
                                scopes=[scope_for(ref.repository)],
                                headers={"Accept": ACCEPT}, handler=handle)
        if ":" in locator:
            _check_content(body, locator, f"{ep.host}: {what}")
            digest = locator
        else:
            digest = sha256_digest(body)
        doc = json_object(body, f"{ep.host}: {what}", RegistryError)
        media_type = doc.get("mediaType") or ctype
        if media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
            raise RegistryError(f"{ep.host}: {what} is a Docker schema 1 manifest, "
                                f"which is not supported")
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            if "manifests" in doc:
                media_type = OCI_INDEX
            elif "layers" in doc:
                media_type = OCI_MANIFEST
            else:
                raise RegistryError(f"{ep.host}: {what} has unsupported media type "
                                    f"{media_type!r}")
        return doc, body, digest, media_type

    def get_blob(self, reference, digest, limit=MAX_CONFIG_SIZE, source=None):
        """A small blob (config, ...) as verified bytes."""
        check_digest(digest)
        deadline = Deadline(self.deadline)
        srcs = [source] if source is not None else self.sources(reference)
        errors = []
        for src in srcs:
            ref = src.reference
            ep = self.endpoint(ref.registry, src.insecure)
            what = f"blob {digest} of {ref.repository}"

            def handle(resp, ep=ep, what=what):
                if resp.status_code != 200:
                    raise self._status_error(resp, what, ep)
                return self.read_body(resp, limit, deadline, f"{ep.host}: {what}")
            try:
                data = self.call(ep, "GET", f"/v2/{ref.repository}/blobs/{digest}", what=what,
                                 deadline=deadline, scopes=[scope_for(ref.repository)],
                                 handler=handle)
            except (RegistryError, ConfigError) as exc:
                errors.append(exc)
                continue
            _check_content(data, digest, f"{ep.host}: {what}")
            return data
        raise _combine(errors, f"cannot fetch blob {digest}")

    def get_manifest(self, reference, locator=None):
        """A manifest or index as ``(doc, body, digest, media_type)``, from the first
        source that has it; ``locator`` (tag or digest) overrides the reference's."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        errors = []
        for src in self.sources(ref):
            try:
                return self._get_manifest(src, locator or src.reference.locator,
                                          Deadline(self.deadline))
            except (RegistryError, ConfigError) as exc:
                errors.append(exc)
        raise _combine(errors, f"cannot fetch manifest of {ref}")

    def resolve(self, reference, platform=None):
        """Resolve a reference to an Image (manifest, config, layers) for a platform."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        want = parse_platform(platform) if platform is not None else self.platform
        errors = []
        for cand in self.conf.candidates(ref):
            for src in self.conf.sources(cand):
                deadline = Deadline(self.deadline)
                try:
                    image = self._resolve_at(cand, src, want, deadline)
                except (RegistryError, ConfigError) as exc:
                    log.info("%s: %s", src.reference, exc)
                    errors.append(exc)
                    continue
                with self._lock:
                    self._pulled_from[str(cand)] = src
                    if ref.is_short:
                        self._pulled_from[str(ref)] = src
                return image
        raise _combine(errors, f"cannot resolve {ref}")

    def _resolve_at(self, cand, src, want, deadline):
        doc, body, digest, media_type = self._get_manifest(src, src.reference.locator, deadline)
        index_digest = None
        platform = None
        depth = 0
        while media_type in INDEX_TYPES:
            depth += 1
            if depth > 2:
                raise RegistryError(f"{src.reference}: index nesting is too deep")
            desc = select_platform(doc, want)
            index_digest = index_digest or digest
            p = desc.get("platform") or {}
            platform = format_platform((p.get("os", ""), p.get("architecture", ""),
                                        p.get("variant", "")))
            child = check_digest(desc.get("digest", ""))
            doc, body, digest, media_type = self._get_manifest(src, child, deadline)
        layers = []
        for i, desc in enumerate(doc.get("layers") or []):
            try:
                layers.append(Layer(check_digest(desc["digest"]), int(desc["size"]),
                                    desc.get("mediaType", ""),
                                    dict(desc.get("annotations") or {})))
            except (KeyError, TypeError, ValueError, InvalidReference):
                raise RegistryError(f"{src.reference}: layer {i} of the manifest is "
                                    f"malformed") from None
        cfg_desc = doc.get("config") or {}
        config = {}
        if cfg_desc.get("digest"):
            raw = self.get_blob(src.reference, cfg_desc["digest"], source=src)
            config = json_object(raw, f"{src.reference}: image config", RegistryError)
        if platform is None:
            platform = format_platform((config.get("os", ""), config.get("architecture", ""),
                                        config.get("variant", "")))
        return Image(str(cand), digest, doc, config, platform, layers, media_type, body,
                     index_digest, str(src.reference))

    # -- blobs -----------------------------------------------------------
    def blob_source(self, reference, digest, size=None):
        """A random-access source (``size``, ``read_at``, ``read_ranges``) for a blob."""
        from .registry_blob import RegistryBlob
        if isinstance(reference, Image):
            reference = reference.reference
        check_digest(digest)
        return RegistryBlob(self, self.sources(reference), digest, size)

    def classify_layer(self, image, layer):
        """Is ``layer`` usable lazily?  LayerKind(kind, reason, toc_offset)."""
        from .footer import MAX_FOOTER_SIZE, parse_footer
        annotated = layer.toc_digest is not None
        if layer.media_type not in GZIP_LAYER_TYPES:
            kind = layer.media_type.rsplit(".", 1)[-1] or "unknown"
            return LayerKind(None, f"media type {layer.media_type or '(none)'} is not gzip "
                                   f"({kind}); stargz layers are gzip")
        if layer.size < 47:
            return LayerKind(None, "blob too small to hold a stargz footer")
        try:
            src = self.blob_source(image, layer.digest, layer.size)
            tail = src.read_at(layer.size - min(layer.size, MAX_FOOTER_SIZE),
                               min(layer.size, MAX_FOOTER_SIZE))
        except StargzError as exc:
            return LayerKind(None, f"could not read the footer: {exc}")
        try:
            footer = parse_footer(tail, layer.size)
        except FormatError:
            if annotated:
                return LayerKind(None, "toc.digest annotation present but the footer is "
                                       "plain gzip (no stargz footer)")
            return LayerKind(None, "no toc.digest annotation and footer is plain gzip")
        if footer.kind == "estargz":
            why = ("eStargz footer and toc.digest annotation" if annotated else
                   "eStargz footer but no toc.digest annotation (TOC not pinned by "
                   "the manifest)")
        else:
            why = "legacy stargz footer" + (" and toc.digest annotation" if annotated else "")
        return LayerKind(footer.kind, why, footer.toc_offset)

    # -- pushing ---------------------------------------------------------
    def _push_endpoint(self, reference):
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        if ref.is_short:
            raise InvalidReference(f"{ref}: a push needs a fully qualified reference")
        src = self.conf.sources(ref)[-1]      # primary location; no mirrors for pushes
        return src.reference, self.endpoint(src.reference.registry, src.insecure)

    def blob_exists(self, reference, digest):
        ref, ep = self._push_endpoint(reference)
        deadline = Deadline(self.deadline)
        resp = self.call(ep, "HEAD", f"/v2/{ref.repository}/blobs/{digest}",
                         what=f"blob {digest} of {ref.repository}", deadline=deadline,
                         scopes=[scope_for(ref.repository, ("pull", "push"))])
        resp.close()
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise self._status_error(resp, f"HEAD blob {digest}", ep)

    def _start_upload(self, ref, ep, digest, mount_from, what):
        """Begin putting ``digest`` into ``ref``'s repository: None when it is there
        already or was mounted from ``mount_from`` (a repository on the same registry;
        POST answers 201), else the upload session (202): ``(location, scopes, deadline)``."""
        if self.blob_exists(ref, digest):
            return None
        scopes = post_scopes = [scope_for(ref.repository, ("pull", "push"))]
        deadline = Deadline(self.deadline)
        query = ""
        if mount_from:
            post_scopes = scopes + [scope_for(mount_from)]
            query = "?" + urlencode({"mount": digest, "from": mount_from})
        resp = self.call(ep, "POST", f"/v2/{ref.repository}/blobs/uploads/{query}", what=what,
                         deadline=deadline, scopes=post_scopes, headers={"Content-Length": "0"})
        resp.close()
        if resp.status_code == 201:
            log.info("%s: mounted %s from %s", ep.host, digest, mount_from)
            return None
        if resp.status_code != 202 or not resp.headers.get("Location"):
            raise self._status_error(resp, what, ep)
        return urljoin(ep.url("/"), resp.headers["Location"]), scopes, deadline

    def mount_blob(self, reference, digest, mount_from):
        """Make ``digest`` from repository ``mount_from`` (same registry) appear in
        ``reference``'s repository without transferring it; True when it did."""
        ref, ep = self._push_endpoint(reference)
        what = f"mount of blob {digest} into {ref.repository}"
        session = self._start_upload(ref, ep, digest, mount_from, what)
        if session is None:
            return True
        location, scopes, deadline = session
        cancel = self.call(ep, "DELETE", location, what=f"cancel of {what}", deadline=deadline,
                           scopes=scopes)
        cancel.close()
        return False

    def push_blob(self, reference, data, digest=None, mount_from=None):
        """Upload a blob (bytes or a file path) unless it exists; returns its digest.

        ``mount_from`` names another repository on the same registry to try a
        cross-repository mount from first.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
            size = len(data)
            actual = sha256_digest(data)
            opener = lambda: data   # noqa: E731
        else:
            path = os.fspath(data)
            size = os.path.getsize(path)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            actual = hasher_digest(h)
            opener = lambda: open(path, "rb")   # noqa: E731
        if digest is not None and digest != actual:
            raise DigestMismatch(f"blob to push has digest {actual}, not {digest}")
        digest = actual
        ref, ep = self._push_endpoint(reference)
        what = f"upload of blob {digest} to {ref.repository}"
        session = self._start_upload(ref, ep, digest, mount_from, what)
        if session is None:
            return digest
        location, scopes, deadline = session
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}{urlencode({'digest': digest})}"
        resp = self.call(ep, "PUT", put_url, what=what, deadline=deadline, scopes=scopes,
                         headers={"Content-Type": "application/octet-stream",
                                  "Content-Length": str(size)}, data=opener)
        resp.close()
        if resp.status_code not in (201, 204):
            raise self._status_error(resp, what, ep)
        self.stats.add("bytes_sent", size)
        return digest

    def push_manifest(self, reference, manifest, media_type=None):
        """PUT a manifest (dict or bytes) at the reference's tag or digest; its digest."""
        if isinstance(manifest, dict):
            body = json.dumps(manifest, separators=(",", ":")).encode()
            media_type = media_type or manifest.get("mediaType")
        else:
            body = bytes(manifest)
        if not media_type:
            media_type = json.loads(body).get("mediaType") or OCI_MANIFEST
        digest = sha256_digest(body)
        ref, ep = self._push_endpoint(reference)
        if ref.digest and ref.digest != digest:
            raise DigestMismatch(f"manifest has digest {digest}, not {ref.digest}")
        locator = ref.tag or digest
        what = f"manifest {ref.repository}:{locator}"
        resp = self.call(ep, "PUT", f"/v2/{ref.repository}/manifests/{locator}", what=what,
                         deadline=Deadline(self.deadline),
                         scopes=[scope_for(ref.repository, ("pull", "push"))],
                         headers={"Content-Type": media_type}, data=body)
        resp.close()
        if resp.status_code not in (200, 201, 202):
            raise self._status_error(resp, f"PUT {what}", ep)
        return digest


def _tls_reason(exc):
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        detail = text.split("CERTIFICATE_VERIFY_FAILED]", 1)[-1].split("(")[0]
        detail = detail.strip(" ')\"") or "certificate verify failed"
        return f"certificate verification failed: {detail}; add the CA to certs.d or mark " \
               f"the registry insecure"
    if "WRONG_VERSION_NUMBER" in text:
        return "the server does not speak TLS (plain HTTP?); mark the registry insecure " \
               "(insecure = true in registries.conf, or --tls-verify=false)"
    if "BAD_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text:
        return "the registry refused our client certificate or wants one; put " \
               "client.cert and client.key in certs.d/HOST:PORT"
    m = re.search(r"\[SSL: [A-Z0-9_]+\] [^(']+", text)
    return m.group(0).strip() if m else _describe_exc(exc)


def _combine(errors, what):
    if not errors:
        return RegistryError(f"{what}: no source to try")
    if len(errors) == 1:
        return errors[0]
    classes = {type(e) for e in errors}
    cls = classes.pop() if len(classes) == 1 else RegistryError
    return cls(f"{what}: " + "; ".join(str(e) for e in errors))


def open_layer_source(spec, layer=None, client=None, platform=None):
    """``docker://REF`` (+ layer index or digest) or a file path -> ``(source, toc_digest)``.

    ``toc_digest`` is the layer's annotation (None for files or unannotated layers).
    """
    from .source import FileSource
    if not spec.startswith("docker://"):
        if layer is not None:
            raise StargzError("--layer only applies to docker://REF blobs")
        return FileSource(spec), None
    client = client or RegistryClient()
    image = client.resolve(spec, platform=platform)
    chosen = pick_layer(image, layer)
    return client.blob_source(image, chosen.digest, chosen.size), chosen.toc_digest


def pick_layer(image, layer):
    """A Layer of ``image`` by index (negative from the top) or (prefix of a) digest."""
    layers = image.layers
    if not layers:
        raise StargzError(f"{image.reference} has no layers")
    if layer is None:
        if len(layers) == 1:
            return layers[0]
        raise StargzError(f"{image.reference} has {len(layers)} layers; choose one with "
                          f"--layer N (0..{len(layers) - 1}) or --layer DIGEST")
    text = str(layer).strip()
    if text.lstrip("-").isdigit() and len(text.lstrip("-")) < 6:
        n = int(text)
        if not -len(layers) <= n < len(layers):
            raise StargzError(f"{image.reference} has {len(layers)} layers; no layer {n}")
        return layers[n]
    want = text if ":" in text else "sha256:" + text
    found = [la for la in layers if la.digest.startswith(want)]
    if len(found) == 1 or (found and all(la.digest == found[0].digest for la in found)):
        return found[0]
    if not found:
        raise StargzError(f"{image.reference} has no layer {text}")
    raise StargzError(f"layer {text} is ambiguous in {image.reference}")


__all__ = ["RegistryClient", "Image", "Layer", "LayerKind", "Stats", "open_layer_source",
           "pick_layer", "host_platform", "parse_platform", "select_platform",
           "TOC_DIGEST_ANNOTATION", "UNCOMPRESSED_SIZE_ANNOTATION", "Reference", "PullSource"]
