"""Process-wide state of the plugin: configuration, log, cache and loaded layers.

Everything here runs first in fuse-overlayfs's pre-fork parent (plugin_load,
load_data_source), then in the daemon it forks.  So: no threads are started
at load; the log is a file opened by absolute path; load errors are printed
on stderr only while still in the loading process (the mount then fails).
"""

import logging
import os
import sys

from .cache import ContentCache
from .config import load_config
from .errors import StargzError
from .fetch_control import fetch_kind
from .layer_fetch import FetchContext, LayerFetch
from .layer_spec import decode
from .layer_view import LayerView

log = logging.getLogger("stargz_overlay.plugin")
LOG_FORMAT = "%(asctime)s %(process)d %(threadName)s %(levelname)s %(name)s: %(message)s"


class PluginState:
    def __init__(self):
        self.so_path = ""
        self.config = None
        self.cache = None
        self.views = {}          # slot id (>= 1, stored in ovl_layer) -> LayerView
        self.next_slot = 0
        self.load_pid = None
        self.daemon_pid = None
        self.log_path = None
        self._registry = None
        self.log_calls = False
        self.fetch = None        # FetchContext: metrics, limits, prefetch/background workers

    # -- set-up (pre-fork) --

    def plugin_load(self, opaque, path):
        spec = decode(opaque)
        self._setup(spec.config, path)

    def _setup(self, config_path, layer_path):
        if self.config is not None:
            return
        config = load_config(config_path)
        self._setup_logging(config, layer_path)
        self.cache = ContentCache(config.cache_dir, fsync=config.fsync,
                                  max_size=config.directory_cache.max_size)
        self.fetch = FetchContext(config, self.cache)
        self.config = config
        self.log_calls = config.log_calls
        self.load_pid = os.getpid()
        import stargz_overlay
        log.info("stargz-overlay plugin %s loaded in pid %d (package %s, config: %s)",
                 self.so_path, self.load_pid, os.path.dirname(stargz_overlay.__file__),
                 config.path or "defaults")

    def _setup_logging(self, config, layer_path):
        handler = None
        candidates = [config.log_file]
        if layer_path:
            candidates.append(os.path.join(os.path.realpath(layer_path), "plugin.log"))
        for candidate in candidates:
            try:
                os.makedirs(os.path.dirname(candidate), mode=0o700, exist_ok=True)
                # created private whatever the caller's umask: the log names images,
                # registries and paths (never credentials)
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                 0o600))
                handler = logging.FileHandler(candidate, encoding="utf-8")
                self.log_path = candidate
                break
            except OSError as exc:
                self._stderr(f"warning: cannot open log file {candidate}: {exc.strerror}")
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler or logging.NullHandler())
        if handler is not None:
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.setLevel(logging.INFO)
        logging.getLogger("stargz_overlay").setLevel(config.log_level.upper())
        logging.captureWarnings(True)

    def load_layer(self, opaque, path):
        """Load one layer: return (slot id for ovl_layer, O_DIRECTORY fd of its directory)."""
        spec = decode(opaque)
        self._setup(spec.config, path)
        if not path:
            raise StargzError(f"{spec.describe()}: the lowerdir needs a directory after DATA "
                              f"(//stargz/DATA//abs/dir)")
        workdir = os.path.realpath(path)     # the daemon runs with cwd "/"
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        slot = self.next_slot
        label = f"layer{slot}({spec.describe()})"
        if spec.kind in ("store", "store-layer"):   # Podman/CRI-O integration: store_view.py
            from .store_view import load_layer
            return load_layer(self, spec, workdir, label)   # store-layer: back through here
        layer_id = spec.digest or f"file:{spec.path}"
        try:
            reader = self._open_reader(spec, label, layer_id)
        except StargzError as exc:
            raise StargzError(f"cannot load {spec.describe()}: {exc}") from None
        view = LayerView(reader, workdir, self.cache, slot, label)
        try:
            LayerFetch(view, self.fetch, layer_id)
        except StargzError:
            view.close()
            raise
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.next_slot += 1
        self.views[slot + 1] = view
        log.info("%s: %s with %d entries, TOC %s, directory %s", label, reader.kind,
                 len(reader.toc.entries), reader.toc_digest, workdir)
        return slot + 1, fd

    def _open_reader(self, spec, label, layer_id=None):
        from .toc_cache import open_reader
        layer_id = layer_id or spec.digest or f"file:{spec.path}"
        if spec.kind == "blob":
            from .source import FileSource
            source = FileSource(spec.path)
            toc = spec.toc
        else:
            source, toc = self._registry_source(spec)
        metered = self.fetch.metered(source, layer_id, label, ref=spec.ref or spec.path or "")
        with fetch_kind("metadata"):
            reader = open_reader(metered, self.cache, toc, spec.toc_offset, spec.format, label)
        metered.loaded()
        return reader

    def _registry_source(self, spec):
        from . import registry_layers
        if self._registry is None:
            self._registry = registry_layers.PluginRegistry(self.config)
        return self._registry.open_layer(spec)

    def report_load_error(self, message):
        log.error("%s", message)
        self._stderr(f"error: {message}")

    def _stderr(self, message):
        # Only before the fork: afterwards stderr is /dev/null, and keeping the
        # caller's stderr is what must never happen.
        if self.load_pid is None or os.getpid() == self.load_pid:
            try:
                sys.stderr.write(f"stargz-overlay: {message}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    # -- running --

    def view(self, slot):
        return self.views[slot]

    def touch(self):
        """Called from the callbacks: notice the first call in the forked daemon.

        Workers (metrics writer, prefetch, background fetch) start there, never
        in the pre-fork parent: a thread started before fuse_daemonize()
        vanishes, or deadlocks the daemon if it holds the GIL at the fork.  (In
        foreground mode, -f, there is no fork to wait for, so there are no
        workers either.)
        """
        if self.daemon_pid is None and os.getpid() != self.load_pid:
            self.daemon_pid = os.getpid()
            log.info("serving in daemon pid %d", self.daemon_pid)
            self.fetch.start()

    def unload_layer(self, slot):
        view = self.views.pop(slot, None)
        if view is not None:
            log.info("%s: released (%d blob reads, %d bytes)", view.label,
                     view.reader.source.reads, view.reader.source.bytes)
            if view.fetch is not None:
                view.fetch.close()
            view.close()

    def release(self):
        log.info("plugin released; %d files fetched into the cache", self.cache.fetches
                 if self.cache else 0)
        if self.fetch is not None:
            self.fetch.close()
        for handler in logging.getLogger().handlers:
            handler.flush()


STATE = PluginState()
