"""Image references parsed the way Podman parses them."""

import pytest

from stargz_overlay.errors import InvalidReference
from stargz_overlay.reference import api_host, parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repo, tag, digest, full", [
    ("127.0.0.1:5000/app:1", "127.0.0.1:5000", "app", "1", None, "127.0.0.1:5000/app:1"),
    ("docker://127.0.0.1:5000/app", "127.0.0.1:5000", "app", "latest", None,
     "127.0.0.1:5000/app:latest"),
    ("localhost/ns/app@" + D, "localhost", "ns/app", None, D, "localhost/ns/app@" + D),
    ("quay.io/a/b:v1@" + D, "quay.io", "a/b", "v1", D, "quay.io/a/b:v1@" + D),
    ("docker.io/alpine", "docker.io", "library/alpine", "latest", None,
     "docker.io/library/alpine:latest"),
    ("index.docker.io/foo/bar:x", "docker.io", "foo/bar", "x", None, "docker.io/foo/bar:x"),
    ("[::1]:5000/app:2", "[::1]:5000", "app", "2", None, "[::1]:5000/app:2"),
    ("alpine", "", "alpine", "latest", None, "alpine:latest"),
    ("ns/app:3", "", "ns/app", "3", None, "ns/app:3"),
])
def test_parse(text, registry, repo, tag, digest, full):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert str(ref) == full
    assert ref.is_short == (registry == "")


def test_locator_and_api_host():
    assert parse_reference("docker.io/x/y@" + D).locator == D
    assert parse_reference("docker.io/x/y").locator == "latest"
    assert api_host("docker.io") == "registry-1.docker.io"
    assert api_host("127.0.0.1:5000") == "127.0.0.1:5000"


def test_with_name_keeps_tag_and_adds_library():
    ref = parse_reference("alpine:3")
    assert str(ref.with_name("docker.io/alpine")) == "docker.io/library/alpine:3"


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("127.0.0.1:5000/App:1", "lowercase"),
    ("127.0.0.1:5000/app:-bad", "invalid tag"),
    ("127.0.0.1:5000/app@sha256:1234", "invalid"),
    ("127.0.0.1:5000/app@sha256:" + "AB" * 32, "sha256"),
    ("oci:/tmp/x", "docker://"),
    ("127.0.0.1:5000/", "no repository"),
    ("127.0.0.1:5000/a//b", "invalid repository"),
    ("host.example/" + "a" * 300, "longer than"),
])
def test_invalid(text, message):
    with pytest.raises(InvalidReference, match=message):
        parse_reference(text)
