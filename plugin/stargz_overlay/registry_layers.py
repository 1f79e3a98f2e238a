"""Registry-backed plugin layers: a RegistryClient from the plugin configuration and
the blob source and TOC digest of a registry layer.

The client is made on first use (``PluginRegistry``): its module imports
``requests`` (~75 ms), and a layer whose TOC is cached (``toc_cache``) and whose
size is known (as the store records them) is mounted without any request.
"""

import logging
import os
import threading

from .errors import StargzError

log = logging.getLogger("stargz_overlay.plugin")
_resolved = {}     # (client, reference) -> Image: one manifest fetch for all its layers
SCHEME_HINTS = "registry-schemes.json"


def registries_conf(config):
    """The RegistriesConf of ``config.registry`` (ConfigError if it is malformed)."""
    from .registries_conf import RegistriesConf
    reg = config.registry
    conf = RegistriesConf.load(reg.registries_conf or None)
    for host in reg.insecure:
        conf.merge_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n',
                        f"{config.path or 'plugin configuration'} (insecure)")
    return conf


def make_client(config, conf=None):
    """One RegistryClient for the whole plugin process, set up from ``config.registry``."""
    from .registry import RegistryClient
    reg = config.registry
    conf = conf or registries_conf(config)
    # the store and the mounts share cache_dir: what one process learns about a
    # plain-HTTP insecure registry spares the others a failed TLS handshake
    kwargs = {"scheme_hints": os.path.join(config.cache_dir, SCHEME_HINTS)}
    if reg.auth_file:
        kwargs["auth_files"] = [reg.auth_file]
    if reg.certs_dir:
        kwargs["certs_dir"] = reg.certs_dir
    return RegistryClient(registries_conf=conf, connect_timeout=reg.connect_timeout,
                          read_timeout=reg.read_timeout, retries=reg.retries,
                          deadline=reg.deadline, backoff=reg.backoff, **kwargs)


class PluginRegistry:
    """The plugin's RegistryClient, made on first use; the registries configuration
    is read (and checked) at once."""

    def __init__(self, config):
        self.config = config
        self.conf = registries_conf(config)
        self._client = None
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = make_client(self.config, self.conf)
            return self._client

    def open_layer(self, spec):
        """``open_layer``; with the TOC digest and the size known, before the client is
        made, the client waits for the first read."""
        if self._client is None and spec.toc is not None and spec.size is not None:
            return DeferredBlob(self, spec), spec.toc
        return open_layer(self.client, spec)


class DeferredBlob:
    """A registry blob source whose client is made on its first use beyond ``size``,
    ``reference`` (the first pull source, as the client would try) and ``close``."""

    def __init__(self, registry, spec):
        from .reference import parse_reference
        self._blob = None
        self._registry = registry
        self._spec = spec
        self._lock = threading.Lock()
        self.size = spec.size
        conf = registry.conf
        ref = parse_reference(spec.ref)
        self.reference = conf.sources(conf.candidates(ref)[0])[0].reference

    def _real(self):
        with self._lock:
            if self._blob is None:
                spec = self._spec
                self._blob = self._registry.client.blob_source(spec.ref, spec.digest, spec.size)
            return self._blob

    def __getattr__(self, name):       # read_at, read_ranges, open_range, client, ...
        return getattr(self._real(), name)

    def close(self):
        if self._blob is not None:
            self._blob.close()


def open_layer(client, spec):
    """``(source, toc_digest)`` for a registry LayerSpec.

    Without a TOC digest in DATA, the one annotated in the image manifest is used;
    a layer with none at all is served with a warning (its TOC is not pinned).
    """
    toc = spec.toc
    size = spec.size
    if toc is None:
        image = _resolved.get((id(client), spec.ref))
        if image is None:
            image = _resolved[(id(client), spec.ref)] = client.resolve(spec.ref)
        layer = next((x for x in image.layers if x.digest == spec.digest), None)
        if layer is None:
            raise StargzError(f"{spec.ref} has no layer {spec.digest}")
        toc = layer.toc_digest
        size = size if size is not None else layer.size
        if toc is None:
            log.warning("%s layer %s: no TOC digest annotation; the TOC is not verified",
                        spec.ref, spec.digest)
    return client.blob_source(spec.ref, spec.digest, size), toc

