"""The registry client against a real docker-registry (and misbehaving proxies)."""

import hashlib
import time

import pytest

from stargz_overlay.errors import (DigestMismatch, FormatError, NotFoundError, RangeNotSupported,
                                   RegistryError, SourceError)
from stargz_overlay.reader import StargzReader
from stargz_overlay.registry import OCI_INDEX, OCI_MANIFEST

from ..registryfixture import Proxy, Registry, push_image
from .conftest import FILES, make_client


def test_push_resolve_roundtrip(registry, image, estargz):
    blob, res = estargz
    with make_client(registry.host) as c:
        img = c.resolve(image)
        assert img.reference == image
        assert img.platform == "linux/amd64"
        assert len(img.layers) == 2
        layer = img.layers[0]
        assert layer.digest == res.blob_digest and layer.size == len(blob)
        assert layer.toc_digest == res.toc_digest
        assert img.config["rootfs"]["type"] == "layers"
        assert img.manifest_digest == "sha256:" + hashlib.sha256(img.manifest_bytes).hexdigest()
        pinned = c.resolve(f"{registry.host}/app@{img.manifest_digest}")
        assert pinned.layers == img.layers
        assert c.get_blob(image, layer.digest, limit=1 << 20) == blob
        with pytest.raises(NotFoundError, match="not found"):
            c.resolve(f"{registry.host}/app:nosuchtag")
        with pytest.raises(NotFoundError):
            c.resolve(f"{registry.host}/nosuchrepo:1")


def test_push_skips_existing_and_mounts(registry, estargz):
    blob, _ = estargz
    with make_client(registry.host) as c:
        c.push_blob(f"{registry.host}/src/a:1", blob)
        before = c.stats.bytes_sent
        c.push_blob(f"{registry.host}/src/a:1", blob)               # HEAD says it exists
        assert c.stats.bytes_sent == before
        assert not c.blob_exists(f"{registry.host}/dst/b:1", "sha256:" + hashlib.sha256(
            blob).hexdigest())
        c.push_blob(f"{registry.host}/dst/b:1", blob, mount_from="src/a")
        assert c.stats.bytes_sent == before                          # mounted, not uploaded
        assert c.blob_exists(f"{registry.host}/dst/b:1", "sha256:" + hashlib.sha256(
            blob).hexdigest())
        with pytest.raises(DigestMismatch):
            c.push_blob(f"{registry.host}/dst/b:1", b"abc", digest="sha256:" + "0" * 64)


def test_index_platform_selection(registry):
    ref = f"{registry.host}/multi:1"
    with make_client(registry.host) as c:
        descs = []
        for arch, variant in (("amd64", ""), ("arm64", "v8"), ("arm", "v7")):
            cfg = {"os": "linux", "architecture": arch, "rootfs": {"type": "layers",
                                                                   "diff_ids": []}}
            if variant:
                cfg["variant"] = variant
            d = push_image(c, f"{registry.host}/multi@sha256:" + "0" * 64
                           if False else f"{registry.host}/multi:{arch}", [arch.encode()],
                           config=cfg)
            platform = {"os": "linux", "architecture": arch}
            if variant:
                platform["variant"] = variant
            size = len(c.resolve(f"{registry.host}/multi:{arch}").manifest_bytes)
            descs.append({"mediaType": OCI_MANIFEST, "digest": d, "size": size,
                          "platform": platform})
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs}
        index_digest = c.push_manifest(ref, index)
        arm = c.resolve(ref, platform="linux/arm64")
        assert arm.platform == "linux/arm64/v8" and arm.config["architecture"] == "arm64"
        assert arm.index_digest == index_digest and arm.manifest_digest == descs[1]["digest"]
        assert c.resolve(ref).config["architecture"] == "amd64"    # client default
        assert c.resolve(ref, platform="linux/arm/v7").manifest_digest == descs[2]["digest"]
        with pytest.raises(NotFoundError, match="linux/s390x.*linux/amd64, linux/arm64/v8"):
            c.resolve(ref, platform="linux/s390x")
        with pytest.raises(NotFoundError, match="linux/arm/v6"):
            c.resolve(ref, platform="linux/arm/v6")


