"""TLS, htpasswd basic auth, JWT bearer tokens, mirrors and blocked registries."""

import base64
import json
import os
import shutil
import stat
import time

import pytest

from stargz_overlay.auth import AuthFiles
from stargz_overlay.errors import AuthError, RegistryError
from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import RegistryClient

from ..registryfixture import Registry, TokenServer, push_image, refused_port
from .conftest import make_client


def auth_file(tmp_path, host, user, password, name="auth.json"):
    path = tmp_path / name
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return [str(path)]


# -- TLS ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    with Registry(str(tmp_path_factory.mktemp("tls")), tls=True) as reg:
        yield reg


def secure_client(**kw):
    kw.setdefault("auth_files", [])
    kw.setdefault("retries", 1)
    kw.setdefault("backoff", 0.05)
    kw.setdefault("platform", "linux/amd64")
    return RegistryClient(registries_conf=RegistriesConf(), **kw)


def test_tls_with_certs_d(tls_registry, estargz):
    blob, _ = estargz
    ref = f"{tls_registry.host}/app:1"
    with secure_client(certs_dir=tls_registry.certs_dir) as c:
        push_image(c, ref, [blob])
        img = c.resolve(ref)
        assert c.blob_source(ref, img.layers[0].digest).read_at(0, 3) == blob[:3]


def test_tls_unknown_ca_is_refused(tls_registry, tmp_path):
    with secure_client(certs_dir=str(tmp_path)) as c:
        with pytest.raises(RegistryError, match="certificate verification failed"):
            c.resolve(f"{tls_registry.host}/app:1")


def test_tls_verify_off_and_insecure_conf(tls_registry, estargz, tmp_path):
    ref = f"{tls_registry.host}/app:1"
    with secure_client(certs_dir=str(tmp_path), tls_verify=False) as c:
        assert c.resolve(ref).layers
    conf = RegistriesConf.load(tls_registry.registries_conf(str(tmp_path), insecure=True))
    with RegistryClient(registries_conf=conf, auth_files=[], certs_dir=str(tmp_path)) as c:
        assert c.resolve(ref, platform="linux/amd64").layers


def test_plain_http_registry_needs_insecure(registry, image):
    with secure_client(certs_dir=os.devnull) as c:
        with pytest.raises(RegistryError, match="does not speak TLS"):
            c.resolve(image)


def test_client_certificate_loaded(tls_registry, tmp_path):
    """A *.cert without its *.key is a clear configuration error."""
    d = tmp_path / tls_registry.host
    d.mkdir()
    shutil.copy(tls_registry.ca_cert, d / "ca.crt")
    (d / "client.cert").write_text("x")
    with secure_client(certs_dir=str(tmp_path)) as c:
        with pytest.raises(Exception, match="missing key .*client.key"):
            c.resolve(f"{tls_registry.host}/app:1")


def test_mutual_tls_client_certificate(tmp_path, estargz):
    blob, _ = estargz
    with Registry(str(tmp_path), tls=True, client_certs=True) as reg:
        ref = f"{reg.host}/mtls:1"
        with secure_client(certs_dir=reg.certs_dir) as c:
            push_image(c, ref, [blob])
            assert c.resolve(ref).layers[0].size == len(blob)
        only_ca = tmp_path / "only-ca"
        (only_ca / reg.host).mkdir(parents=True)
        shutil.copy(reg.ca_cert, only_ca / reg.host / "ca.crt")
        with secure_client(certs_dir=str(only_ca)) as c:
            with pytest.raises(RegistryError, match="client certificate"):
                c.resolve(ref)


# -- htpasswd basic auth --------------------------------------------------

@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory, estargz):
    with Registry(str(tmp_path_factory.mktemp("basic")), users={"alice": "s3cret"}) as reg:
        yield reg


