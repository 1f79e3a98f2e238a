"""Auth files in Podman's order, credential helpers, WWW-Authenticate parsing."""

import base64
import json
import os
import stat

import pytest

from stargz_overlay.auth import AuthFiles, default_auth_files, parse_challenges
from stargz_overlay.errors import AuthError, ConfigError


def b64(text):
    return base64.b64encode(text.encode()).decode()


def write(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def test_default_order(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    assert [p for p, _ in default_auth_files(env)] == [
        str(tmp_path / "run/containers/auth.json"),
        str(tmp_path / ".config/containers/auth.json"),
        str(tmp_path / ".docker/config.json"),
        str(tmp_path / ".dockercfg")]
    env["REGISTRY_AUTH_FILE"] = str(tmp_path / "custom.json")
    env["DOCKER_CONFIG"] = str(tmp_path / "dc")
    env["XDG_CONFIG_HOME"] = str(tmp_path / "cfg")
    assert [p for p, _ in default_auth_files(env)] == [
        str(tmp_path / "custom.json"), str(tmp_path / "cfg/containers/auth.json"),
        str(tmp_path / "dc/config.json"), str(tmp_path / ".dockercfg")]


def test_first_file_wins_and_namespaces(tmp_path):
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    write(tmp_path / "run/containers/auth.json",
          {"auths": {"reg.io/team": {"auth": b64("team:t")}}})
    write(tmp_path / ".config/containers/auth.json",
          {"auths": {"reg.io": {"auth": b64("user:s3cr3t-pw")}}})
    write(tmp_path / ".docker/config.json",
          {"auths": {"reg.io": {"auth": b64("docker:d")},
                     "https://index.docker.io/v1/": {"auth": b64("hub:h:with:colons")}}})
    af = AuthFiles(env=env)
    assert af.lookup("reg.io", "team/app").username == "team"
    creds = af.lookup("reg.io", "other/app")
    assert (creds.username, creds.password) == ("user", "s3cr3t-pw")
    assert creds.origin.endswith(".config/containers/auth.json")
    hub = af.lookup("docker.io", "library/alpine")
    assert (hub.username, hub.password) == ("hub", "h:with:colons")
    assert af.lookup("nowhere.io") is None
    assert "s3cr3t" not in repr(creds) and "s3cr3t" not in str(creds)


def test_legacy_dockercfg(tmp_path):
    write(tmp_path / ".dockercfg", {"legacy.io": {"auth": b64("old:o")}})
    af = AuthFiles(env={"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "r")})
    assert af.lookup("legacy.io").username == "old"


@pytest.fixture
def helper_dir(tmp_path):
    """A fake ``docker-credential-test`` that knows one server and logs calls."""
    d = tmp_path / "bin"
    d.mkdir()
    script = d / "docker-credential-test"
    script.write_text(
        "#!/bin/sh\n"
        f"read server; echo \"$1 $server\" >> {tmp_path}/helper.log\n"
        'case "$server" in\n'
        '  helped.io) echo \'{"ServerURL":"helped.io","Username":"hu","Secret":"hs"}\' ;;\n'
        '  tok.io) echo \'{"ServerURL":"tok.io","Username":"<token>","Secret":"rt"}\' ;;\n'
        '  broken.io) echo "keychain locked" >&2; exit 3 ;;\n'
        '  *) echo "credentials not found in native keychain"; exit 1 ;;\n'
        "esac\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return d


def test_credential_helpers(tmp_path, helper_dir):
    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "r"),
           "PATH": f"{helper_dir}:{os.environ['PATH']}"}
    write(tmp_path / ".docker/config.json",
          {"credHelpers": {"helped.io": "test", "tok.io": "test", "broken.io": "test",
                           "gone.io": "missing"},
           "auths": {"helped.io": {"auth": b64("file:f")}, "other.io": {"auth": b64("o:o")}},
           "credsStore": "test"})
    af = AuthFiles(env=env)
    creds = af.lookup("helped.io", "x")
    assert (creds.username, creds.password) == ("hu", "hs")       # credHelpers beat auths
    assert creds.origin == "docker-credential-test"
    tok = af.lookup("tok.io")
    assert tok.identity_token == "rt" and tok.username == ""
    assert af.lookup("other.io").username == "o"                   # auths beat credsStore
    assert af.lookup("unknown.io") is None                         # store: not found
    with pytest.raises(AuthError, match="docker-credential-test failed for broken.io"):
        af.lookup("broken.io")
    with pytest.raises(AuthError, match="docker-credential-missing .*not installed"):
        af.lookup("gone.io")
    calls = (tmp_path / "helper.log").read_text().split("\n")
    assert "get helped.io" in calls and "get unknown.io" in calls


def test_bad_auth_file(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        AuthFiles([str(path)]).lookup("x.io")
    path.write_text(json.dumps({"auths": {"x.io": {"auth": "bm9jb2xvbg=="}}}))  # "nocolon"
    with pytest.raises(ConfigError, match="user:password"):
        AuthFiles([str(path)]).lookup("x.io")


def test_parse_challenges():
    got = parse_challenges('Bearer realm="https://auth.io/token",service="reg.io",'
                           'scope="repository:a/b:pull,push", Basic realm="x"')
    assert got == [("bearer", {"realm": "https://auth.io/token", "service": "reg.io",
                               "scope": "repository:a/b:pull,push"}),
                   ("basic", {"realm": "x"})]
    assert parse_challenges("") == []
    assert parse_challenges('Basic realm="a \\"q\\""') == [("basic", {"realm": 'a "q"'})]
