"""Convert whole images (every layer, every platform) to eStargz.

Sources and destinations are registries (``docker://REF``) or OCI layouts
(``oci:DIR[:TAG]``), behind one small endpoint interface.  Each gzip or
plain tar layer is rewritten as eStargz, annotated with its TOC digest and
uncompressed size, and the config's diff_ids follow; layers that cannot be
converted (zstd, names that are not UTF-8, ...) are kept as they are, with
the reason reported.  The output is always an OCI manifest (and index).
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

from .digests import hasher_digest, sha256_digest
from .errors import DigestMismatch, FormatError, StargzError
from .oci_layout import OCILayout, parse_layout_spec
from .progress import Progress, human_bytes
from .reference import parse_reference
from .registry import (DOCKER_MANIFEST, INDEX_TYPES, OCI_CONFIG, OCI_INDEX,
                       OCI_MANIFEST, TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION,
                       RegistryClient, json_object)
from .writer import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, convert

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONVERTIBLE = {
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
}
COPY_BLOCK = 16 << 20


@dataclass
class ConvertOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    legacy: bool = False
    prioritized: list = None
    reconvert: bool = False       # convert layers that are already eStargz again
    prioritized_by_layer: dict = None   # source layer digest -> paths, after `prioritized`


@dataclass
class LayerReport:
    platform: str
    index: int
    source_digest: str
    digest: str
    action: str                   # "converted", "kept (already eStargz)", "kept: <reason>"
    size: int = 0


@dataclass
class ImageReport:
    digest: str = ""
    media_type: str = ""
    layers: list = field(default_factory=list)


class RegistryEndpoint:
    """An image in a registry, for reading or writing."""

    def __init__(self, reference, client):
        self.client = client
        self.reference = reference[len("docker://"):] if reference.startswith(
            "docker://") else reference
        self._root = None             # (body, media type) of the reference, once read
        self._manifests = {}          # digest -> verified body
        self._small_blobs = {}        # digest -> verified bytes

    def __str__(self):
        return f"docker://{self.reference}"

    def root_manifest(self):
        """The reference's manifest or index, read once: the analysis, the recording
        and the conversion see the same image even if the tag moves meanwhile."""
        if self._root is None:
            doc, body, digest, media_type = self.client.get_manifest(self.reference)
            self._root = body, media_type
        return self._root

    def manifest(self, digest):
        body = self._manifests.get(digest)
        if body is None:
            doc, body, _, _ = self.client.get_manifest(self.reference, digest)
            self._manifests[digest] = body
        return body

    def small_blob(self, digest):
        """A config (verified), fetched once: the analysis, the recording and the
        conversion each read it."""
        data = self._small_blobs.get(digest)
        if data is None:
            data = self._small_blobs[digest] = self.client.get_blob(self.reference, digest)
        return data

    def blob_to_file(self, digest, size, fileobj, progress):
        source = self.client.blob_source(self.reference, digest, size)
        done = 0
        while done < source.size:
            data = source.read_at(done, min(COPY_BLOCK, source.size - done))
            fileobj.write(data)
            done += len(data)
            progress(done, source.size)

    def has_blob(self, digest):
        return self.client.blob_exists(self.reference, digest)

    def put_blob_file(self, path, digest):
        self.client.push_blob(self.reference, path, digest)
        os.unlink(path)

    def mount_blob(self, digest, source):
        """Cross-mount ``digest`` from ``source`` when both are on one registry."""
        if not isinstance(source, RegistryEndpoint):
            return False
        mine, theirs = parse_reference(self.reference), parse_reference(source.reference)
        if theirs.registry != mine.registry:
            return False
        return self.client.mount_blob(self.reference, digest, theirs.repository)

    def put_blob_bytes(self, data):
        return self.client.push_blob(self.reference, data)

    def put_manifest(self, body, media_type, tagged):
        if tagged:
            self._root = None
            return self.client.push_manifest(self.reference, body, media_type)
        name = parse_reference(self.reference).name
        digest = sha256_digest(body)
        return self.client.push_manifest(f"{name}@{digest}", body, media_type)


class LayoutEndpoint:
    """An image in an OCI layout directory."""

    def __init__(self, spec, create=False):
        path, self.tag = parse_layout_spec(spec)
        self.layout = OCILayout(path, create=create)
        self.spec = spec

    def __str__(self):
        return self.spec

    def root_manifest(self):
        desc = self.layout.find(self.tag)
        return self.layout.read_blob(desc["digest"]), desc.get("mediaType", OCI_MANIFEST)

    def manifest(self, digest):
        return self.layout.read_blob(digest)

    def small_blob(self, digest):
        return self.layout.read_blob(digest)

    def blob_to_file(self, digest, size, fileobj, progress):
        try:
            copy_file(self.layout.blob_path(digest), size, fileobj, progress)
        except OSError as exc:
            raise StargzError(f"{self.spec}: cannot read blob {digest}: {exc.strerror}") from None

    def has_blob(self, digest):
        return self.layout.has_blob(digest)

    def put_blob_file(self, path, digest):
        self.layout.put_blob_file(path, digest)

    def put_blob_bytes(self, data):
        return self.layout.put_blob_bytes(data)

    def put_manifest(self, body, media_type, tagged):
        digest = self.layout.put_blob_bytes(body)
        if tagged:
            self.layout.tag({"mediaType": media_type, "digest": digest, "size": len(body)},
                            self.tag)
        return digest

    def mount_blob(self, digest, source):
        return False


def copy_file(path, size, fileobj, progress):
    """Write the file at ``path`` (``size`` bytes) to ``fileobj`` block by block."""
    with open(path, "rb") as f:
        done = 0
        for block in iter(lambda: f.read(COPY_BLOCK), b""):
            fileobj.write(block)
            done += len(block)
            progress(done, size)


def fetch_blob(endpoint, digest, size, label, workdir=None, stream=None):
    """Download a blob into a new temp file in ``workdir``, verified against its digest;
    returns its path (the caller removes it)."""
    tmp = tempfile.NamedTemporaryFile(dir=workdir, prefix="layer-", delete=False)
    progress = Progress(f"{label}: fetching", stream or sys.stderr)
    hasher = hashlib.sha256()

    class Hashing:
        @staticmethod
        def write(data):
            hasher.update(data)
            tmp.write(data)
    try:
        with tmp:
            endpoint.blob_to_file(digest, size, Hashing, progress)
    except BaseException:
        os.unlink(tmp.name)
        raise
    finally:
        progress.close()
    if hasher_digest(hasher) != digest:
        os.unlink(tmp.name)
        raise DigestMismatch(f"{endpoint}: layer {digest} does not match its digest")
    return tmp.name


def keep_reason(desc, reconvert=False):
    """Why ImageConverter copies the layer ``desc`` as it is, or None: it converts it."""
    media_type = desc.get("mediaType", "")
    if TOC_DIGEST_ANNOTATION in (desc.get("annotations") or {}) and not reconvert:
        return "kept (already eStargz)"
    if media_type not in CONVERTIBLE:
        return f"kept: media type {media_type or '(none)'} cannot be converted"
    return None


class BlobSpool:
    """Whole source blobs downloaded once for several readers.

    ``convert --analyze`` (or ``--optimize``) reads each layer it converts more than
    once: the analysis indexes it, the conversion rewrites it.  A spool attached to
    the source endpoint (``endpoint.spool``) makes them share one verified copy in a
    private temporary directory, removed by ``close()``.
    """

    def __init__(self, endpoint, reconvert=False, workdir=None, stream=None):
        self.endpoint = endpoint
        self.reconvert = reconvert
        self.stream = stream
        self.dir = tempfile.mkdtemp(prefix="stargz-spool-", dir=workdir)
        self._paths = {}
        endpoint.spool = self

    def wants(self, desc):
        """Will the conversion download this layer whole (so others should share it)?"""
        return keep_reason(desc, self.reconvert) is None

    def has(self, digest):
        return digest in self._paths

    def path(self, digest, size, label):
        """The spooled copy of a blob (downloaded on first use); read it, keep it."""
        path = self._paths.get(digest)
        if path is None:
            path = fetch_blob(self.endpoint, digest, size, label, self.dir, self.stream)
            self._paths[digest] = path
        return path

    def link(self, digest, size, label):
        """A new name for the spooled copy of a blob, the caller's to remove or move."""
        path = self.path(digest, size, label)
        for n in range(1000):
            name = f"{path}.{n}"
            try:
                os.link(path, name)
                return name
            except FileExistsError:
                continue
        raise StargzError(f"{self.dir}: cannot link {digest}")

    def close(self):
        if getattr(self.endpoint, "spool", None) is self:
            self.endpoint.spool = None
        self._paths.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_endpoint(spec, client=None, create=False):
    """``docker://REF`` or ``oci:DIR[:TAG]`` -> an endpoint (an endpoint is returned as is)."""
    if not isinstance(spec, str):
        return spec
    if spec.startswith("docker://"):
        return RegistryEndpoint(spec, client or RegistryClient())
    if spec.startswith("oci:"):
        return LayoutEndpoint(spec, create=create)
    raise StargzError(f"{spec}: name images as docker://REF or oci:DIR[:TAG]")


