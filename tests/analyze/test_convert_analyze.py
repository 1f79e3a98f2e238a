"""``convert --analyze``: each layer's inferred startup files land before its
``.prefetch.landmark``; the eStargz result is analyzed lazily, also from a real registry."""

import json

import pytest

from stargz_overlay import cli
from stargz_overlay.analyze import analyze_image
from stargz_overlay.image_convert import open_endpoint
from stargz_overlay.oci_layout import OCILayout, parse_layout_spec
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource

from ..registryfixture import Registry, require_registry
from .imagebuilder import DIST, PYTHON, STDLIB, TAG


def analyze(spec, **kw):
    results = analyze_image(open_endpoint(spec), note=lambda text: None, **kw)
    return results[0]


def layout_layers(spec):
    path, tag = parse_layout_spec(spec)
    layout = OCILayout(path)
    manifest = json.loads(layout.read_blob(layout.find(tag)["digest"]))
    return [(d, layout.blob_path(d["digest"])) for d in manifest["layers"]]


def check_prioritized(blob_path, wanted, unwanted):
    """Every wanted regular file starts before the landmark, every unwanted one after."""
    reader = StargzReader(FileSource(blob_path))
    mark = reader.toc.landmark
    assert mark is not None and mark.name == ".prefetch.landmark"
    landmark = mark.chunks[0].offset
    checked = 0
    for path in wanted:
        entry = reader.toc.lookup(path)
        assert entry is not None, path
        if entry.type == "reg" and entry.size:
            assert entry.chunks[0].offset < landmark, path
            checked += 1
    for path in unwanted:
        entry = reader.toc.lookup(path)
        assert entry is not None and entry.chunks[0].offset > landmark, path
    return checked


@pytest.fixture(scope="module")
def converted(image, tmp_path_factory):
    """The test image converted with --analyze (64 KiB chunks) to an OCI layout."""
    dst = f"oci:{tmp_path_factory.mktemp('converted')}/out:v1"
    status = cli.main(["convert", image[0], dst, "--analyze", "--chunk-size", "65536"])
    assert status == 0
    return dst


def test_convert_analyze_puts_startup_files_first_per_layer(image, converted):
    source = analyze(image[0])
    by_layer = source.by_layer()
    layers = layout_layers(converted)
    assert len(layers) == 2 and set(by_layer) == set(image[1])
    low = check_prioritized(layers[0][1], by_layer[image[1][0]],
                            [f"{STDLIB.lstrip('/')}/decimal.py",
                             f"{STDLIB.lstrip('/')}/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so"])
    up = check_prioritized(layers[1][1], by_layer[image[1][1]],
                           ["app/decoy_lazy.py", "app/fallback_mod.py"])
    assert low >= 25 and up >= 4
    assert PYTHON.lstrip("/") in by_layer[image[1][0]]
    assert f"{DIST}/good.pth" in by_layer[image[1][1]]


def test_analyze_reads_estargz_layers_lazily(image, converted):
    source = analyze(image[0])
    result = analyze(converted)
    assert [(f.path, f.layer, f.kind) for f in result.files] == \
        [(f.path, f.layer, f.kind) for f in source.files]
    assert [la.kind for la in result.layers] == ["estargz", "estargz"]
    assert all(la.annotated for la in result.layers)
    sizes = [desc["size"] for desc, _ in layout_layers(converted)]
    assert result.layers[0].fetched < 0.4 * sizes[0], (result.layers[0].fetched, sizes[0])


def test_convert_analyze_through_a_real_registry(image, tmp_path, capsys, monkeypatch):
    require_registry()
    with Registry(str(tmp_path / "registry")) as reg:
        monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", reg.registries_conf(str(tmp_path)))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "no-auth.json"))
        monkeypatch.setenv("STARGZ_OVERLAY_CERTS_DIR", str(tmp_path))
        ref = f"docker://{reg.host}/analyze/python:v1"
        assert cli.main(["convert", image[0], ref, "--analyze", "--chunk-size", "65536"]) == 0
        _, err = capsys.readouterr()
        assert "analyze [linux/amd64]: " in err and "startup files of python3 -c" in err
        assert cli.main(["analyze", ref, "--json"]) == 0
        out, _ = capsys.readouterr()
        doc, = json.loads(out)
        assert [la["kind"] for la in doc["layers"]] == ["estargz", "estargz"]
        paths = [f["path"] for f in doc["files"]]
        assert PYTHON in paths and "/app/mylib.py" in paths
        assert f"{STDLIB}/json/__pycache__/__init__.{TAG}.pyc" in paths
        # converting the eStargz image again with --analyze says the layers are kept
        out_spec = f"oci:{tmp_path}/again:v1"
        assert cli.main(["convert", ref, out_spec, "--analyze"]) == 0
        _, err = capsys.readouterr()
        assert "2 layer(s) are already eStargz and kept as they are; add --reconvert" in err


def test_a_corrupt_chunk_is_a_problem_not_wrong_bytes(image, converted, tmp_path):
    """Corrupt /app/mylib.py's compressed chunk: that file is reported, the rest of the
    analysis goes on."""
    import shutil
    src_dir, tag = parse_layout_spec(converted)
    copy = tmp_path / "corrupt"
    shutil.copytree(src_dir, copy)
    desc, blob = layout_layers(f"oci:{copy}:{tag}")[1]
    entry = StargzReader(FileSource(blob)).toc.lookup("app/mylib.py")
    chunk = entry.chunks[0]
    data = bytearray(open(blob, "rb").read())
    for pos in range(chunk.offset + 12, chunk.offset + 28):  # deflate data of its content
        data[pos] ^= 0x55
    with open(blob, "wb") as f:
        f.write(data)
    result = analyze(f"oci:{copy}:{tag}")
    bad = [p for p in result.problems if p.startswith("/app/mylib.py: cannot be read")]
    assert len(bad) == 1, result.problems
    paths = [f.path for f in result.files]
    assert PYTHON in paths and "/app/mylib.py" in paths and "/app/helper.py" not in paths
