"""Registry credentials (Podman's auth files, credential helpers) and the
token/basic authorization flows.

Auth files, first match wins (containers/image order):
``$REGISTRY_AUTH_FILE`` (else ``$XDG_RUNTIME_DIR/containers/auth.json``, else
``/run/containers/$UID/auth.json``), ``$XDG_CONFIG_HOME/containers/auth.json``
(``~/.config``), ``$DOCKER_CONFIG/config.json`` (else ``~/.docker/config.json``),
``~/.dockercfg``.  In a file, ``credHelpers[host]`` wins, then ``auths`` (most
specific ``host/namespace`` key first), then ``credsStore``.  Helpers run as
``docker-credential-NAME get``.  Secrets never appear in messages or logs.
"""

import base64
import json
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

from .errors import AuthError, ConfigError
from .reference import DOCKER_IO

log = logging.getLogger(__name__)

DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io",
                   "https://index.docker.io/v1/")
HELPER_TIMEOUT = 30
TOKEN_MIN_LIFETIME = 1          # seconds; the server's expires_in is honoured above this
TOKEN_DEFAULT_LIFETIME = 60     # distribution spec default when expires_in is absent


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    identity_token: str | None = field(default=None, repr=False)
    origin: str = ""            # file or helper they came from (for messages)


def default_auth_files(env=None):
    """``[(path, legacy_format)]`` in the order Podman consults them."""
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append((env["REGISTRY_AUTH_FILE"], False))
    elif env.get("XDG_RUNTIME_DIR"):
        files.append((os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"), False))
    else:
        files.append((f"/run/containers/{os.getuid()}/auth.json", False))
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files.append((os.path.join(config_home, "containers", "auth.json"), False))
    docker_config = env.get("DOCKER_CONFIG")
    files.append((os.path.join(docker_config or os.path.join(home, ".docker"), "config.json"),
                  False))
    files.append((os.path.join(home, ".dockercfg"), True))
    return files


def _normalize_key(key):
    """``https://host/v1/`` -> ``host``; ``host/ns/repo`` stays (namespaced keys)."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
            host = key.split("/", 1)[0]
            return DOCKER_IO if host in DOCKER_HUB_KEYS else host
    key = key.rstrip("/")
    host, sep, rest = key.partition("/")
    if host in DOCKER_HUB_KEYS:
        host = DOCKER_IO
    return host + sep + rest


def _decode_auth(value, origin):
    try:
        text = base64.b64decode(value, validate=False).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{origin}: an \"auth\" value is not base64 of user:password") \
            from None
    user, sep, password = text.partition(":")
    if not sep:
        raise ConfigError(f"{origin}: an \"auth\" value is not base64 of user:password")
    return user, password


class AuthFiles:
    """Credential lookup over auth files and credential helpers."""

    def __init__(self, files=None, env=None):
        self.env = dict(os.environ if env is None else env)
        self.files = [(p, False) if isinstance(p, str) else tuple(p)
                      for p in (default_auth_files(self.env) if files is None else files)]
        self._cache = {}
        self._lock = threading.Lock()

    def describe(self):
        return ", ".join(p for p, _ in self.files)

    def lookup(self, registry, repository=""):
        """Credentials for ``registry`` (and ``repository``), or None."""
        key = (registry, repository)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._lookup(registry, repository)
            return self._cache[key]

    def _lookup(self, registry, repository):
        host = _normalize_key(registry)
        for path, legacy in self.files:
            doc = self._read(path)
            if doc is None:
                continue
            if legacy:
                auths = doc
                helpers, store = {}, None
            else:
                auths = doc.get("auths") or {}
                helpers = doc.get("credHelpers") or {}
                store = doc.get("credsStore")
            if not isinstance(auths, dict) or not isinstance(helpers, dict):
                raise ConfigError(f"{path}: \"auths\" and \"credHelpers\" must be objects")
            for name, helper in helpers.items():
                if _normalize_key(name) == host:
                    creds = self._from_helper(helper, registry)
                    if creds is not None:
                        return creds
            creds = self._from_auths(auths, host, repository, path)
            if creds is not None:
                return creds
            if store:
                creds = self._from_helper(store, registry)
                if creds is not None:
                    return creds
        return None

    def _read(self, path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read auth file {path}: {exc.strerror}") from None
        if not data.strip():
            return None
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"auth file {path} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"auth file {path} is not a JSON object")
        return doc

    def _from_auths(self, auths, host, repository, path):
        entries = {}
        for key, value in auths.items():
            entries.setdefault(_normalize_key(key), value)
        candidates = []
        if repository:
            parts = repository.split("/")
            candidates = [f"{host}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)]
        candidates.append(host)
        for cand in candidates:
            value = entries.get(cand)
            if not isinstance(value, dict):
                continue
            token = value.get("identitytoken") or None
            if value.get("auth"):
                user, password = _decode_auth(value["auth"], path)
                return Credentials(user, password, token, path)
            if value.get("username"):
                return Credentials(value["username"], value.get("password", ""), token, path)
            if token:
                return Credentials("", "", token, path)
        return None

    def _from_helper(self, helper, registry):
        program = f"docker-credential-{helper}"
        server = "https://index.docker.io/v1/" if registry == DOCKER_IO else registry
        try:
            proc = subprocess.run([program, "get"], input=server.encode(), capture_output=True,
                                  timeout=HELPER_TIMEOUT, env=self.env)
        except FileNotFoundError:
            raise AuthError(f"credential helper {program} (for {registry}) is not "
                            f"installed or not on PATH") from None
        except subprocess.TimeoutExpired:
            raise AuthError(f"credential helper {program} did not answer within "
                            f"{HELPER_TIMEOUT} s") from None
        out = proc.stdout.decode("utf-8", "replace").strip()
        if proc.returncode != 0:
            if "credentials not found" in out.lower() or "not found" in out.lower():
                return None
            msg = (out or proc.stderr.decode("utf-8", "replace")).strip().splitlines()
            raise AuthError(f"credential helper {program} failed for {registry}: "
                            f"{msg[0][:200] if msg else f'exit status {proc.returncode}'}")
        try:
            doc = json.loads(out)
            user, secret = doc["Username"], doc["Secret"]
        except (ValueError, KeyError, TypeError):
            raise AuthError(f"credential helper {program} gave an answer that is not "
                            f"the expected JSON") from None
        if user == "<token>":
            return Credentials("", "", secret, program)
        return Credentials(user, secret, None, program)


# -- WWW-Authenticate -----------------------------------------------------

def parse_challenges(header):
    """``WWW-Authenticate`` -> ``[(scheme_lower, {param: value})]``."""
    out = []
    i, n = 0, len(header or "")
    text = header or ""
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        start = i
        while i < n and text[i] not in " ,=":
            i += 1
        token = text[start:i]
        if not token:
            break
        if i < n and text[i] == "=":       # a parameter of the current challenge
            i += 1
            if i < n and text[i] == '"':
                i += 1
                value = []
                while i < n and text[i] != '"':
                    if text[i] == "\\" and i + 1 < n:
                        i += 1
                    value.append(text[i])
                    i += 1
                i += 1
                value = "".join(value)
            else:
                start = i
                while i < n and text[i] != ",":
                    i += 1
                value = text[start:i].strip()
            if out:
                out[-1][1][token.lower()] = value
        else:
            out.append((token.lower(), {}))
    return out


def scope_for(repository, actions=("pull",)):
    return f"repository:{repository}:{','.join(actions)}"


class _Token:
    __slots__ = ("value", "expires")

    def __init__(self, value, expires):
        self.value = value
        self.expires = expires


class HostAuth:
    """Authorization state for one registry host: scheme, credentials, tokens.

    ``http(method, url, **kw)`` performs one plain request (used for the
    token endpoint); ``credentials()`` returns Credentials or None.
    """

    def __init__(self, host, credentials, http, describe_files=""):
        self.host = host
        self._credentials = credentials
        self._http = http
        self._describe_files = describe_files
        self._lock = threading.Lock()
        self.scheme = None            # None (not challenged yet), "basic", "bearer"
        self.challenge = {}
        self._tokens = {}             # frozenset(scopes) -> _Token

    def headers(self, scopes):
        """Authorization header for a request needing ``scopes`` (may fetch a token)."""
        with self._lock:
            if self.scheme == "basic":
                creds = self._credentials()
                if creds is None:
                    return {}
                return {"Authorization": _basic(creds)}
            if self.scheme == "bearer":
                token = self._tokens.get(frozenset(scopes))
                if token is None or token.expires <= time.monotonic():
                    token = self._fetch_token(scopes)
                return {"Authorization": f"Bearer {token.value}"} if token.value else {}
            return {}

    def challenged(self, response, scopes, had_auth, what):
        """Handle a 401: learn the scheme, drop a stale token. Returns True to retry.

        Raises AuthError when retrying cannot help.
        """
        challenges = parse_challenges(response.headers.get("WWW-Authenticate", ""))
        with self._lock:
            known = dict(challenges)
            if "bearer" in known and known["bearer"].get("realm"):
                first_time = self.scheme != "bearer"
                self.scheme, self.challenge = "bearer", known["bearer"]
                stale = self._tokens.pop(frozenset(scopes), None)
                if first_time or (stale is not None and had_auth):
                    return True
                raise self._denied(what)
            if "basic" in known:
                first_time = self.scheme != "basic"
                self.scheme, self.challenge = "basic", known["basic"]
                if self._credentials() is None:
                    raise self._missing(what)
                if first_time or not had_auth:
                    return True
                raise AuthError(f"{self.host}: credentials "
                                f"{self._origin()}were rejected ({what})")
            raise AuthError(f"{self.host}: authentication required ({what}) with an "
                            f"unsupported scheme: {response.headers.get('WWW-Authenticate')!r}")

    def _origin(self):
        creds = self._credentials()
        return f"from {creds.origin} " if creds is not None and creds.origin else ""

    def _missing(self, what):
        return AuthError(f"{self.host}: authentication required for {what}; no credentials "
                         f"in any auth file (looked in {self._describe_files})")

    def denied(self, what):
        """The error for a request still refused after a fresh authorization."""
        with self._lock:
            return self._denied(what)

    def _denied(self, what):
        if self._credentials() is None:
            return self._missing(what)
        return AuthError(f"{self.host}: access denied for {what} with the credentials "
                         f"{self._origin()}(wrong credentials or no permission)")

    def _fetch_token(self, scopes):
        realm = self.challenge["realm"]
        service = self.challenge.get("service")
        creds = self._credentials()
        what = ", ".join(scopes) or "the registry"
        if creds is not None and creds.identity_token:
            data = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "stargz-overlay", "scope": " ".join(scopes)}
            if service:
                data["service"] = service
            resp = self._http("POST", realm, data=data)
        else:
            params = [("service", service)] if service else []
            params += [("scope", s) for s in scopes]
            headers = {"Authorization": _basic(creds)} if creds is not None else {}
            resp = self._http("GET", realm, params=params, headers=headers)
        try:
            if resp.status_code in (401, 403):
                if creds is None:
                    raise self._missing(what)
                raise AuthError(f"{self.host}: the token server {realm} rejected the "
                                f"credentials {self._origin()}for {what}")
            if resp.status_code != 200:
                raise AuthError(f"{self.host}: the token server {realm} answered "
                                f"HTTP {resp.status_code} for {what}")
            try:
                doc = resp.json()
            except ValueError:
                raise AuthError(f"{self.host}: the token server {realm} did not answer "
                                f"JSON") from None
        finally:
            resp.close()
        value = doc.get("token") or doc.get("access_token") or ""
        if not isinstance(value, str):
            raise AuthError(f"{self.host}: the token server {realm} gave a malformed token")
        try:
            lifetime = int(doc.get("expires_in") or TOKEN_DEFAULT_LIFETIME)
        except (TypeError, ValueError):
            lifetime = TOKEN_DEFAULT_LIFETIME
        lifetime = max(TOKEN_MIN_LIFETIME, lifetime)
        margin = min(10.0, lifetime / 10)
        token = _Token(value, time.monotonic() + lifetime - margin)
        self._tokens[frozenset(scopes)] = token
        log.debug("%s: token for %s valid %d s", self.host, what, lifetime)
        return token


def _basic(creds):
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()