def is_image_spec(text):
    return text.startswith(("docker://", "oci:"))


class ImageConverter:
    """Copies an image from ``src`` to ``dst``, converting its layers on the way."""

    def __init__(self, src, dst, options=None, workdir=None, stream=None):
        self.src = src
        self.dst = dst
        self.options = options or ConvertOptions()
        self.workdir = workdir
        self.stream = stream or sys.stderr
        self.report = ImageReport()
        self._converted = {}          # source layer digest -> (descriptor, diff_id)

    def _fetch(self, digest, size, label, share=True):
        """A verified local copy of a source blob, ours to remove.  Through the source's
        spool if it has one (``share``: spooled now for later readers if not yet)."""
        spool = getattr(self.src, "spool", None)
        if spool is not None and (share or spool.has(digest)):
            return spool.link(digest, size, label)
        return fetch_blob(self.src, digest, size, label, self.workdir, self.stream)

    def _copy_blob(self, digest, size, label):
        if self.dst.has_blob(digest) or self.dst.mount_blob(digest, self.src):
            return
        self.dst.put_blob_file(self._fetch(digest, size, label, share=False), digest)

    def _convert_layer(self, desc, label):
        """Convert one layer blob; returns (descriptor, diff_id)."""
        original = self._fetch(desc["digest"], desc.get("size", 0), label)
        out = tempfile.NamedTemporaryFile(dir=self.workdir, prefix="esgz-", delete=False)
        progress = Progress(f"{label}: converting", self.stream)
        opts = self.options
        try:
            with out:
                prioritized = list(opts.prioritized or ()) + list(
                    (opts.prioritized_by_layer or {}).get(desc["digest"], ()))
                result = convert(original, out, legacy=opts.legacy, chunk_size=opts.chunk_size,
                                 prioritized=prioritized or None,
                                 compression_level=opts.compression_level, progress=progress)
        except BaseException:
            os.unlink(out.name)
            raise
        finally:
            progress.close()
            os.unlink(original)
        progress = Progress(f"{label}: pushing", self.stream)
        self.dst.put_blob_file(out.name, result.blob_digest)
        annotations = {k: v for k, v in (desc.get("annotations") or {}).items()
                       if k not in (TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION)}
        annotations[TOC_DIGEST_ANNOTATION] = result.toc_digest
        annotations[UNCOMPRESSED_SIZE_ANNOTATION] = str(result.uncompressed_size)
        new = {"mediaType": OCI_LAYER_GZIP, "digest": result.blob_digest,
               "size": result.compressed_size, "annotations": annotations}
        return new, result.diff_id

    def _layer(self, desc, index, total, platform, diff_ids):
        digest = desc["digest"]
        label = f"[{platform}] layer {index + 1}/{total} {digest[7:19]}"
        media_type = desc.get("mediaType", "")
        kept = keep_reason(desc, self.options.reconvert)
        if kept is None:
            if digest not in self._converted:
                try:
                    self._converted[digest] = self._convert_layer(desc, label)
                except FormatError as exc:
                    self._converted[digest] = (None, str(exc))
            new, diff_id = self._converted[digest]
            if new is not None:
                diff_ids[index] = diff_id
                self.report.layers.append(LayerReport(platform, index, digest, new["digest"],
                                                      "converted", new["size"]))
                return new
            kept = f"kept: {diff_id}"
        self._copy_blob(digest, desc.get("size", 0), label)
        self.report.layers.append(LayerReport(platform, index, digest, digest, kept,
                                              desc.get("size", 0)))
        return dict(desc, mediaType=_oci_layer_type(media_type))

    def _manifest(self, body, platform, tagged):
        doc = json_object(body, f"{self.src}: manifest")
        config_desc = doc.get("config") or {}
        config = json_object(self.src.small_blob(config_desc["digest"]), f"{self.src}: config")
        if not platform:
            platform = "/".join(p for p in (config.get("os"), config.get("architecture"),
                                            config.get("variant")) if p)
        diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
        layers = doc.get("layers") or []
        if len(diff_ids) != len(layers):
            raise StargzError(f"{self.src}: config has {len(diff_ids)} diff_ids for "
                              f"{len(layers)} layers")
        new_layers = [self._layer(desc, i, len(layers), platform, diff_ids)
                      for i, desc in enumerate(layers)]
        config.setdefault("rootfs", {})["diff_ids"] = diff_ids
        config_body = json.dumps(config, separators=(",", ":")).encode()
        config_digest = self.dst.put_blob_bytes(config_body)
        new = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
               "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                          "size": len(config_body)},
               "layers": new_layers}
        if doc.get("annotations"):
            new["annotations"] = doc["annotations"]
        new_body = json.dumps(new, separators=(",", ":")).encode()
        digest = self.dst.put_manifest(new_body, OCI_MANIFEST, tagged)
        return {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(new_body)}

    def run(self):
        """Convert the image; returns an ImageReport."""
        body, media_type = self.src.root_manifest()
        if media_type in INDEX_TYPES:
            index = json_object(body, f"{self.src}: index")
            manifests = []
            for desc in index.get("manifests") or []:
                if desc.get("mediaType") not in (OCI_MANIFEST, DOCKER_MANIFEST):
                    continue          # attestations, nested indexes: not images
                p = desc.get("platform") or {}
                platform = "/".join(x for x in (p.get("os"), p.get("architecture"),
                                                p.get("variant")) if x)
                child = self._manifest(self.src.manifest(desc["digest"]), platform, False)
                if desc.get("platform"):
                    child["platform"] = desc["platform"]
                manifests.append(child)
            new_index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
            new_body = json.dumps(new_index, separators=(",", ":")).encode()
            self.report.digest = self.dst.put_manifest(new_body, OCI_INDEX, True)
            self.report.media_type = OCI_INDEX
        else:
            desc = self._manifest(body, "", True)
            self.report.digest = desc["digest"]
            self.report.media_type = OCI_MANIFEST
        return self.report


def _oci_layer_type(media_type):
    return {"application/vnd.docker.image.rootfs.diff.tar.gzip": OCI_LAYER_GZIP,
            "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
            }.get(media_type, media_type)


def describe(report):
    """Human-readable lines for an ImageReport."""
    lines = [f"image: {report.digest} ({report.media_type})"]
    for layer in report.layers:
        lines.append(f"  [{layer.platform}] layer {layer.index}: {layer.source_digest[:19]} -> "
                     f"{layer.digest[:19]} {human_bytes(layer.size)} {layer.action}")
    return lines