def test_basic_auth(basic_registry, estargz, tmp_path):
    blob, _ = estargz
    ref = f"{basic_registry.host}/private/app:1"
    with make_client(basic_registry.host,
                     auth_files=auth_file(tmp_path, basic_registry.host, "alice", "s3cret")) as c:
        push_image(c, ref, [blob])
        img = c.resolve(ref)
        assert c.blob_source(ref, img.layers[0].digest).read_at(1, 2) == blob[1:3]
    with make_client(basic_registry.host,
                     auth_files=auth_file(tmp_path, basic_registry.host, "alice", "wrong")) as c:
        with pytest.raises(AuthError, match="credentials from .*auth.json were rejected"):
            c.resolve(ref)
    missing = str(tmp_path / "none.json")
    with make_client(basic_registry.host, auth_files=[missing]) as c:
        with pytest.raises(AuthError, match=f"authentication required .*no credentials in any "
                                            f"auth file \\(looked in {missing}\\)"):
            c.resolve(ref)


def test_credential_helper_against_registry(basic_registry, estargz, tmp_path):
    blob, _ = estargz
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-test"
    helper.write_text('#!/bin/sh\nread server\n'
                      'echo "{\\"ServerURL\\":\\"$server\\",\\"Username\\":\\"alice\\",'
                      '\\"Secret\\":\\"s3cret\\"}"\n')
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    cfg = tmp_path / "docker" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"credHelpers": {basic_registry.host: "test"}}))
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run"),
           "DOCKER_CONFIG": str(cfg.parent), "PATH": f"{bindir}:{os.environ['PATH']}"}
    ref = f"{basic_registry.host}/helped:1"
    with make_client(basic_registry.host, auth_files=AuthFiles(env=env)) as c:
        push_image(c, ref, [blob])
        assert c.resolve(ref).layers[0].size == len(blob)


# -- bearer tokens --------------------------------------------------------

def token_setup(tmp_path, **kw):
    ts = TokenServer(str(tmp_path), users={"bob": "pw"}, **kw)
    reg = Registry(str(tmp_path), token=ts)
    return ts, reg


def test_token_auth_push_pull_and_scopes(tmp_path, estargz):
    blob, _ = estargz
    ts, reg = token_setup(tmp_path)
    with reg:
        ref = f"{reg.host}/team/app:1"
        good = auth_file(tmp_path, reg.host, "bob", "pw")
        with make_client(reg.host, auth_files=good) as c:
            push_image(c, ref, [blob])
            img = c.resolve(ref)
            src = c.blob_source(ref, img.layers[0].digest, img.layers[0].size)
            assert src.read_ranges([(0, 4), (100_000, 4)]) == [blob[:4], blob[100_000:100_004]]
        scopes = [s for r in ts.requests for s in r["scope"]]
        assert "repository:team/app:pull,push" in scopes
        assert "repository:team/app:pull" in scopes
        bad = auth_file(tmp_path, reg.host, "bob", "nope", name="bad.json")
        with make_client(reg.host, auth_files=bad) as c:
            with pytest.raises(AuthError, match="token server .* rejected the credentials"):
                c.resolve(ref)
        with make_client(reg.host, auth_files=[]) as c:
            with pytest.raises(AuthError, match="no credentials in any auth file"):
                c.resolve(ref)


def test_anonymous_pull_token(tmp_path, estargz):
    blob, _ = estargz
    ts, reg = token_setup(tmp_path, anonymous_pull=True)
    with reg:
        ref = f"{reg.host}/pub:1"
        with make_client(reg.host, auth_files=auth_file(tmp_path, reg.host, "bob", "pw")) as c:
            push_image(c, ref, [blob])
        with make_client(reg.host, auth_files=[]) as c:
            assert c.resolve(ref).layers
            with pytest.raises(AuthError, match="access denied|no credentials"):
                c.push_blob(f"{reg.host}/pub:1", b"new blob")


def test_short_lived_token_is_refreshed(tmp_path, estargz):
    blob, _ = estargz
    # a lifetime the next read surely falls within, even on a loaded machine (the
    # client takes a tenth off it)
    lifetime = 3
    ts, reg = token_setup(tmp_path, expires_in=lifetime)
    with reg:
        ref = f"{reg.host}/app:1"
        with make_client(reg.host, auth_files=auth_file(tmp_path, reg.host, "bob", "pw")) as c:
            push_image(c, ref, [blob])
            img = c.resolve(ref)
            src = c.blob_source(ref, img.layers[0].digest, img.layers[0].size)
            assert src.read_at(0, 10) == blob[:10]
            issued = ts.issued
            had_token = time.monotonic()                    # the token came before this
            assert src.read_at(10, 10) == blob[10:20]
            assert ts.issued == issued                      # still valid: reused
            time.sleep(max(0.0, had_token + lifetime + 0.2 - time.monotonic()))
            assert src.read_at(20, 10) == blob[20:30]
            assert ts.issued == issued + 1                  # expired: refreshed


