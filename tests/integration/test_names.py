"""The store's directory names: containers/storage's base64 of the image reference."""

import base64
import itertools
import string

from stargz_overlay.reference import is_sha256_digest
from stargz_overlay.store_view import decode_ref, encode_ref

# every character a reference can hold: registry host and port, repository path,
# tag (upper case too), digest algorithm (may hold '+') and hex
REF_CHARS = string.ascii_letters + string.digits + "._-:/@+"


def test_encoding_matches_containers_storage():
    ref = "127.0.0.1:5000/app:1"
    assert encode_ref(ref) == base64.b64encode(ref.encode()).decode() == \
        "MTI3LjAuMC4xOjUwMDAvYXBwOjE="
    assert decode_ref(encode_ref(ref)) == ref


def test_a_reference_never_encodes_to_a_slash():
    """Standard base64 has '/', but only for 6-bit groups 111111, which ASCII can make
    only with '?' or DEL as the third byte of a group: neither is in a reference."""
    for triple in itertools.product(REF_CHARS, repeat=3):
        assert "/" not in base64.b64encode("".join(triple).encode()).decode()
    for pair in itertools.product(REF_CHARS, repeat=2):
        assert "/" not in base64.b64encode("".join(pair).encode()).decode()
    assert "/" in base64.b64encode(b"ab?").decode()        # the alphabet does have it


def test_names_that_are_not_store_references():
    assert decode_ref("") is None
    assert decode_ref("not base64") is None
    assert decode_ref(base64.b64encode(b"\xff\xfe").decode()) is None    # not UTF-8
    assert decode_ref(encode_ref("busybox:latest")) is None     # a short name has no registry
    assert decode_ref(encode_ref("127.0.0.1:5000/Bad/Repo:1")) is None
    assert decode_ref(encode_ref("docker.io/library/busybox@sha256:" + "a" * 64)) == \
        "docker.io/library/busybox@sha256:" + "a" * 64


def test_layer_names():
    assert is_sha256_digest("sha256:" + "0" * 64)
    assert not is_sha256_digest("sha256:" + "0" * 63)
    assert not is_sha256_digest("sha512:" + "0" * 64)
    assert not is_sha256_digest("sha256:" + "G" * 64)
