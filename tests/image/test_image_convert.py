"""Whole-image conversion between OCI layouts and a real docker-registry."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from stargz_overlay.image_convert import ConvertOptions, ImageConverter, open_endpoint
from stargz_overlay.oci_layout import OCILayout, parse_layout_spec
from stargz_overlay.reader import StargzReader
from stargz_overlay.registry import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from stargz_overlay.source import FileSource

from ..imagefixture import Podman, busybox_layer, tar_layer, write_layout
from ..registry.conftest import make_client
from ..registryfixture import Registry

APP = tar_layer({"app": ("dir",), "app/hello.txt": b"hello from the app layer\n",
                 "app/data.bin": os.urandom(200_000)})


def load(layout_spec, digest=None):
    path, tag = parse_layout_spec(layout_spec)
    layout = OCILayout(path)
    desc = layout.find(tag) if digest is None else {"digest": digest}
    return layout, json.loads(layout.read_blob(desc["digest"]))


def check_estargz_manifest(layout, manifest, original_layers):
    config = json.loads(layout.read_blob(manifest["config"]["digest"]))
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    for i, desc in enumerate(manifest["layers"]):
        path = layout.blob_path(desc["digest"])
        blob = open(path, "rb").read()
        assert desc["size"] == len(blob)
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
        raw = gzip.decompress(blob)
        assert config["rootfs"]["diff_ids"][i] == "sha256:" + hashlib.sha256(raw).hexdigest()
        annotations = desc["annotations"]
        assert annotations[UNCOMPRESSED_SIZE_ANNOTATION] == str(len(raw))
        reader = StargzReader(FileSource(path), toc_digest=annotations[TOC_DIGEST_ANNOTATION])
        with tarfile.open(fileobj=io.BytesIO(original_layers[i])) as tar:
            for info in tar:
                entry = reader.toc.lookup(info.name)
                assert entry is not None, info.name
                if info.isreg():
                    assert reader.read_file(entry) == tar.extractfile(info).read()


def test_layout_to_layout(tmp_path):
    layers = [busybox_layer(), APP]
    src = write_layout(str(tmp_path / "src"), "v1", layers)
    dst = f"oci:{tmp_path / 'dst'}:v1-esgz"
    report = ImageConverter(open_endpoint(src), open_endpoint(dst, create=True),
                            ConvertOptions(chunk_size=65536,
                                           prioritized=["bin/busybox"])).run()
    assert [layer.action for layer in report.layers] == ["converted", "converted"]
    layout, manifest = load(dst)
    check_estargz_manifest(layout, manifest, layers)
    first = StargzReader(FileSource(layout.blob_path(manifest["layers"][0]["digest"])))
    assert first.prefetch_range() is not None              # busybox before the landmark
    # converting the result again keeps every layer
    again = f"oci:{tmp_path / 'dst'}:again"
    report = ImageConverter(open_endpoint(dst), open_endpoint(again)).run()
    assert [layer.action for layer in report.layers] == ["kept (already eStargz)"] * 2
    skopeo = subprocess.run(["skopeo", "inspect", dst], capture_output=True, text=True)
    assert skopeo.returncode == 0, skopeo.stderr
    assert len(json.loads(skopeo.stdout)["Layers"]) == 2


def test_index_converts_every_platform(tmp_path):
    src = write_layout(str(tmp_path / "src"), "multi", [APP], platforms=["amd64", "arm64"])
    dst = f"oci:{tmp_path / 'dst'}:multi"
    report = ImageConverter(open_endpoint(src), open_endpoint(dst, create=True)).run()
    assert report.media_type == "application/vnd.oci.image.index.v1+json"
    assert sorted(layer.platform for layer in report.layers) == ["linux/amd64", "linux/arm64"]
    layout, index = load(dst)
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64", "arm64"]
    for desc in index["manifests"]:
        manifest = json.loads(layout.read_blob(desc["digest"]))
        check_estargz_manifest(layout, manifest, [APP])


def test_unconvertible_layers_are_kept_with_a_reason(tmp_path):
    weird = io.BytesIO()
    with tarfile.open(fileobj=weird, mode="w", format=tarfile.GNU_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        info = tarfile.TarInfo(b"caf\xe9".decode("utf-8", "surrogateescape"))
        tar.addfile(info, io.BytesIO(b""))
    layers = [APP, weird.getvalue(), b"zstd bytes stand-in"]
    src = write_layout(str(tmp_path / "src"), "t", layers,
                       media_types={2: "application/vnd.oci.image.layer.v1.tar+zstd"})
    dst = f"oci:{tmp_path / 'dst'}:t"
    report = ImageConverter(open_endpoint(src), open_endpoint(dst, create=True)).run()
    actions = [layer.action for layer in report.layers]
    assert actions[0] == "converted"
    assert actions[1].startswith("kept:") and "UTF-8" in actions[1]
    assert actions[2].startswith("kept: media type") and "zstd" in actions[2]
    layout, manifest = load(dst)
    assert manifest["layers"][2]["mediaType"].endswith("zstd")
    assert all(layout.has_blob(d["digest"]) for d in manifest["layers"])


def test_corrupt_source_layer_is_an_error_and_writes_no_manifest(tmp_path):
    src = write_layout(str(tmp_path / "src"), "t", [APP])
    layout, manifest = load(src)
    path = layout.blob_path(manifest["layers"][0]["digest"])
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    dst = f"oci:{tmp_path / 'dst'}:t"
    from stargz_overlay.errors import DigestMismatch
    with pytest.raises(DigestMismatch):
        ImageConverter(open_endpoint(src), open_endpoint(dst, create=True)).run()
    assert OCILayout(str(tmp_path / "dst")).index()["manifests"] == []


def test_registry_to_registry_and_plain_podman_pull(tmp_path):
    """docker:// -> docker:// on a real registry; a plain podman pull runs the result."""
    with Registry(str(tmp_path / "reg")) as reg:
        layers = [busybox_layer(), APP]
        src_layout = write_layout(str(tmp_path / "src"), "v1", layers)
        subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", src_layout,
                        f"docker://{reg.host}/app:v1"], check=True, capture_output=True)
        with make_client(reg.host) as client:
            src = open_endpoint(f"docker://{reg.host}/app:v1", client)
            dst = open_endpoint(f"docker://{reg.host}/app-esgz:v1", client)
            report = ImageConverter(src, dst).run()
            assert [layer.action for layer in report.layers] == ["converted"] * 2
            image = client.resolve(f"{reg.host}/app-esgz:v1")
            assert image.manifest_digest == report.digest
            for layer in image.layers:
                assert client.classify_layer(image, layer).kind == "estargz"
            # eStargz layers are kept, and cross-mounted within the registry, not copied
            client.stats.reset()
            copy = ImageConverter(dst, open_endpoint(f"docker://{reg.host}/other:v1", client))
            assert [x.action for x in copy.run().layers] == ["kept (already eStargz)"] * 2
            layer_bytes = sum(layer.size for layer in image.layers)
            assert client.stats.bytes_sent < 10_000 < layer_bytes
            assert client.stats.bytes_received < 10_000
        out = f"oci:{tmp_path / 'copy'}:v1"
        subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                        f"docker://{reg.host}/app-esgz:v1", out], check=True,
                       capture_output=True)
        layout, manifest = load(out)
        check_estargz_manifest(layout, manifest, layers)

        podman = Podman(str(tmp_path / "podman"), registries_conf=reg.registries_conf(
            str(tmp_path)))
        try:
            podman("pull", f"{reg.host}/app-esgz:v1")
            res = podman.run(f"{reg.host}/app-esgz:v1", "cat", "/app/hello.txt")
            assert res.stdout == "hello from the app layer\n"
        finally:
            podman.cleanup()


def test_cli_image_convert_errors_are_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "stargz_overlay", "convert",
                          f"oci:{tmp_path}/missing:x", f"oci:{tmp_path}/out:x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("stargz-overlay: error:") and res.stderr.count("\n") == 1
    assert "not an OCI image layout" in res.stderr
