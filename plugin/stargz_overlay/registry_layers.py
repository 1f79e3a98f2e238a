"""Registry-backed plugin layers: a RegistryClient from the plugin configuration."""

import logging

from .errors import StargzError

log = logging.getLogger("stargz_overlay.plugin")
_resolved = {}     # (client, reference) -> Image: one manifest fetch for all its layers


def make_client(config):
    """One RegistryClient for the whole plugin process, set up from ``config.registry``."""
    from .registries_conf import RegistriesConf
    from .registry import RegistryClient
    reg = config.registry
    conf = RegistriesConf.load(reg.registries_conf or None)
    for host in reg.insecure:
        conf.merge_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n',
                        f"{config.path or 'plugin configuration'} (insecure)")
    kwargs = {}
    if reg.auth_file:
        kwargs["auth_files"] = [reg.auth_file]
    if reg.certs_dir:
        kwargs["certs_dir"] = reg.certs_dir
    return RegistryClient(registries_conf=conf, connect_timeout=reg.connect_timeout,
                          read_timeout=reg.read_timeout, retries=reg.retries,
                          deadline=reg.deadline, backoff=reg.backoff, **kwargs)


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
