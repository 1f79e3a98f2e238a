"""Test images built without internet, and a private podman for them.

``busybox_layer()`` is a tar layer with the static busybox from Debian's
busybox-static; ``write_layout()`` lays out an OCI image (or an index of
several platforms) on disk; ``Podman`` runs the real podman against its own
graph root and storage.conf, so the host's images are never touched.
"""

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid

import pytest

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def tar_layer(files):
    """A tar from ``{name: bytes | ("symlink", target) | ("dir",)}``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, value in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if isinstance(value, tuple) and value[0] == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, value[1]
                tar.addfile(info)
            elif isinstance(value, tuple) and value[0] == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(value), 0o755 if name.startswith("bin/") else 0o644
                tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


def busybox_layer():
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox is not installed (Debian package busybox-static)")
    with open(BUSYBOX, "rb") as f:
        binary = f.read()
    files = {"bin": ("dir",), "bin/busybox": binary, "bin/sh": ("symlink", "busybox"),
             "bin/cat": ("symlink", "busybox"), "bin/echo": ("symlink", "busybox"),
             "etc": ("dir",), "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
             "tmp": ("dir",)}
    return tar_layer(files)


def _put(blobs_dir, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs_dir, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest


def _manifest(blobs_dir, layers, arch, media_types=None):
    descs, diff_ids = [], []
    for i, layer in enumerate(layers):
        media_type = (media_types or {}).get(i, OCI_GZIP)
        blob = gzip.compress(layer, mtime=0) if media_type.endswith("gzip") else layer
        descs.append({"mediaType": media_type, "digest": _put(blobs_dir, blob),
                      "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(layer).hexdigest())
    config = json.dumps({"architecture": arch, "os": "linux",
                         "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": _put(blobs_dir, config),
                                      "size": len(config)},
                           "layers": descs}).encode()
    return {"mediaType": OCI_MANIFEST, "digest": _put(blobs_dir, manifest),
            "size": len(manifest)}


def write_layout(path, tag, layers, platforms=None, media_types=None):
    """An OCI layout at ``path`` whose ``tag`` is an image of ``layers`` (tar bytes,
    gzip-compressed unless ``media_types`` says otherwise per index), or an index
    with one such image per platform in ``platforms`` (architectures)."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    if platforms:
        manifests = []
        for arch in platforms:
            desc = _manifest(blobs, layers, arch, media_types)
            desc["platform"] = {"os": "linux", "architecture": arch}
            manifests.append(desc)
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": manifests}).encode()
        top = {"mediaType": OCI_INDEX, "digest": _put(blobs, body), "size": len(body)}
    else:
        top = _manifest(blobs, layers, "amd64", media_types)
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [top]}, f)
    return f"oci:{path}:{tag}"


class Podman:
    """The real podman with a private graph root, run root and storage.conf."""

    def __init__(self, directory, storage_extra="", overlay_extra="", registries_conf=None):
        if os.geteuid() != 0:
            pytest.skip("podman tests need root (CI runs as root)")
        if shutil.which("podman") is None or shutil.which("runc") is None:
            pytest.skip("podman/runc are not installed")
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.conf = os.path.join(directory, "storage.conf")
        with open(self.conf, "w") as f:
            f.write(f'[storage]\ndriver = "overlay"\n'
                    f'graphroot = "{directory}/graph"\nrunroot = "{directory}/run"\n'
                    f'{storage_extra}\n[storage.options.overlay]\n{overlay_extra}\n')
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=self.conf)
        if registries_conf:
            self.env["CONTAINERS_REGISTRIES_CONF"] = registries_conf

    def __call__(self, *args, check=True, timeout=120, input=None):
        cmd = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
               "--events-backend", "none", *args]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True,
                             timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
        return res

    def run(self, image, *cmd, extra=()):
        """``podman run``, then ``podman rm``.  (Not ``--rm``: under load Podman 4.3.1
        sometimes loses the exit code of a ``--rm`` container that exits at once.)"""
        name = f"t{uuid.uuid4().hex[:12]}"
        try:
            return self("run", "--name", name, "--network", "none", "--ulimit",
                        "nofile=1024:1024", "--ulimit", "nproc=1024:1024", *extra, image, *cmd)
        finally:
            self("rm", "-f", "-t", "0", name, check=False)

    def cleanup(self):
        self("rm", "-af", check=False)
        self("rmi", "-af", check=False)
        subprocess.run(["umount", "-R", f"{self.dir}/graph/overlay"], capture_output=True)
        self("system", "reset", "-f", check=False, timeout=60)
