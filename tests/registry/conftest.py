"""Shared fixtures: a plain-HTTP registry with an eStargz image, clients for it."""

import io
import os
import tarfile

import pytest

from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import RegistryClient, TOC_DIGEST_ANNOTATION
from stargz_overlay.writer import convert

from ..registryfixture import Registry, push_image

BIG = os.urandom(300_000)
FILES = {"etc/hello.txt": b"hello world\n", "usr/bin/big.bin": BIG,
         "usr/share/doc/readme": b"read me\n" * 100}


def insecure_conf(*hosts):
    return RegistriesConf.from_text("".join(
        f'[[registry]]\nlocation = "{h}"\ninsecure = true\n' for h in hosts))


def make_client(*hosts, **kw):
    """A client trusting nothing from this machine (no auth files, no certs.d)."""
    kw.setdefault("auth_files", [])
    kw.setdefault("certs_dir", os.devnull)
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0.05)
    kw.setdefault("platform", "linux/amd64")
    return RegistryClient(registries_conf=insecure_conf(*hosts), **kw)


def build_estargz(files=FILES, chunk_size=65536, legacy=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    res = convert(io.BytesIO(buf.getvalue()), out, chunk_size=chunk_size, legacy=legacy)
    return out.getvalue(), res


@pytest.fixture(scope="session")
def estargz():
    """(blob bytes, ConvertResult) of a small eStargz layer with FILES."""
    return build_estargz()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with Registry(str(tmp_path_factory.mktemp("registry"))) as reg:
        yield reg


@pytest.fixture(scope="module")
def image(registry, estargz):
    """``REF`` of an image whose layer 0 is eStargz (annotated), layer 1 plain gzip."""
    import gzip
    blob, res = estargz
    plain = gzip.compress(b"not a tar, just gzip" * 100)
    ref = f"{registry.host}/app:1"
    with make_client(registry.host) as c:
        push_image(c, ref, [blob, plain],
                   layer_annotations=[{TOC_DIGEST_ANNOTATION: res.toc_digest}, None])
    return ref