def test_token_rejected_with_401_is_refetched(tmp_path, estargz):
    blob, _ = estargz
    ts, reg = token_setup(tmp_path, stale_first=True)
    with reg:
        ref = f"{reg.host}/app:1"
        with make_client(reg.host, auth_files=auth_file(tmp_path, reg.host, "bob", "pw")) as c:
            push_image(c, ref, [blob])              # the first token is refused: 401
            assert c.resolve(ref).layers[0].size == len(blob)
        assert ts.issued >= 2


# -- mirrors, blocked -----------------------------------------------------

def test_mirror_fallback(tmp_path, registry, image, estargz):
    """Mirrors in order: a dead one, one without the image, then one that has it."""
    blob, _ = estargz
    with refused_port() as port, Registry(str(tmp_path)) as empty:
        dead = f"127.0.0.1:{port}"
        conf = tmp_path / "registries.conf"
        conf.write_text(f"""
[[registry]]
prefix = "primary.invalid"
location = "127.0.0.1:1"
insecure = true
[[registry.mirror]]
location = "{dead}"
insecure = true
[[registry.mirror]]
location = "{empty.host}"
insecure = true
[[registry.mirror]]
location = "{registry.host}"
insecure = true
""")
        c = RegistryClient(registries_conf=str(conf), auth_files=[], retries=0,
                           platform="linux/amd64", connect_timeout=1)
        with c:
            img = c.resolve("primary.invalid/app:1")
            assert img.reference == "primary.invalid/app:1"
            assert img.source == image
            layer = img.layers[0]
            src = c.blob_source(img, layer.digest, layer.size)
            assert src.read_at(5, 5) == blob[5:10]
            with pytest.raises(RegistryError, match="cannot resolve .*refused.*not found.*not found"):
                c.resolve("primary.invalid/nothere:1")


def test_blocked_registry(registry, tmp_path):
    conf = tmp_path / "r.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}"\nblocked = true\n')
    with RegistryClient(registries_conf=str(conf), auth_files=[]) as c:
        with pytest.raises(RegistryError, match="blocked in registries.conf"):
            c.resolve(f"{registry.host}/app:1")


def test_short_name_via_search_registries(registry, image, tmp_path):
    conf = tmp_path / "r.conf"
    conf.write_text(f'unqualified-search-registries = ["{registry.host}"]\n'
                    f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    with RegistryClient(registries_conf=str(conf), auth_files=[], platform="linux/amd64") as c:
        img = c.resolve("app:1")
        assert img.reference == image


def test_blob_reads_fall_back_to_next_mirror(tmp_path, estargz):
    blob, _ = estargz
    with Registry(str(tmp_path)) as a, Registry(str(tmp_path)) as b:
        conf = RegistriesConf.from_text(f"""
[[registry]]
prefix = "primary.invalid"
location = "127.0.0.1:1"
insecure = true
[[registry.mirror]]
location = "{a.host}"
insecure = true
[[registry.mirror]]
location = "{b.host}"
insecure = true
""")
        with make_client(a.host, b.host) as pusher:
            for reg in (a, b):
                push_image(pusher, f"{reg.host}/app:1", [blob])
        with RegistryClient(registries_conf=conf, auth_files=[], retries=0,
                            connect_timeout=1, platform="linux/amd64") as c:
            img = c.resolve("primary.invalid/app:1")
            assert img.source == f"{a.host}/app:1"
            src = c.blob_source(img, img.layers[0].digest, img.layers[0].size)
            assert src.read_at(0, 8) == blob[:8]
            a.kill()
            assert src.read_at(8, 8) == blob[8:16]
            assert src.reference.registry == b.host
