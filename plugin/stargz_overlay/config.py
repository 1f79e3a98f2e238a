"""Plugin configuration: ``/etc/stargz-overlay/config.toml`` and its defaults.

The file is found, in this order, at the path named by a layer's DATA (its
``config`` field), at ``$STARGZ_OVERLAY_CONFIG``, or at the default path; a
missing default file means all defaults.  Keys (all optional; names follow
containerd's stargz-snapshotter where it has the same knob; sizes are bytes
or strings such as ``"16MiB"``)::

    cache_dir = "/var/lib/stargz-overlay/cache"   # content-addressed file cache
    log_file = "/var/log/stargz-overlay/plugin.log"
    log_level = "info"          # debug, info, warning, error
    log_reads = false           # log every blob read (offset, length): tests, debugging
    log_calls = false           # log every plugin callback with its arguments (debug level)
    record_file = ""            # append every open/stat/readlink, per layer, to this file
                                # (``convert --optimize`` records a workload this way)
    fsync = false               # fdatasync cache files before publishing them (cached
                                # files are re-hashed on first use by each mount anyway)
    noprefetch = false          # no prefetch of prioritized files (.prefetch.landmark)
    prefetch_size = 0           # layers without a landmark: prefetch this much of the head
    prefetch_timeout_sec = 10.0 # an open waits this long for an in-flight prefetch
    no_background_fetch = false # never fetch the rest of a layer in the background
    max_concurrency = 8         # connections per registry host (all fetches together)
    metrics_dir = "/run/stargz-overlay/metrics"   # <pid>.json and <pid>.prom per daemon
    metrics_period_sec = 10.0   # how often they are rewritten
    no_prometheus = false       # write only the .json, no .prom text file

    [blob]
    max_retries = 2             # retries of a failed request (after the first attempt)
    fetching_timeout_sec = 120.0  # seconds for one request including its retries
    min_wait_msec = 250         # first retry delay (doubles each retry)

    [background_fetch]
    silence_period_msec = 2000  # quiet time after foreground fetches before it (re)starts
    bandwidth_share = 0.5       # at most this share of the link rate measured by
                                # foreground fetches (0 = no share limit)
    max_rate_mbit = 0.0         # absolute cap in Mbit/s (0 = none)
    concurrency = 1             # parallel background requests per mount
    span_size = "16MiB"         # blob bytes per background request

    [directory_cache]
    max_size = "10GiB"          # evict unused content beyond this (0 = only when full)
    gc_interval_sec = 300.0     # how often a mount checks the size

    [registry]
    connect_timeout = 10.0      # seconds
    read_timeout = 30.0         # seconds without progress on a request
    insecure = []               # "host:port" reached over plain HTTP (or unverified TLS)
    registries_conf = ""        # "" = $CONTAINERS_REGISTRIES_CONF or the system file
    auth_file = ""              # containers-auth.json; "" = the usual search path
    certs_dir = ""              # certs.d directory; "" = the usual ones
    retries = 3                 # older spelling of [blob] max_retries + 1 (attempts)
    deadline = 120.0            # older spelling of [blob] fetching_timeout_sec

Relative paths are taken relative to the configuration file's directory.
Unknown keys are an error, so a typo never silently falls back to a default.
"""

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass

from .errors import ConfigError

DEFAULT_PATH = "/etc/stargz-overlay/config.toml"
ENV_VAR = "STARGZ_OVERLAY_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1 << 30, "t": 1000 ** 4,
          "tb": 1000 ** 4, "tib": 1 << 40}


class Size(int):
    """A byte count; in the file an integer or a string such as "16MiB" or "1.5GB"."""


def parse_size(value, what="size"):
    """Bytes for ``value`` (int, or a string with an optional unit); ConfigError if bad."""
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{what} must be a number of bytes or a size like \"10GiB\", "
                      f"not {value!r}")


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
    backoff: float = 0.25


@dataclass
class BlobConfig:
    max_retries: int = 2
    fetching_timeout_sec: float = 120.0
    min_wait_msec: int = 250


@dataclass
class BackgroundFetchConfig:
    silence_period_msec: int = 2000
    bandwidth_share: float = 0.5
    max_rate_mbit: float = 0.0
    concurrency: int = 1
    span_size: Size = Size(16 << 20)


@dataclass
class DirectoryCacheConfig:
    max_size: Size = Size(10 << 30)
    gc_interval_sec: float = 300.0


