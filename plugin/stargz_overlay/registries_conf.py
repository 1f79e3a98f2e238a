"""``registries.conf`` (v2, and the old v1 tables) with its ``.conf.d`` drop-ins.

What is used: ``unqualified-search-registries``, ``short-name-mode``,
``[aliases]``, and ``[[registry]]`` tables with ``prefix``, ``location``,
``insecure``, ``blocked``, ``mirror-by-digest-only`` and
``[[registry.mirror]]`` (``location``, ``insecure``, ``pull-from-mirror``).
Drop-ins are read in name order; a later ``[[registry]]`` with the same
prefix replaces the earlier one, a later search list replaces the earlier.
"""

import glob
import os
import tomllib
from dataclasses import dataclass, field

from .errors import ConfigError, InvalidReference, RegistryError
from .reference import DOCKER_IO, parse_reference

SYSTEM_CONF = "/etc/containers/registries.conf"
SYSTEM_DROPIN_DIR = "/etc/containers/registries.conf.d"
ENV_CONF = "CONTAINERS_REGISTRIES_CONF"


@dataclass
class Mirror:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"      # "all" | "digest-only" | "tag-only"


@dataclass
class RegistryEntry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: list = field(default_factory=list)


@dataclass(frozen=True)
class PullSource:
    """One place to try: a rewritten reference and whether TLS may be skipped."""

    reference: object       # reference.Reference (qualified)
    insecure: bool = False
    mirror: bool = False

    @property
    def registry(self):
        return self.reference.registry


def _bool(table, key, where):
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false")
    return value


def _str(table, key, where, default=""):
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value


def _check_location(location, where):
    if "://" in location:
        raise ConfigError(f"{where}: location {location!r} must not contain a scheme")
    return location.rstrip("/")


def _parse_registry(table, where):
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [[registry]] must be a table")
    location = _check_location(_str(table, "location", where), where)
    prefix = _str(table, "prefix", where) or location
    if not prefix:
        raise ConfigError(f"{where}: [[registry]] needs a prefix or a location")
    if prefix.startswith("*."):
        if location:
            raise ConfigError(f"{where}: wildcard prefix {prefix!r} cannot have a location")
        if "/" in prefix:
            raise ConfigError(f"{where}: wildcard prefix {prefix!r} must be a host name")
    elif not location:
        location = prefix
    mirrors = []
    for i, m in enumerate(table.get("mirror", []) or []):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: mirror {i} of {prefix!r} must be a table")
        pull = _str(m, "pull-from-mirror", where, "all") or "all"
        if pull not in ("all", "digest-only", "tag-only"):
            raise ConfigError(f"{where}: pull-from-mirror must be all, digest-only or tag-only")
        loc = _check_location(_str(m, "location", where), where)
        if not loc:
            raise ConfigError(f"{where}: mirror {i} of {prefix!r} has no location")
        mirrors.append(Mirror(loc, _bool(m, "insecure", where), pull))
    return RegistryEntry(prefix, location, _bool(table, "insecure", where),
                         _bool(table, "blocked", where),
                         _bool(table, "mirror-by-digest-only", where), mirrors)


def _prefix_match_len(prefix, ref_text, host):
    """Length of the match of ``prefix`` against a reference string, or -1."""
    if prefix.startswith("*."):
        return len(prefix) if host.split(":")[0].endswith(prefix[1:]) else -1
    if ref_text == prefix:
        return len(prefix)
    if ref_text.startswith(prefix) and ref_text[len(prefix)] in "/:@":
        return len(prefix)
    return -1


