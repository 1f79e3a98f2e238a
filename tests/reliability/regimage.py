"""A test image in a real docker-registry, and plugin mounts of its layers.

``push_files(tmp, registry, files)`` converts ``{name: bytes}`` into one
eStargz layer, pushes it as ``rel/app:1`` and returns a ``PushedLayer`` with
everything a mount or a check needs (blob and TOC digests, file contents,
each file's blob range).  ``registry_config`` writes a plugin configuration
whose registry settings reach the given hosts over plain HTTP with short,
test-sized timeouts.
"""

import io
import os

from stargz_overlay.layer_spec import LayerSpec
from stargz_overlay.reader import StargzReader
from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import TOC_DIGEST_ANNOTATION, RegistryClient
from stargz_overlay.writer import convert

from ..format.tarbuild import TarBuilder
from ..plugin.fusehelp import plugin_lower
from ..registryfixture import push_image
from .helpers import plugin_config

# short enough for CI, long enough for a loaded machine; an unfetched open must
# fail within about DEADLINE seconds
TIMEOUTS = {"connect_timeout": 1.0, "read_timeout": 2.0, "retries": 2, "deadline": 6.0}
DEADLINE = TIMEOUTS["deadline"]


class _Mem:
    def __init__(self, data):
        self.data = data
        self.size = len(data)

    def read_at(self, offset, length):
        return self.data[offset:offset + length]


class PushedLayer:
    def __init__(self, ref, files, blob, result):
        self.ref = ref                          # "HOST:PORT/rel/app:1" (at the registry)
        self.files = files                      # {name: bytes}
        self.blob = blob
        self.digest = result.blob_digest
        self.toc = result.toc_digest
        toc = StargzReader(_Mem(blob)).toc
        self.ranges = {e.name: (e.chunks[0].offset, e.chunks[-1].end)
                       for e in toc.entries if e.type == "reg" and e.size}

    def ref_at(self, host):
        """The reference with its registry replaced by ``host`` (a proxy)."""
        return host + self.ref[self.ref.index("/"):]

    def spec(self, host, config):
        return LayerSpec("registry", ref=self.ref_at(host), digest=self.digest, toc=self.toc,
                         config=config)

    def lower(self, host, config, workdir):
        return plugin_lower(self.spec(host, config), workdir)

    def file_of(self, offset):
        """The file whose compressed bytes hold blob ``offset`` (or None)."""
        for name, (start, end) in self.ranges.items():
            if start <= offset < end:
                return name
        return None


def client_for(*hosts, auth_files=()):
    text = "".join(f'[[registry]]\nlocation = "{h}"\ninsecure = true\n' for h in hosts)
    return RegistryClient(registries_conf=RegistriesConf.from_text(text),
                          auth_files=list(auth_files), certs_dir=os.devnull)


def push_files(tmp, registry, files, repo="rel/app:1", chunk_size=4 << 20, auth_files=()):
    b = TarBuilder()
    dirs = sorted({os.path.dirname(n) for n in files if "/" in n})
    for d in dirs:
        b.dir(d)
    for name, data in files.items():
        b.file(name, data)
    out = io.BytesIO()
    result = convert(io.BytesIO(b.bytes()), out, chunk_size=chunk_size, compression_level=1)
    blob = out.getvalue()
    ref = f"{registry.host}/{repo}"
    with client_for(registry.host, auth_files=auth_files) as client:
        push_image(client, ref, [blob],
                   layer_annotations=[{TOC_DIGEST_ANNOTATION: result.toc_digest}])
    return PushedLayer(ref, files, blob, result)


def registry_config(directory, hosts, registry=None, **extra):
    """A plugin config for registry layers at ``hosts`` (plain HTTP, no auth files)."""
    os.makedirs(directory, exist_ok=True)
    empty_conf = os.path.join(directory, "registries.conf")
    with open(empty_conf, "w") as f:
        f.write("")
    auth = os.path.join(directory, "auth.json")
    if not os.path.exists(auth):
        with open(auth, "w") as f:
            f.write("{}")
    certs = os.path.join(directory, "certs.d")
    os.makedirs(certs, exist_ok=True)
    settings = {"insecure": list(hosts), "registries_conf": empty_conf, "auth_file": auth,
                "certs_dir": certs, **TIMEOUTS, **(registry or {})}
    return plugin_config(directory, registry=settings, **extra)
