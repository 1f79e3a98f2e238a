"""``convert --analyze docker://SRC``: each source layer, config and manifest is read once,
shared by the analysis and the conversion, and the result is the same as without sharing."""

import json
import os
import tempfile

from stargz_overlay import cli
from stargz_overlay.image_convert import open_endpoint
from stargz_overlay.image_fs import image_manifests
from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import RegistryClient

from ..registryfixture import Proxy, Registry, require_registry


def push_layout(spec, host, repository):
    """Push the OCI layout image ``oci:DIR:TAG`` (a manifest or an index of them) to
    ``host/repository:TAG`` unchanged; returns the layer digests."""
    path, tag = spec[len("oci:"):].rsplit(":", 1)

    def read(digest):
        with open(os.path.join(path, "blobs", "sha256", digest[len("sha256:"):]), "rb") as f:
            return f.read()
    with open(os.path.join(path, "index.json"), "rb") as f:
        top = json.load(f)["manifests"][0]
    body = read(top["digest"])
    doc = json.loads(body)
    children = doc.get("manifests") or [top]
    conf = RegistriesConf.from_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    layers = []
    with RegistryClient(registries_conf=conf, auth_files=[], certs_dir=os.devnull) as client:
        for child in children:
            manifest = json.loads(read(child["digest"]))
            for desc in [manifest["config"]] + manifest["layers"]:
                client.push_blob(f"{host}/{repository}", read(desc["digest"]), desc["digest"])
            layers += [d["digest"] for d in manifest["layers"] if d["digest"] not in layers]
            if child is not top:
                client.push_manifest(f"{host}/{repository}@{child['digest']}",
                                     read(child["digest"]), child["mediaType"])
        client.push_manifest(f"{host}/{repository}:{tag}", body, top["mediaType"])
    return layers


def use_registries(monkeypatch, tmp_path, reg, proxy):
    """The CLI trusts ``reg`` and ``proxy`` (plain HTTP), and nothing of this machine."""
    conf = reg.registries_conf(str(tmp_path), extra=f'[[registry]]\nlocation = '
                                                     f'"{proxy.host}"\ninsecure = true\n')
    monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", conf)
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "no-auth.json"))
    monkeypatch.setenv("STARGZ_OVERLAY_CERTS_DIR", str(tmp_path))


def gets_per_layer(proxy, layers):
    """How many GETs the proxy relayed for each layer blob; all of whole blobs."""
    gets = proxy.requests("GET", kind="blob")
    assert all(not g[2] or g[2].startswith("bytes=0-") for g in gets), gets
    return [sum(1 for g in gets if g[1].endswith(digest)) for digest in layers]


def test_each_source_layer_is_fetched_once(image, tmp_path, capsys, monkeypatch):
    require_registry()
    with Registry(str(tmp_path / "registry")) as reg, Proxy(reg.host) as proxy:
        use_registries(monkeypatch, tmp_path, reg, proxy)
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        layers = push_layout(image[0], reg.host, "src/python")
        assert len(layers) == 2
        proxy.clear()
        assert cli.main(["convert", f"docker://{proxy.host}/src/python:v1",
                         f"docker://{reg.host}/dst/python:v1", "--analyze", "--chunk-size",
                         "65536", "--json"]) == 0
        out, err = capsys.readouterr()
        assert gets_per_layer(proxy, layers) == [1, 1]
        configs = [m["config"]["digest"] for _, m in image_manifests(open_endpoint(image[0]))]
        assert gets_per_layer(proxy, configs) == [1]      # not once more for the analysis
        manifests = [g[1] for g in proxy.requests("GET") if "/manifests/" in g[1]]
        assert len(manifests) == len(set(manifests)) and manifests, manifests  # tag read once
        assert "startup files of python3 -c" in err
        assert err.count("downloaded once (") == 2 and "for the analysis and the conv" in err
        spooled = json.loads(out)
        # the same image as converting the layout (no download to share) with --analyze
        assert cli.main(["convert", image[0], f"oci:{tmp_path}/direct:v1", "--analyze",
                         "--chunk-size", "65536", "--json"]) == 0
        direct = json.loads(capsys.readouterr()[0])
        assert spooled["digest"] == direct["digest"]
        assert [la["digest"] for la in spooled["layers"]] == \
            [la["digest"] for la in direct["layers"]]
        assert [la["action"] for la in spooled["layers"]] == ["converted", "converted"]
    assert os.listdir(tmp_path / "tmp") == []         # spool and unpacked layers removed


def test_a_corrupt_download_fails_and_leaves_nothing(image, tmp_path, capsys, monkeypatch):
    require_registry()
    with Registry(str(tmp_path / "registry")) as reg, Proxy(reg.host, flip_byte=100) as proxy:
        use_registries(monkeypatch, tmp_path, reg, proxy)
        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        push_layout(image[0], reg.host, "src/python")
        assert cli.main(["convert", f"docker://{proxy.host}/src/python:v1",
                         f"docker://{reg.host}/dst/python:v1", "--analyze"]) == 1
        assert "does not match its digest" in capsys.readouterr()[1]
    assert os.listdir(tmp_path / "tmp") == []
