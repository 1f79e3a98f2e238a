"""``stargz-overlay inspect`` and the blob commands on ``docker://REF --layer N``."""

import json

import pytest

from stargz_overlay import cli

from .conftest import BIG, FILES


@pytest.fixture
def conf_env(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", registry.registries_conf(str(tmp_path)))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "no-auth.json"))
    monkeypatch.setenv("STARGZ_OVERLAY_CERTS_DIR", str(tmp_path))


def run(capsysbinary, *argv):
    status = cli.main(list(argv))
    out, err = capsysbinary.readouterr()
    return status, out, err.decode()


def test_inspect_text_and_json(conf_env, image, estargz, capsysbinary):
    blob, res = estargz
    status, out, err = run(capsysbinary, "inspect", "docker://" + image,
                           "--platform", "linux/amd64")
    assert status == 0, err
    text = out.decode()
    assert "platform:  linux/amd64" in text and "layers:    2 (1 lazily usable)" in text
    assert f"{res.blob_digest}" in text and "eStargz footer and toc.digest annotation" in text
    assert "not-stargz  no toc.digest annotation and footer is plain gzip" in text
    status, out, err = run(capsysbinary, "inspect", image, "--json")
    info = json.loads(out)
    assert info["reference"] == image
    l0, l1 = info["layers"]
    assert (l0["kind"], l0["lazy"], l0["tocDigest"], l0["size"]) == \
        ("estargz", True, res.toc_digest, len(blob))
    assert l0["tocOffset"] > 0
    assert (l1["kind"], l1["lazy"]) == ("not-stargz", False)


def test_blob_commands_on_registry_layers(conf_env, image, capsysbinary):
    ref = "docker://" + image
    status, out, err = run(capsysbinary, "cat", ref, "--layer", "0", "usr/bin/big.bin")
    assert status == 0, err
    assert out == BIG
    status, out, err = run(capsysbinary, "ls", ref, "--layer", "0")
    assert status == 0 and "etc/hello.txt" in out.decode()
    status, out, err = run(capsysbinary, "verify", ref, "--layer", "-2")
    assert status == 0 and out.startswith(b"ok: estargz"), err
    status, out, err = run(capsysbinary, "toc", ref, "--layer", "0", "--raw")
    assert status == 0 and json.loads(out)["version"] == 1


def test_layer_by_digest_and_errors(conf_env, image, estargz, capsysbinary):
    blob, res = estargz
    ref = "docker://" + image
    short = res.blob_digest.split(":")[1][:12]
    status, out, err = run(capsysbinary, "cat", ref, "--layer", short, "etc/hello.txt")
    assert status == 0 and out == FILES["etc/hello.txt"], err
    status, out, err = run(capsysbinary, "ls", ref)
    assert status == 1 and "has 2 layers; choose one with --layer" in err
    status, out, err = run(capsysbinary, "ls", ref, "--layer", "1")
    assert status == 1 and "not a stargz" in err and "Traceback" not in err
    status, out, err = run(capsysbinary, "ls", ref, "--layer", "7")
    assert status == 1 and "no layer 7" in err
    status, out, err = run(capsysbinary, "ls", ref, "--layer", "0",
                           "--toc-digest", "sha256:" + "0" * 64)
    assert status == 1 and "TOC digest" in err
    status, out, err = run(capsysbinary, "inspect", image.replace("app:1", "nope:1"))
    assert status == 1 and "not found" in err


def test_annotation_mismatch_is_refused(conf_env, registry, estargz, capsysbinary):
    """A manifest whose toc.digest annotation disagrees with the blob's TOC."""
    from stargz_overlay.registry import TOC_DIGEST_ANNOTATION
    from ..registryfixture import push_image
    from .conftest import make_client
    blob, res = estargz
    ref = f"{registry.host}/liar:1"
    with make_client(registry.host) as c:
        push_image(c, ref, [blob],
                   layer_annotations=[{TOC_DIGEST_ANNOTATION: "sha256:" + "1" * 64}])
    status, out, err = run(capsysbinary, "cat", "docker://" + ref, "--layer", "0",
                           "etc/hello.txt")
    assert status == 1 and "TOC digest" in err and out == b""
