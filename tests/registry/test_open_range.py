"""``RegistryBlob.open_range``: one streamed GET per range, against a real registry."""

import socket

import pytest

from stargz_overlay.errors import NotFoundError, RangeNotSupported, SourceError

from ..registryfixture import Proxy, push_image
from .conftest import make_client


def _body(resp):
    try:
        return b"".join(resp.iter_content(64 << 10))
    finally:
        resp.close()


def test_range_bytes_are_the_blob_slice(registry, image, estargz):
    blob, _ = estargz
    with make_client(registry.host) as c:
        layer = c.resolve(image).layers[0]
        src = c.blob_source(image, layer.digest, layer.size)
        c.stats.reset()
        resp = src.open_range(1000, 250_000)
        assert resp.status_code == 206
        assert _body(resp) == blob[1000:250_000]
        assert (c.stats.requests, c.stats.range_requests) == (1, 1)
        # the whole blob may come as a 200 or a 206: either way its bytes
        assert _body(src.open_range(0, len(blob))) == blob
        for start, end in ((-1, 10), (10, 10), (0, len(blob) + 1)):
            with pytest.raises(SourceError, match="outside the blob"):
                src.open_range(start, end)
        missing = c.blob_source(image, "sha256:" + "2" * 64, 100)
        with pytest.raises(NotFoundError):
            missing.open_range(0, 10)


def test_small_receive_buffer(registry, image, estargz):
    blob, _ = estargz
    with make_client(registry.host) as c:
        layer = c.resolve(image).layers[0]
        src = c.blob_source(image, layer.digest, layer.size)
        resp = src.open_range(0, 200_000, rcvbuf=16 << 10)
        try:
            sock = resp.raw.connection.sock
            # Linux doubles the value asked for (bookkeeping); autotuned ones are far larger
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * (16 << 10)
        finally:
            data = _body(resp)
        assert data == blob[:200_000]
        assert _body(src.open_range(5, 50, rcvbuf=16 << 10)) == blob[5:50]  # twin reused


def test_redirect_followed_and_counted(registry, image, estargz):
    blob, _ = estargz
    with Proxy(registry.host, redirect_blobs=True) as proxy:
        ref = image.replace(registry.host, proxy.host)
        with make_client(proxy.host) as c:
            layer = c.resolve(ref).layers[0]
            src = c.blob_source(ref, layer.digest, layer.size)
            proxy.clear()
            c.stats.reset()
            assert _body(src.open_range(100, 5000)) == blob[100:5000]
            assert [g[3] for g in proxy.requests("GET", kind="blob")] == [307, 206]
            assert (c.stats.redirects, c.stats.range_requests) == (1, 2)
            # a redirect cached by a read is used by the stream: straight to storage
            src.read_at(0, 10)
            proxy.clear()
            assert _body(src.open_range(7, 70)) == blob[7:70]
            assert [g[3] for g in proxy.requests("GET", kind="blob")] == [206]


def test_range_ignored_is_refused_unread(registry, estargz):
    blob, _ = estargz
    big = blob + b"\0" * (4 << 20)      # large, so a silent full download would show
    with make_client(registry.host) as c:
        push_image(c, f"{registry.host}/stream-big:1", [big])
    with Proxy(registry.host, ignore_range=True) as proxy, make_client(proxy.host) as c:
        ref = f"{proxy.host}/stream-big:1"
        src = c.blob_source(ref, c.resolve(ref).layers[0].digest, len(big))
        c.stats.reset()
        with pytest.raises(RangeNotSupported, match="ignores Range"):
            src.open_range(10, 1000)
        assert c.stats.full_body_aborts == 1 and c.stats.bytes_received == 0
        resp = src.open_range(0, len(big))             # the whole blob is allowed
        assert resp.status_code == 200 and _body(resp) == big