@dataclass
class Config:
    cache_dir: str = "/var/lib/stargz-overlay/cache"
    log_file: str = "/var/log/stargz-overlay/plugin.log"
    log_level: str = "info"
    log_reads: bool = False
    log_calls: bool = False
    record_file: str = ""
    fsync: bool = False
    noprefetch: bool = False
    prefetch_size: Size = Size(0)
    prefetch_timeout_sec: float = 10.0
    no_background_fetch: bool = False
    max_concurrency: int = 8
    metrics_dir: str = "/run/stargz-overlay/metrics"
    metrics_period_sec: float = 10.0
    no_prometheus: bool = False
    blob: BlobConfig = field(default_factory=BlobConfig)
    background_fetch: BackgroundFetchConfig = field(default_factory=BackgroundFetchConfig)
    directory_cache: DirectoryCacheConfig = field(default_factory=DirectoryCacheConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    path: str = ""            # the file this came from, "" for defaults
    given: set = field(default_factory=set)   # "table.key" names set by the file

    @property
    def prefetch(self):
        return not self.noprefetch

    @property
    def background(self):
        return not self.no_background_fetch


_TYPES = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,)}


_HIDDEN = ("path", "given")
_RENAMED = {"prefetch": "noprefetch = false|true (the opposite of the old prefetch key)",
            "registry.backoff": "[blob] min_wait_msec"}


def _apply(obj, table, where, given, prefix=""):
    known = {f.name: f for f in fields(obj) if f.name not in _HIDDEN}
    for key, value in table.items():
        f = known.get(key)
        if f is None or prefix + key in _RENAMED:
            hint = _RENAMED.get(prefix + key)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f"; use {hint}" if hint else ""))
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table")
            _apply(current, value, f"{where} [{key}]", given, f"{key}.")
            continue
        kind = type(current)
        if kind is Size:
            setattr(obj, key, Size(parse_size(value, key)))
        elif type(value) not in _TYPES[kind]:
            raise ConfigError(f"{where}: {key} must be a {kind.__name__}")
        else:
            setattr(obj, key, kind(value))
        given.add(prefix + key)


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
    _apply(config, table, path, config.given)
    config.path = path
    return finish(config, os.path.dirname(path))


def finish(config, base=None):
    """Check values and make every path absolute."""
    base = base or os.getcwd()
    config.cache_dir = _resolve(base, config.cache_dir)
    config.log_file = _resolve(base, config.log_file)
    config.metrics_dir = _resolve(base, config.metrics_dir)
    config.record_file = _resolve(base, config.record_file)
    for key in ("registries_conf", "auth_file", "certs_dir"):
        setattr(config.registry, key, _resolve(base, getattr(config.registry, key)))
    if not config.cache_dir:
        raise ConfigError("cache_dir must not be empty")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    reg = config.registry
    blob = config.blob
    for old, new in (("registry.retries", "blob.max_retries"),
                     ("registry.deadline", "blob.fetching_timeout_sec")):
        if old in config.given and new in config.given:
            raise ConfigError(f"give either [{old.replace('.', '] ')} or "
                              f"[{new.replace('.', '] ')}, not both")
    if "registry.retries" not in config.given:
        reg.retries = blob.max_retries + 1
    if "registry.deadline" not in config.given:
        reg.deadline = blob.fetching_timeout_sec
    reg.backoff = blob.min_wait_msec / 1000.0
    if reg.connect_timeout <= 0 or reg.read_timeout <= 0 or reg.deadline <= 0:
        raise ConfigError("registry timeouts must be positive")
    if reg.retries < 1 or blob.max_retries < 0:
        raise ConfigError("registry retries must be at least 1 ([blob] max_retries at least 0)")
    if blob.min_wait_msec < 0:
        raise ConfigError("[blob] min_wait_msec must not be negative")
    bg = config.background_fetch
    if bg.concurrency < 1 or config.max_concurrency < 1:
        raise ConfigError("max_concurrency and [background_fetch] concurrency must be at least 1")
    if not 0 <= bg.bandwidth_share <= 1 or bg.max_rate_mbit < 0 or bg.silence_period_msec < 0:
        raise ConfigError("[background_fetch] bandwidth_share must be within 0..1, "
                          "max_rate_mbit and silence_period_msec not negative")
    if bg.span_size < 64 << 10:
        raise ConfigError("[background_fetch] span_size must be at least 64KiB")
    if config.prefetch_timeout_sec < 0 or config.metrics_period_sec <= 0 \
            or config.directory_cache.gc_interval_sec <= 0:
        raise ConfigError("prefetch_timeout_sec, metrics_period_sec and [directory_cache] "
                          "gc_interval_sec must be positive")
    if not all(isinstance(h, str) for h in reg.insecure):
        raise ConfigError("registry insecure must be a list of \"host:port\" strings")
    return config
