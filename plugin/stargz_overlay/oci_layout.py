"""OCI image layouts on disk (``oci:DIR[:TAG]``): read and write blobs and manifests."""

import json
import os
import re
import tempfile

from .digests import sha256_digest
from .errors import DigestMismatch, StargzError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


def parse_layout_spec(spec):
    """``oci:DIR[:TAG]`` -> ``(DIR, TAG or None)``."""
    body = spec[len("oci:"):]
    path, sep, tag = body.rpartition(":")
    if not sep or "/" in tag or not path:
        return body, None
    return path, tag


class OCILayout:
    """A directory holding ``oci-layout``, ``index.json`` and ``blobs/sha256/``."""

    def __init__(self, path, create=False):
        self.path = os.path.abspath(path)
        layout_file = os.path.join(self.path, "oci-layout")
        if not os.path.exists(layout_file):
            if not create:
                raise StargzError(f"{path} is not an OCI image layout (no oci-layout file)")
            os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
            self._write_atomic(layout_file, b'{"imageLayoutVersion":"1.0.0"}')
            self._write_index({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})

    def blob_path(self, digest):
        if not _DIGEST_RE.match(digest or ""):
            raise StargzError(f"unsupported or malformed digest {digest!r}")
        return os.path.join(self.path, "blobs", "sha256", digest[len("sha256:"):])

    def has_blob(self, digest):
        return os.path.exists(self.blob_path(digest))

    def read_blob(self, digest):
        """A small blob's bytes, verified."""
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read()
        except OSError as exc:
            raise StargzError(f"{self.path}: cannot read blob {digest}: {exc.strerror}") from None
        if sha256_digest(data) != digest:
            raise DigestMismatch(f"{self.path}: blob {digest} does not match its digest")
        return data

    def _write_atomic(self, path, data):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def put_blob_bytes(self, data):
        digest = sha256_digest(data)
        if not self.has_blob(digest):
            self._write_atomic(self.blob_path(digest), data)
        return digest

    def put_blob_file(self, path, digest):
        """Move a finished, already verified file into the layout as ``digest``."""
        target = self.blob_path(digest)
        if os.path.exists(target):
            os.unlink(path)
        else:
            os.chmod(path, 0o644)
            os.replace(path, target)

    def index(self):
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise StargzError(f"{self.path}: cannot read index.json: {exc}") from None
        if not isinstance(doc.get("manifests"), list):
            raise StargzError(f"{self.path}: index.json has no manifests list")
        return doc

    def _write_index(self, doc):
        self._write_atomic(os.path.join(self.path, "index.json"),
                           json.dumps(doc, separators=(",", ":")).encode())

    def find(self, tag):
        """The descriptor tagged ``tag`` (or the only one when ``tag`` is None)."""
        manifests = self.index()["manifests"]
        if tag is None:
            if len(manifests) != 1:
                raise StargzError(f"{self.path} holds {len(manifests)} images; name one "
                                  f"as oci:DIR:TAG")
            return manifests[0]
        for desc in manifests:
            if (desc.get("annotations") or {}).get(REF_NAME) == tag:
                return desc
        raise StargzError(f"{self.path} has no image tagged {tag!r}")

    def tag(self, descriptor, tag):
        """Point ``tag`` at ``descriptor`` in index.json (replacing an older one)."""
        doc = self.index()
        keep = [d for d in doc["manifests"]
                if tag is None or (d.get("annotations") or {}).get(REF_NAME) != tag]
        desc = dict(descriptor)
        if tag is not None:
            desc["annotations"] = {**(desc.get("annotations") or {}), REF_NAME: tag}
        doc["manifests"] = keep + [desc]
        self._write_index(doc)
