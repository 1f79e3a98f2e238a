"""Scheme hints: a registry configured insecure that answered only plain HTTP is
remembered, so the next process skips the failed TLS handshake; TLS still wins
wherever the host speaks it, and a registry configured secure ignores hints.

Against real docker-registry instances (plain HTTP and TLS) on 127.0.0.1, each
"process" a real separate Python process where the brief is about processes.
"""

import json
import os
import subprocess
import sys

import pytest

from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import RegistryClient

from ..registryfixture import Registry, push_image
from .conftest import make_client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESOLVE = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import RegistryClient
conf, hints, ref = sys.argv[1:4]
with RegistryClient(registries_conf=RegistriesConf.load(conf), auth_files=[],
                    certs_dir="/nonexistent", platform="linux/amd64", retries=1,
                    scheme_hints=hints) as c:
    image = c.resolve(ref)
    print(len(image.layers), c.endpoint(image.source.split("/")[0]).scheme,
          c.stats["requests"])
"""


def resolve_in_process(conf, hints, ref):
    """``(layers, scheme, requests, log)`` of a resolve by a new process."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "plugin"))
    out = subprocess.run([sys.executable, "-c", RESOLVE, conf, hints, ref], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    layers, scheme, requests = out.stdout.split()
    return int(layers), scheme, int(requests), out.stderr


def hinted_hosts(path):
    with open(path, encoding="utf-8") as f:
        return set(json.load(f)["plain_http"])


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, estargz):
    with Registry(str(tmp_path_factory.mktemp("tls-hints")), tls=True) as reg:
        with make_client(reg.host, certs_dir=reg.certs_dir) as c:
            push_image(c, f"{reg.host}/app:1", [estargz[0]])
        yield reg


def test_second_process_goes_straight_to_plain_http(registry, image, tmp_path):
    conf = registry.registries_conf(str(tmp_path))          # insecure = true
    hints = str(tmp_path / "cache" / "registry-schemes.json")
    layers, scheme, first, log = resolve_in_process(conf, hints, image)
    assert (layers, scheme) == (2, "http")
    assert "TLS failed" in log                               # the probe, once
    assert hinted_hosts(hints) == {registry.host}

    layers, scheme, second, log = resolve_in_process(conf, hints, image)
    assert (layers, scheme) == (2, "http")
    assert "TLS failed" not in log and "TLS" not in log, log
    assert second == first - 1                               # no failed handshake

    # without hints every process pays the probe again
    _, _, again, log = resolve_in_process(conf, "", image)
    assert "TLS failed" in log and again == first


def test_hints_never_downgrade_a_registry_configured_secure(tls_registry, tmp_path):
    hints = tmp_path / "registry-schemes.json"
    hints.write_text(json.dumps({"plain_http": {tls_registry.host: 1}}))
    conf = RegistriesConf.load(tls_registry.registries_conf(str(tmp_path), insecure=False))
    with RegistryClient(registries_conf=conf, auth_files=[], certs_dir=tls_registry.certs_dir,
                        platform="linux/amd64", scheme_hints=str(hints)) as c:
        assert len(c.resolve(f"{tls_registry.host}/app:1").layers) == 1
        ep = c.endpoint(tls_registry.host)
        assert (ep.scheme, ep.hint) == ("https", None)
        hinted = c.stats["requests"]
    with RegistryClient(registries_conf=conf, auth_files=[], certs_dir=tls_registry.certs_dir,
                        platform="linux/amd64") as c:
        c.resolve(f"{tls_registry.host}/app:1")
        assert c.stats["requests"] == hinted                 # no plain-HTTP attempt made


def test_tls_registry_configured_insecure_keeps_tls(tls_registry, tmp_path):
    conf = tls_registry.registries_conf(str(tmp_path), insecure=True)
    hints = str(tmp_path / "registry-schemes.json")
    layers, scheme, plain, log = resolve_in_process(conf, hints, f"{tls_registry.host}/app:1")
    assert (layers, scheme) == (1, "https") and "TLS failed" not in log
    assert not os.path.exists(hints)                         # nothing learned

    # a stale hint (the host moved to TLS): one plain-HTTP answer, then TLS, hint dropped
    with open(hints, "w", encoding="utf-8") as f:
        json.dump({"plain_http": {tls_registry.host: 1, "other.example:5000": 1}}, f)
    layers, scheme, stale, log = resolve_in_process(conf, hints, f"{tls_registry.host}/app:1")
    assert (layers, scheme) == (1, "https")
    assert "now speaks TLS" in log and stale == plain + 1, log
    assert hinted_hosts(hints) == {"other.example:5000"}

    layers, scheme, after, log = resolve_in_process(conf, hints, f"{tls_registry.host}/app:1")
    assert (layers, scheme, after) == (1, "https", plain) and "plain HTTP" not in log