def test_reader_over_registry_two_round_trips(registry, image, estargz):
    blob, res = estargz
    with make_client(registry.host) as c:
        img = c.resolve(image)
        layer = img.layers[0]
        before = c.stats.requests
        src = c.blob_source(image, layer.digest, layer.size)
        reader = StargzReader(src, toc_digest=layer.toc_digest)
        assert c.stats.requests - before == 2            # footer, then TOC
        for name, data in FILES.items():
            assert reader.read_file(reader.toc.lookup(name)) == data
        assert reader.verify().files >= len(FILES)
        before = c.stats.requests
        StargzReader(c.blob_source(image, layer.digest, layer.size), toc_offset=reader.toc_offset)
        assert c.stats.requests - before == 1


def test_read_ranges_multi_and_coalesced(registry, image, estargz):
    blob, _ = estargz
    with make_client(registry.host, coalesce_gap=1000) as c:
        layer = c.resolve(image).layers[0]
        src = c.blob_source(image, layer.digest, layer.size)
        asks = [(5000, 100), (0, 10), (200_000, 7), (5150, 100), (len(blob) - 3, 3), (9, 0)]
        c.stats.reset()
        got = src.read_ranges(asks)
        assert got == [blob[o:o + n] for o, n in asks]
        assert c.stats.multi_range_requests == 1 and c.stats.requests == 1
        c.stats.reset()
        assert src.read_ranges([(10, 10), (500, 10)]) == [blob[10:20], blob[500:510]]
        assert (c.stats.range_requests, c.stats.multi_range_requests) == (1, 0)   # merged
        assert src.read_at(0, 0) == b""
        with pytest.raises(SourceError, match="outside the blob"):
            src.read_at(len(blob) - 1, 2)


def test_size_from_head(registry, image, estargz):
    blob, res = estargz
    with make_client(registry.host) as c:
        src = c.blob_source(image, res.blob_digest)
        assert src.size == len(blob)
        with pytest.raises(NotFoundError):
            c.blob_source(image, "sha256:" + "1" * 64).size


@pytest.mark.parametrize("mode", ["416", "400", "200"])
def test_multirange_refused_falls_back(registry, image, estargz, mode):
    blob, _ = estargz
    with Proxy(registry.host, multirange=mode) as proxy:
        with make_client(proxy.host, coalesce_gap=0) as c:
            layer = c.resolve(image.replace(registry.host, proxy.host)).layers[0]
            src = c.blob_source(image.replace(registry.host, proxy.host), layer.digest,
                                layer.size)
            asks = [(0, 100), (100_000, 100), (250_000, 100)]
            proxy.clear()
            c.stats.reset()
            assert src.read_ranges(asks) == [blob[o:o + n] for o, n in asks]
            gets = proxy.requests("GET", kind="blob")
            assert [g[2] for g in gets] == ["bytes=0-99,100000-100099,250000-250099",
                                            "bytes=0-99", "bytes=100000-100099",
                                            "bytes=250000-250099"]
            assert c.stats.bytes_received == 300            # the 200 body was never read
            assert c.stats.full_body_aborts == (1 if mode == "200" else 0)
            proxy.clear()
            assert src.read_ranges(asks[:2]) == [blob[o:o + n] for o, n in asks[:2]]
            assert len(proxy.requests("GET", kind="blob")) == 2    # remembered: no retry


def test_range_ignored_is_an_error_not_a_download(tmp_path, estargz):
    blob, res = estargz
    big = blob + b"\0" * (8 << 20)     # large, so a silent full download would show
    with Registry(str(tmp_path)) as reg, Proxy(reg.host, ignore_range=True) as proxy:
        ref = f"{proxy.host}/big:1"
        with make_client(reg.host, proxy.host) as c:
            push_image(c, f"{reg.host}/big:1", [big])
            layer = c.resolve(ref).layers[0]
            src = c.blob_source(ref, layer.digest, layer.size)
            c.stats.reset()
            t = time.monotonic()
            with pytest.raises(RangeNotSupported, match="ignores Range"):
                src.read_at(1000, 10)
            assert time.monotonic() - t < 5
            assert c.stats.bytes_received == 0 and c.stats.full_body_aborts == 1
            assert c.stats.retries == 0
            # asking for the whole blob is not a range: that is allowed
            assert src.read_at(0, layer.size) == big