class RegistriesConf:
    """The merged configuration; ``sources(ref)`` says where to pull from."""

    def __init__(self):
        self.search = []               # unqualified-search-registries
        self.short_name_mode = "enforcing"
        self.aliases = {}
        self.registries = {}           # prefix -> RegistryEntry (insertion order kept)
        self.files = []                # files that were read

    # -- loading ---------------------------------------------------------
    @classmethod
    def load(cls, path=None, dropin_dir=None):
        """Read the config the way Podman does.

        With no arguments: ``$CONTAINERS_REGISTRIES_CONF`` or the system file, plus
        the system drop-in directory.  With ``path``: that file, plus
        ``dropin_dir`` if given (so tests are independent of the machine).
        """
        conf = cls()
        if path is None:
            path = os.environ.get(ENV_CONF) or SYSTEM_CONF
            if dropin_dir is None:
                dropin_dir = SYSTEM_DROPIN_DIR
        conf.merge_file(path, missing_ok=True)
        if dropin_dir:
            for dropin in sorted(glob.glob(os.path.join(glob.escape(dropin_dir), "*.conf"))):
                conf.merge_file(dropin, missing_ok=True)
        return conf

    @classmethod
    def from_text(cls, text, where="<string>"):
        conf = cls()
        conf.merge_text(text, where)
        return conf

    def merge_file(self, path, missing_ok=False):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if missing_ok:
                return
            raise ConfigError(f"{path}: no such file") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        self.merge_text(data.decode("utf-8", "replace"), path)
        self.files.append(path)

    def merge_text(self, text, where):
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{where}: invalid TOML: {exc}") from None
        v1 = doc.get("registries")
        v2_keys = {"registry", "unqualified-search-registries", "aliases", "short-name-mode"}
        if v1 is not None and v2_keys & doc.keys():
            raise ConfigError(f"{where}: mixes the v1 [registries.*] tables with v2 keys")
        if v1 is not None:
            self._merge_v1(v1, where)
            return
        if "unqualified-search-registries" in doc:
            search = doc["unqualified-search-registries"]
            if not isinstance(search, list) or not all(isinstance(s, str) for s in search):
                raise ConfigError(f"{where}: unqualified-search-registries must be a list "
                                  f"of strings")
            for s in search:
                if "/" in s or "://" in s:
                    raise ConfigError(f"{where}: unqualified search registry {s!r} must be "
                                      f"a host[:port]")
            self.search = list(search)
        if "short-name-mode" in doc:
            mode = doc["short-name-mode"] or "enforcing"
            if mode not in ("enforcing", "permissive", "disabled"):
                raise ConfigError(f"{where}: short-name-mode must be enforcing, permissive "
                                  f"or disabled")
            self.short_name_mode = mode
        aliases = doc.get("aliases", {})
        if not isinstance(aliases, dict):
            raise ConfigError(f"{where}: [aliases] must be a table")
        for name, value in aliases.items():
            if not isinstance(value, str):
                raise ConfigError(f"{where}: alias {name!r} must be a string")
            self.aliases[name] = value
        registries = doc.get("registry", [])
        if not isinstance(registries, list):
            raise ConfigError(f"{where}: registry must be an array of tables ([[registry]])")
        for table in registries:
            entry = _parse_registry(table, where)
            self.registries.pop(entry.prefix, None)
            self.registries[entry.prefix] = entry

    def _merge_v1(self, v1, where):
        def hosts(name):
            table = v1.get(name, {})
            value = table.get("registries", []) if isinstance(table, dict) else None
            if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
                raise ConfigError(f"{where}: [registries.{name}] registries must be a list")
            return value
        search = hosts("search")
        if search:
            self.search = list(search)
        for host, attr in [(h, "insecure") for h in hosts("insecure")] + \
                          [(h, "blocked") for h in hosts("block")]:
            entry = self.registries.get(host) or RegistryEntry(host, host)
            setattr(entry, attr, True)
            self.registries[host] = entry

    # -- lookups ---------------------------------------------------------
    def find(self, ref):
        """The [[registry]] entry with the longest prefix matching ``ref``, or None."""
        text = str(ref)
        best, best_len = None, -1
        for entry in self.registries.values():
            n = _prefix_match_len(entry.prefix, text, ref.registry)
            if n > best_len:
                best, best_len = entry, n
        return best

    def is_insecure(self, host):
        entry = self.find(parse_reference(host + "/x"))
        return bool(entry and entry.insecure)

    def candidates(self, ref):
        """Qualified references to try for ``ref`` (a short name expands to several)."""
        if not ref.is_short:
            return [ref]
        alias = self.aliases.get(ref.repository)
        if alias is not None:
            return [ref.with_name(alias)]
        if not self.search:
            raise InvalidReference(
                f"short name {ref} did not resolve to an alias and no unqualified-search "
                f"registries are defined in registries.conf ({self._where()})")
        out = [ref.with_name(f"{reg}/{ref.repository}") for reg in self.search]
        if len(out) > 1 and self.short_name_mode == "enforcing":
            raise InvalidReference(
                f"short name {ref} is ambiguous ({', '.join(str(r) for r in out)}) and "
                f"short-name-mode is enforcing; use a fully qualified reference")
        return out

    def sources(self, ref):
        """Where to pull ``ref`` from: mirrors in order, then the primary location.

        Raises RegistryError if the matching registry is blocked.
        """
        entry = self.find(ref)
        if entry is None:
            return [PullSource(ref, False)]
        if entry.blocked:
            raise RegistryError(f"registry {entry.prefix} is blocked in registries.conf "
                                f"({self._where()})")
        text = str(ref)
        if entry.prefix.startswith("*."):
            return [PullSource(ref, entry.insecure)]
        rest = text[len(entry.prefix):]
        out = []
        pinned = ref.digest is not None
        for m in entry.mirrors:
            mode = "digest-only" if entry.mirror_by_digest_only else m.pull_from_mirror
            if (mode == "digest-only" and not pinned) or (mode == "tag-only" and pinned):
                continue
            out.append(PullSource(_rewrite(m.location, rest), m.insecure, mirror=True))
        out.append(PullSource(_rewrite(entry.location, rest), entry.insecure))
        return out

    def _where(self):
        return ", ".join(self.files) or "no registries.conf found"


def _rewrite(location, rest):
    ref = parse_reference(location + rest)
    if ref.is_short:
        raise ConfigError(f"registries.conf location {location!r} does not name a registry")
    return ref


__all__ = ["RegistriesConf", "PullSource", "RegistryEntry", "Mirror", "DOCKER_IO"]
