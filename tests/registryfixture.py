"""Real registries for tests: Debian's ``docker-registry`` on 127.0.0.1.

Reusable by any test module::

    from tests.registryfixture import Registry, TokenServer, Proxy, make_ca

    with Registry(tmp_path) as reg:                  # plain HTTP
        reg.host                                     # "127.0.0.1:PORT"
        reg.registries_conf(tmp_path)                # a registries.conf marking it insecure

Variants: ``Registry(tmp, tls=True)`` (a generated CA; ``reg.ca_cert``,
``reg.certs_dir`` laid out as ``certs.d/HOST:PORT/ca.crt``),
``Registry(tmp, tls=True, client_certs=True)`` (mutual TLS; client.cert/.key in certs.d),
``Registry(tmp, users={"alice": "pw"})`` (htpasswd basic auth),
``Registry(tmp, token=TokenServer(tmp, users=...))`` (RS256 JWT bearer tokens).
``Proxy(upstream_host, ...)`` stands in for misbehaving registries (latency,
multi-range refusal, ignored Range, redirects, corrupted bytes, counting).
Every server is stopped by ``stop()`` / the context manager.
"""

import base64
import contextlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid

import pytest

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def refused_port():
    """A loopback port that refuses connections while the context lasts: bound here
    and never listening, so no other process can start a server on it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def require_registry():
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip("docker-registry is not installed (Debian package docker-registry)")
    for tool in ("openssl", "htpasswd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def _run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def make_ca(directory, name="test-ca"):
    """A self-signed CA: ``(cert_path, key_path)``."""
    os.makedirs(directory, exist_ok=True)
    crt, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", key, "-out", crt,
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
    return crt, key


def make_cert(directory, ca, name, ip="127.0.0.1", dns="localhost", client=False):
    """A leaf certificate signed by ``ca``: ``(cert_path, key_path)``."""
    ca_crt, ca_key = ca
    crt, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    csr = os.path.join(directory, f"{name}.csr")
    ext = os.path.join(directory, f"{name}.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName=IP:{ip},DNS:{dns}\n"
                f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n")
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
         "-keyout", key, "-out", csr)
    _run("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-days", "2", "-out", crt, "-extfile", ext)
    return crt, key


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _listens(pid, port):
    """Does process ``pid`` hold the socket listening on 127.0.0.1:``port``?"""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            pass
    return False


def _wait_port(port, proc=None, timeout=30.0, log=None):
    """Wait until something (``proc`` itself, if given) listens on ``port``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            text = open(log, errors="replace").read()[-2000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
            # (another process may hold the port: then ours is about to fail to bind)
            if proc is None or _listens(proc.pid, port):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class _ThreadedServer:
    """A ThreadingHTTPServer on a free loopback port, served from a thread."""

    def _serve(self, handler_cls):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    def stop(self):
        if getattr(self, "httpd", None) is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.httpd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# -- token server ---------------------------------------------------------

class TokenServer(_ThreadedServer):
    """A Docker token server issuing RS256 JWTs that docker-registry accepts.

    ``users``: {name: password}; ``anonymous_pull``: tokens for pull without
    credentials; ``expires_in``: lifetime announced and put in ``exp``;
    ``stale_first``: the first token's ``exp`` lies in the past (beyond the
    registry's 60 s leeway) while announcing a long lifetime, so the registry
    refuses it with 401 and the client must fetch a new one.
    """

    SERVICE = "test-registry"
    ISSUER = "test-issuer"

    def __init__(self, directory, users=None, anonymous_pull=False, expires_in=300,
                 stale_first=False):
        self.directory = os.path.join(directory, "token")
        os.makedirs(self.directory, exist_ok=True)
        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.stale_first = stale_first
        self.issued = 0
        self.requests = []
        self.lock = threading.Lock()
        self.ca = make_ca(self.directory, "token-ca")
        self.signer = make_cert(self.directory, self.ca, "token-signer")
        der = _run("openssl", "x509", "-in", self.signer[0], "-outform", "DER").stdout
        self.x5c = base64.b64encode(der).decode()
        self._serve(_TokenHandler)

    @property
    def realm(self):
        return f"http://{self.host}/token"

    def sign(self, claims):
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        signing_input = (_b64url(json.dumps(header).encode()) + "." +
                         _b64url(json.dumps(claims).encode()))
        sig = _run("openssl", "dgst", "-sha256", "-sign", self.signer[1],
                   input=signing_input.encode()).stdout
        return signing_input + "." + _b64url(sig)

    def issue(self, subject, scopes):
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) != 3 or parts[0] != "repository":
                continue
            actions = parts[2].split(",")
            if not subject:
                actions = [a for a in actions if a == "pull"] if self.anonymous_pull else []
            access.append({"type": "repository", "name": parts[1], "actions": actions})
        now = int(time.time())
        with self.lock:
            self.issued += 1
            stale = self.stale_first and self.issued == 1
        exp = now - 600 if stale else now + self.expires_in
        claims = {"iss": self.ISSUER, "sub": subject, "aud": self.SERVICE, "exp": exp,
                  "nbf": now - 700 if stale else now - 5, "iat": now - 700 if stale else now,
                  "jti": uuid.uuid4().hex, "access": access}
        return {"token": self.sign(claims), "expires_in": self.expires_in,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}


