"""Plugin configuration: ``/etc/stargz-overlay/config.toml`` and its defaults.

The file is found, in this order, at the path named by a layer's DATA (its
``config`` field), at ``$STARGZ_OVERLAY_CONFIG``, or at the default path; a
missing default file means all defaults.  Keys (all optional)::

    cache_dir = "/var/lib/stargz-overlay/cache"   # content-addressed file cache
    log_file = "/var/log/stargz-overlay/plugin.log"
    log_level = "info"          # debug, info, warning, error
    log_reads = false           # log every blob read (offset, length): tests, debugging
    log_calls = false           # log every plugin callback with its arguments (debug level)
    prefetch = true             # fetch prioritized files (before .prefetch.landmark) in the
                                # background once the daemon serves the mount
    fsync = false               # fdatasync cache files before publishing them (cached
                                # files are re-hashed on first use by each mount anyway)

    [registry]
    connect_timeout = 10.0      # seconds
    read_timeout = 30.0         # seconds without progress on a request
    retries = 3                 # attempts per request on transient errors
    deadline = 120.0            # seconds for one request including its retries
    insecure = []               # "host:port" reached over plain HTTP (or unverified TLS)
    registries_conf = ""        # "" = $CONTAINERS_REGISTRIES_CONF or the system file
    auth_file = ""              # containers-auth.json; "" = the usual search path
    certs_dir = ""              # certs.d directory; "" = the usual ones

Relative paths are taken relative to the configuration file's directory.
Unknown keys are an error, so a typo never silently falls back to a default.
"""

import os
import tomllib
from dataclasses import dataclass, field, fields

from .errors import ConfigError

DEFAULT_PATH = "/etc/stargz-overlay/config.toml"
ENV_VAR = "STARGZ_OVERLAY_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class RegistryConfig:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3
    deadline: float = 120.0
    insecure: list = field(default_factory=list)
    registries_conf: str = ""
    auth_file: str = ""
    certs_dir: str = ""


@dataclass
class Config:
    cache_dir: str = "/var/lib/stargz-overlay/cache"
    log_file: str = "/var/log/stargz-overlay/plugin.log"
    log_level: str = "info"
    log_reads: bool = False
    log_calls: bool = False
    prefetch: bool = True
    fsync: bool = False
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    path: str = ""            # the file this came from, "" for defaults


_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,)}


def _apply(obj, table, where):
    known = {f.name: f for f in fields(obj) if f.name != "path"}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{where}: unknown key {key!r}")
        if f.name == "registry":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [registry] must be a table")
            _apply(obj.registry, value, f"{where} [registry]")
            continue
        kind = type(getattr(obj, key))
        if type(value) not in _TYPES[kind]:
            raise ConfigError(f"{where}: {key} must be a {kind.__name__}")
        setattr(obj, key, kind(value))


def _resolve(base, value):
    if not value:
        return value
    value = os.path.expanduser(value)
    return os.path.normpath(os.path.join(base, value))


def load_config(path=None):
    """The configuration from ``path``, ``$STARGZ_OVERLAY_CONFIG`` or the default file."""
    explicit = path or os.environ.get(ENV_VAR) or ""
    path = os.path.abspath(explicit) if explicit else DEFAULT_PATH
    config = Config()
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"configuration file {path} does not exist") from None
        return finish(config)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    _apply(config, table, path)
    config.path = path
    return finish(config, os.path.dirname(path))


def finish(config, base=None):
    """Check values and make every path absolute."""
    base = base or os.getcwd()
    config.cache_dir = _resolve(base, config.cache_dir)
    config.log_file = _resolve(base, config.log_file)
    for key in ("registries_conf", "auth_file", "certs_dir"):
        setattr(config.registry, key, _resolve(base, getattr(config.registry, key)))
    if not config.cache_dir:
        raise ConfigError("cache_dir must not be empty")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    reg = config.registry
    if reg.connect_timeout <= 0 or reg.read_timeout <= 0 or reg.deadline <= 0:
        raise ConfigError("registry timeouts must be positive")
    if reg.retries < 1:
        raise ConfigError("registry retries must be at least 1")
    if not all(isinstance(h, str) for h in reg.insecure):
        raise ConfigError("registry insecure must be a list of \"host:port\" strings")
    return config