def test_redirects_followed_and_cached(registry, image, estargz):
    blob, _ = estargz
    with Proxy(registry.host, redirect_blobs=True) as proxy:
        ref = image.replace(registry.host, proxy.host)
        # the TTL must outlast the next request even on a loaded machine
        ttl = 2.0
        with make_client(proxy.host, redirect_ttl=ttl) as c:
            layer = c.resolve(ref).layers[0]
            src = c.blob_source(ref, layer.digest, layer.size)
            proxy.clear()
            assert src.read_at(10, 10) == blob[10:20]
            redirected = time.monotonic()                 # the redirect came before this
            assert src.read_ranges([(0, 5), (200_000, 5)]) == [blob[:5], blob[200_000:200_005]]
            statuses = [g[3] for g in proxy.requests("GET", kind="blob")]
            assert statuses == [307, 206, 206]             # one redirect, then cached
            assert c.stats.redirect_cache_hits == 1
            # TTL over: ask the registry again
            time.sleep(max(0.0, redirected + ttl + 0.1 - time.monotonic()))
            proxy.clear()
            assert src.read_at(30, 10) == blob[30:40]
            assert [g[3] for g in proxy.requests("GET", kind="blob")] == [307, 206]


def test_redirect_ttl_from_presigned_url(registry, image, estargz):
    blob, _ = estargz
    with Proxy(registry.host, redirect_blobs=True,
               redirect_query=f"Expires={int(time.time()) - 10}") as proxy:
        ref = image.replace(registry.host, proxy.host)
        with make_client(proxy.host, redirect_ttl=600) as c:
            layer = c.resolve(ref).layers[0]
            src = c.blob_source(ref, layer.digest, layer.size)
            proxy.clear()
            assert src.read_at(0, 4) == blob[:4]
            time.sleep(0.01)
            assert src.read_at(4, 4) == blob[4:8]
            # an expired signature is used once (straight after the redirect) only
            assert [g[3] for g in proxy.requests("GET", kind="blob")][:2] == [307, 206]


def test_registry_killed_mid_read(tmp_path, estargz):
    blob, _ = estargz
    with Registry(str(tmp_path)) as reg:
        ref = f"{reg.host}/app:1"
        with make_client(reg.host, retries=2, backoff=0.1, connect_timeout=1,
                         read_timeout=2, deadline=10) as c:
            push_image(c, ref, [blob])
            layer = c.resolve(ref).layers[0]
            src = c.blob_source(ref, layer.digest, layer.size)
            assert src.read_at(0, 10) == blob[:10]
            reg.kill()
            t = time.monotonic()
            with pytest.raises(RegistryError, match="connection refused.*3 attempts"):
                src.read_at(100, 10)
            assert time.monotonic() - t < 3
            with pytest.raises(RegistryError, match="connection refused"):
                c.resolve(ref)


def test_hung_registry_times_out(tmp_path, estargz):
    blob, _ = estargz
    with Registry(str(tmp_path)) as reg:
        ref = f"{reg.host}/app:1"
        with make_client(reg.host, retries=5, backoff=0.05, connect_timeout=1,
                         read_timeout=0.5, deadline=2) as c:
            push_image(c, ref, [blob])
            layer = c.resolve(ref).layers[0]
            src = c.blob_source(ref, layer.digest, layer.size)
            reg.freeze()
            try:
                t = time.monotonic()
                with pytest.raises(RegistryError, match="timed out|deadline"):
                    src.read_at(100, 10)
                assert time.monotonic() - t < 3.5
            finally:
                reg.thaw()