class _TokenHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server.owner
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        subject = ""
        header = self.headers.get("Authorization", "")
        with server.lock:
            server.requests.append({"path": url.path, "auth": bool(header),
                                    "scope": query.get("scope", [])})
        if header.startswith("Basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if server.users.get(user) != password:
                return self._answer(401, {"errors": [{"code": "UNAUTHORIZED",
                                                      "message": "bad credentials"}]})
            subject = user
        elif not server.anonymous_pull:
            return self._answer(401, {"errors": [{"code": "UNAUTHORIZED",
                                                  "message": "credentials required"}]})
        self._answer(200, server.issue(subject, query.get("scope", [])))

    def _answer(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


# -- registry -------------------------------------------------------------

class Registry:
    """``docker-registry serve`` on 127.0.0.1 with temporary storage."""

    def __init__(self, directory, tls=False, users=None, token=None, start=True,
                 client_certs=False):
        require_registry()
        self.directory = os.path.join(directory, f"registry-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.directory)
        self.port = free_port()
        self.tls = tls
        self.users = dict(users or {})
        self.token = token
        self.proc = None
        self.log = os.path.join(self.directory, "registry.log")
        self.ca_cert = None
        self.certs_dir = None
        lines = ["version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true",
                 "storage:", "  filesystem:",
                 f"    rootdirectory: {os.path.join(self.directory, 'storage')}",
                 "  delete:", "    enabled: true",
                 "http:", "  addr: ADDR", f"  secret: {uuid.uuid4().hex}"]
        if tls:
            ca = make_ca(self.directory)
            crt, key = make_cert(self.directory, ca, "server")
            self.ca_cert = ca[0]
            self.ca = ca
            self.certs_dir = os.path.join(self.directory, "certs.d")
            os.makedirs(os.path.join(self.certs_dir, self.host))
            shutil.copy(ca[0], os.path.join(self.certs_dir, self.host, "ca.crt"))
            lines += ["  tls:", f"    certificate: {crt}", f"    key: {key}"]
            if client_certs:        # mutual TLS: certs.d also gets client.cert/.key
                ccrt, ckey = make_cert(self.directory, ca, "client", client=True)
                shutil.copy(ccrt, os.path.join(self.certs_dir, self.host, "client.cert"))
                shutil.copy(ckey, os.path.join(self.certs_dir, self.host, "client.key"))
                lines += ["    clientcas:", f"      - {ca[0]}"]
        if self.users:
            htpasswd = os.path.join(self.directory, "htpasswd")
            for i, (user, password) in enumerate(self.users.items()):
                args = ["htpasswd", "-B", "-b"] + (["-c"] if i == 0 else [])
                _run(*args, htpasswd, user, password)
            lines += ["auth:", "  htpasswd:", "    realm: test-realm", f"    path: {htpasswd}"]
        elif token is not None:
            lines += ["auth:", "  token:", f"    realm: {token.realm}",
                      f"    service: {token.SERVICE}", f"    issuer: {token.ISSUER}",
                      f"    rootcertbundle: {token.ca[0]}"]
        self.config = os.path.join(self.directory, "config.yml")
        self._config_text = "\n".join(lines) + "\n"
        self._write_config()
        self._started = False
        if start:
            self.start()

    def _write_config(self):
        with open(self.config, "w") as f:
            f.write(self._config_text.replace("  addr: ADDR", f"  addr: {self.host}"))

    def _move_to_another_port(self):
        old = self.host
        self.port = free_port()
        if self.certs_dir:
            os.rename(os.path.join(self.certs_dir, old), os.path.join(self.certs_dir, self.host))
        self._write_config()

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self):
        """Start the registry and wait until it listens.

        The port was free when chosen, but a concurrent process may bind it before
        docker-registry does: the first start then moves to another port (a restart
        keeps its port, which the clients know)."""
        for attempt in range(5):
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen([REGISTRY_BIN, "serve", self.config], stdout=log,
                                             stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                _wait_port(self.port, self.proc, log=self.log)
                break
            except RuntimeError as exc:
                if self._started or attempt == 4 or "address already in use" not in str(exc):
                    raise
                self._move_to_another_port()
        self._started = True

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self.token is not None:
            self.token.stop()

    def kill(self):
        """SIGKILL the registry (the port then refuses connections)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)

    def freeze(self):
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def registries_conf(self, directory, insecure=None, extra=""):
        """Write a registries.conf naming this registry; returns its path."""
        insecure = (not self.tls) if insecure is None else insecure
        path = os.path.join(directory, f"registries-{self.port}.conf")
        with open(path, "w") as f:
            f.write(f'[[registry]]\nlocation = "{self.host}"\n'
                    f'insecure = {"true" if insecure else "false"}\n{extra}')
        return path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# -- misbehaving proxy ----------------------------------------------------

_BLOB_RE = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
REDIRECT_PREFIX = "/_storage"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forwards every request to ``server.owner.upstream`` (a ``Proxy``) after
    ``_route``; blob bodies get the owner's flipped byte and cut, paced by ``_pace``."""

    protocol_version = "HTTP/1.1"
    block_size = 65536          # body bytes relayed (and paced, altered) at a time

    def log_message(self, *args):
        pass

    def _record(self, status):
        p = self.server.owner
        with p.lock:
            p.log.append((self.command, self.path, self.headers.get("Range"), status))

    def _simple(self, status, headers=None, body=b""):
        self._record(status)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _route(self, p, headers):
        """``(upstream path, headers, is_blob)``, or None when already answered."""
        path = self.path
        plain = path.split("?")[0]
        is_blob = self.command in ("GET", "HEAD") and _BLOB_RE.match(plain)
        if path.startswith(REDIRECT_PREFIX):
            path = path[len(REDIRECT_PREFIX):].split("?")[0]
            is_blob = True
            headers.pop("Authorization", None)
        elif is_blob and p.redirect_blobs and self.command == "GET":
            sep = "?" if p.redirect_query else ""
            self._simple(307, {"Location": REDIRECT_PREFIX + plain + sep + p.redirect_query})
            return None
        rng = headers.get("Range") or headers.get("range")
        if is_blob and rng:
            if p.ignore_range:
                headers = {k: v for k, v in headers.items() if k.lower() != "range"}
            elif "," in rng and p.multirange != "pass":
                if p.multirange == "200":
                    headers = {k: v for k, v in headers.items() if k.lower() != "range"}
                else:
                    self._simple(int(p.multirange))
                    return None
        return path, headers, is_blob

    def _cut_after(self, p):
        """Body bytes after which this blob answer is cut off (None: not cut)."""
        with p.lock:
            if p.truncate > 0:
                p.truncate -= 1
                return p.truncate_at
        return None

    def _pace(self, p, n):
        """Called before ``n`` blob body bytes are sent."""

    def _handle(self):
        p = self.server.owner
        if p.latency:
            time.sleep(p.latency)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "keep-alive")}
        route = self._route(p, headers)
        if route is None:
            return
        path, headers, is_blob = route
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(p.upstream, timeout=30)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
        except OSError:
            conn.close()
            return self._simple(502)
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
        chunked = resp.getheader("Content-Length") is None and self.command != "HEAD" \
            and resp.status not in (204, 304)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.command == "HEAD":
            return
        blob_body = is_blob and resp.status in (200, 206)
        flippable = blob_body and "multipart" not in (resp.getheader("Content-Type") or "")
        cut = self._cut_after(p) if blob_body else None
        cr = _RANGE_RE.match(resp.getheader("Content-Range") or "")
        pos = int(cr.group(1)) if cr else 0
        sent = 0
        flipped = False
        while True:
            block = resp.read(self.block_size)
            if not block:
                break
            flip = p.flip_byte if flippable else None
            if flip is not None and pos <= flip < pos + len(block):
                i = flip - pos
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
            if blob_body:
                self._pace(p, len(block))
            pos += len(block)
            sent += len(block)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            with p.lock:
                p.bytes_sent += len(block)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        if flipped:
            with p.lock:
                p.faults += 1

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle


class Proxy(_ThreadedServer):
    """An HTTP proxy in front of a plain-HTTP registry.

    ``latency``: seconds slept before each request is forwarded.
    ``multirange``: "pass" | "416" | "400" | "200" (answer multi-range GETs with
    that status; "200" sends the whole blob).  ``ignore_range``: drop Range
    headers so every blob GET gets a 200.  ``redirect_blobs``: answer blob GETs
    with 307 to ``/_storage/...`` on the proxy itself (served without auth).
    ``flip_byte``: blob offset whose byte is inverted in any answer covering it.
    ``truncate``: number of blob answers (from now) cut off after ``truncate_at``
    body bytes and the connection closed, as when a registry dies mid-answer.
    ``log``: list of ``(method, path, range_header, status)``; ``bytes_sent``:
    body bytes relayed; ``faults``: answers with a flipped byte or cut off.

    Subclasses change the routing with their own ``handler`` (a subclass of
    ``_ProxyHandler``); the forwarding, logging and body faults are shared.
    """

    handler = _ProxyHandler

    def __init__(self, upstream, latency=0.0, multirange="pass", ignore_range=False,
                 redirect_blobs=False, flip_byte=None, redirect_query="", truncate=0,
                 truncate_at=10):
        self.upstream = upstream
        self.latency = latency
        self.multirange = multirange
        self.ignore_range = ignore_range
        self.redirect_blobs = redirect_blobs
        self.redirect_query = redirect_query
        self.flip_byte = flip_byte
        self.truncate = truncate
        self.truncate_at = truncate_at
        self.log = []
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.faults = 0
        self._serve(self.handler)

    def requests(self, method=None, kind=None):
        """Logged requests, optionally only ``method`` and blob/redirect ones."""
        out = []
        for entry in list(self.log):
            if method and entry[0] != method:
                continue
            if kind == "blob" and not (_BLOB_RE.match(entry[1].split("?")[0])
                                       or entry[1].startswith(REDIRECT_PREFIX)):
                continue
            out.append(entry)
        return out

    def clear(self):
        with self.lock:
            self.log.clear()
            self.bytes_sent = 0


# -- pushing test images --------------------------------------------------

def push_image(client, reference, layers, config=None, layer_annotations=None,
               media_type="application/vnd.oci.image.manifest.v1+json", diff_ids=None,
               layer_media_type="application/vnd.oci.image.layer.v1.tar+gzip"):
    """Push ``layers`` (list of bytes or paths) with a minimal config; returns the
    manifest digest.  ``layer_annotations``: list of dicts (or None) per layer;
    ``diff_ids``: the real ones (e.g. ``convert(...).diff_id``) when the image
    will be run; otherwise placeholders are written."""
    import hashlib
    layer_descs = []
    placeholders = []
    for i, blob in enumerate(layers):
        data = blob if isinstance(blob, bytes) else open(blob, "rb").read()
        digest = client.push_blob(reference, data)
        desc = {"mediaType": layer_media_type,
                "digest": digest, "size": len(data)}
        if layer_annotations and layer_annotations[i]:
            desc["annotations"] = layer_annotations[i]
        layer_descs.append(desc)
        placeholders.append("sha256:" + hashlib.sha256(data).hexdigest())   # not a diffID
    config = config or {"architecture": "amd64", "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": list(diff_ids or placeholders)},
                        "config": {}}
    cfg = json.dumps(config).encode()
    cfg_digest = client.push_blob(reference, cfg)
    manifest = {"schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cfg_digest, "size": len(cfg)},
                "layers": layer_descs}
    return client.push_manifest(reference, manifest)
