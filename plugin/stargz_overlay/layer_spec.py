"""The DATA field of a plugin lower layer: which stargz blob a layer is.

fuse-overlayfs takes a plugin layer as ``//stargz/DATA/PATH``; DATA may not
contain ``/``, ``:`` or ``,``.  DATA is the base64url encoding, without
padding, of a compact JSON object (alphabet ``A-Z a-z 0-9 - _`` only)::

    {"kind": "blob", "path": "/abs/layer.blob", "toc": "sha256:..."}
    {"kind": "registry", "ref": "127.0.0.1:5000/app:1", "digest": "sha256:...",
     "toc": "sha256:...", "size": 1234}

- ``kind``: ``blob`` (a local file) or ``registry`` (a layer blob of an image);
  ``store`` (the Additional Layer Store namespace) and ``store-layer`` (a registry
  layer mounted for Podman/CRI-O) are served by ``store_view`` (``path`` = the
  store's absolute state directory).
- ``path`` (blob): absolute path of the blob file.
- ``ref`` (registry): image reference naming the repository (tag or digest).
- ``digest`` (registry, required; blob, optional): the layer blob's digest.
- ``toc`` (optional): the TOC digest (the ``containerd.io/snapshot/stargz/toc.digest``
  annotation); when given, a TOC that differs fails the mount.  Registry layers
  without it take it from the image manifest's annotations.
- ``size`` (optional): blob size in bytes (saves a request).
- ``toc_offset`` (optional, int) and ``format`` (optional, ``estargz`` or ``stargz``):
  what the blob's footer says (the store records them at pull).  With ``toc`` and
  both of these, a TOC kept in the content cache under its digest is used and
  neither the footer nor the TOC is read from the registry (``toc_cache``).
- ``config`` (optional): absolute path of the configuration file to use.

PATH is a private directory of the layer (the skeleton tree lives there).
"""

import base64
import json
import re

from .errors import StargzError

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
KINDS = ("blob", "registry", "store", "store-layer")
FORMATS = ("estargz", "stargz")
_FIELDS = {"kind", "path", "ref", "digest", "toc", "size", "config", "toc_offset", "format"}


class LayerSpecError(StargzError):
    """A plugin layer's DATA is malformed."""


class LayerSpec:
    """One stargz layer, as named by a plugin lowerdir's DATA."""

    __slots__ = ("kind", "path", "ref", "digest", "toc", "size", "config", "toc_offset",
                 "format")

    def __init__(self, kind, path=None, ref=None, digest=None, toc=None, size=None,
                 config=None, toc_offset=None, format=None):  # noqa: A002 - the DATA key
        self.kind = kind
        self.path = path
        self.ref = ref
        self.digest = digest
        self.toc = toc
        self.size = size
        self.config = config
        self.toc_offset = toc_offset
        self.format = format
        self.check()

    def check(self):
        if self.kind not in KINDS:
            raise LayerSpecError(f"unknown layer kind {self.kind!r} (expected one of "
                                 f"{', '.join(KINDS)})")
        if self.kind == "blob" and not (isinstance(self.path, str) and self.path.startswith("/")):
            raise LayerSpecError("a blob layer needs an absolute \"path\"")
        if self.kind in ("store", "store-layer") and not (isinstance(self.path, str)
                                                          and self.path.startswith("/")):
            raise LayerSpecError(f"a {self.kind} layer needs the store's absolute state "
                                 f"directory as \"path\"")
        if self.kind in ("registry", "store-layer"):
            if not isinstance(self.ref, str) or not self.ref:
                raise LayerSpecError("a registry layer needs a \"ref\"")
            if self.digest is None:
                raise LayerSpecError("a registry layer needs the layer \"digest\"")
        for name in ("digest", "toc"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and DIGEST_RE.match(value)):
                raise LayerSpecError(f"{name} {value!r} is not a sha256:<64 hex> digest")
        if self.size is not None and (type(self.size) is not int or self.size < 0):
            raise LayerSpecError("size must be a non-negative integer")
        if self.toc_offset is not None and (type(self.toc_offset) is not int
                                            or self.toc_offset < 0):
            raise LayerSpecError("toc_offset must be a non-negative integer")
        if self.format is not None and self.format not in FORMATS:
            raise LayerSpecError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.config is not None and not (isinstance(self.config, str)
                                            and self.config.startswith("/")):
            raise LayerSpecError("config must be an absolute path")

    def to_dict(self):
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}

    def describe(self):
        """A short human-readable name for messages."""
        if self.kind == "blob":
            return f"blob {self.path}"
        if self.kind == "store":
            return f"layer store {self.path}"
        return f"{self.ref} layer {self.digest}"

    def __eq__(self, other):
        return isinstance(other, LayerSpec) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"LayerSpec({self.to_dict()!r})"


def encode(spec):
    """DATA for ``spec``: base64url(JSON) without padding."""
    text = json.dumps(spec.to_dict(), separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("=")


def decode(data):
    """The LayerSpec encoded in DATA; LayerSpecError if it is not one."""
    if isinstance(data, bytes):
        data = data.decode("ascii", "replace")
    if not data or not re.fullmatch(r"[A-Za-z0-9_-]+", data):
        raise LayerSpecError(f"layer DATA {data[:40]!r} is not base64url text")
    try:
        raw = base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise LayerSpecError(f"layer DATA {data[:40]!r} does not decode to JSON") from None
    if not isinstance(doc, dict):
        raise LayerSpecError("layer DATA is not a JSON object")
    unknown = set(doc) - _FIELDS
    if unknown:
        raise LayerSpecError(f"layer DATA has unknown fields: {', '.join(sorted(unknown))}")
    kind = doc.pop("kind", None)
    return LayerSpec(kind, **doc)