def test_retry_on_5xx_then_success(registry, image, estargz):
    """A proxy whose upstream is briefly gone answers 502; the client retries."""
    blob, _ = estargz
    import threading
    with Proxy("127.0.0.1:1") as proxy:             # nothing listens there: 502
        ref = image.replace(registry.host, proxy.host)

        def upstream_back():
            # the registry comes back once the proxy has answered a 502, not after a
            # fixed time: the client's first request may come late on a loaded machine
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    g[3] == 502 for g in proxy.requests()):
                time.sleep(0.01)
            proxy.upstream = registry.host

        back = threading.Thread(target=upstream_back, daemon=True)
        back.start()
        # retries: room for the switch above even if its thread is scheduled late
        with make_client(proxy.host, retries=6, backoff=0.2) as c:
            img = c.resolve(ref)
            assert img.layers[0].size == len(blob)
            assert c.stats.retries >= 1
        back.join(5)


def test_corrupted_bytes_are_detected(registry, image, estargz):
    """A proxy flips one byte: the read fails (gzip CRC or digest), never wrong data."""
    blob, res = estargz
    with make_client(registry.host) as c:
        clean = StargzReader(c.blob_source(image, res.blob_digest, len(blob)),
                             toc_digest=res.toc_digest)
    entry = clean.toc.lookup("usr/bin/big.bin")
    for flip, where in ((entry.chunks[1].offset + 40, "chunk"), (clean.toc_offset + 60, "toc")):
        with Proxy(registry.host, multirange="416", flip_byte=flip) as proxy:
            ref = image.replace(registry.host, proxy.host)
            with make_client(proxy.host) as c:
                src = c.blob_source(ref, res.blob_digest, len(blob))
                assert src.read_at(flip, 1) != blob[flip:flip + 1]     # the proxy does flip
                with pytest.raises((DigestMismatch, FormatError)) as err:
                    reader = StargzReader(src, toc_digest=res.toc_digest)
                    reader.read_file(reader.toc.lookup("usr/bin/big.bin"))
                if where == "chunk":
                    assert "big.bin" in str(err.value)
                    # the other files are still served, verified
                    assert reader.read_file(reader.toc.lookup("etc/hello.txt")) == \
                        FILES["etc/hello.txt"]


def test_answer_cut_off_mid_body(registry, image, estargz):
    """A registry dying in the middle of an answer: retried, then a clear error."""
    blob, _ = estargz
    with Proxy(registry.host, truncate=1, truncate_at=100) as proxy:
        ref = image.replace(registry.host, proxy.host)
        with make_client(proxy.host, retries=2, backoff=0.05, read_timeout=2) as c:
            layer = c.resolve(ref).layers[0]
            src = c.blob_source(ref, layer.digest, layer.size)
            assert src.read_at(1000, 50_000) == blob[1000:51_000]
            assert c.stats.retries == 1
            proxy.truncate = 100
            t = time.monotonic()
            with pytest.raises(RegistryError, match="3 attempts"):
                src.read_at(1000, 50_000)
            assert time.monotonic() - t < 5


def test_concurrent_reads(registry, image, estargz):
    import random
    import threading
    blob, _ = estargz
    errors = []
    with make_client(registry.host, pool_size=4) as c:
        layer = c.resolve(image).layers[0]
        src = c.blob_source(image, layer.digest, layer.size)

        def work(seed):
            rnd = random.Random(seed)
            try:
                for _ in range(15):
                    asks = [(o, rnd.randint(1, 5000)) for o in
                            (rnd.randrange(0, len(blob) - 5000) for _ in range(3))]
                    if src.read_ranges(asks) != [blob[o:o + n] for o, n in asks]:
                        errors.append("wrong bytes")
            except Exception as exc:       # noqa: BLE001 - reported below
                errors.append(repr(exc))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []


def test_proxy_environment(monkeypatch):
    from stargz_overlay.registry import _proxies_for
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "internal.invalid")
    assert _proxies_for("quay.io")["https"] == "http://proxy.invalid:3128"
    assert _proxies_for("internal.invalid:5000") == {}
    assert _proxies_for("127.0.0.1:5000") == {} and _proxies_for("localhost:5000") == {}
