"""The TOC kept in the cache: container mounts of store layers read no footer or TOC.

The store verifies each layer's TOC at ``podman pull`` and keeps the JSON in
the content cache under its digest; the mount program passes the TOC offset
and format on, so a container's mount builds the layer from the cache.
Counted at the proxy in front of a real docker-registry, with real podman,
store and fuse-overlayfs (``env`` of conftest: no prefetch, no background
fetch).
"""

import os
import re
import time

import pytest

from stargz_overlay.reader import StargzReader
from stargz_overlay.source import BytesSource

from .conftest import busybox_tar, cli, estargz, push, run
from ..imagefixture import tar_layer

APP = tar_layer({"app": ("dir",), "app/hello.txt": b"hello from the TOC cache\n",
                 "app/big.bin": os.urandom(300_000)})


@pytest.fixture(scope="module")
def images(env):
    base = estargz(busybox_tar())
    app = estargz(APP)
    ref = push(env.registry.host, "toccache/app:1", [base, app])
    ref = ref.replace(env.registry.host, env.host, 1)          # through the counting proxy
    return {"base": base, "app": app, "ref": ref}


def toc_of(layer):
    reader = StargzReader(BytesSource(layer.blob))
    return reader.toc_offset, reader.toc_digest, reader.toc_json


def tail_requests(env, layer, since):
    """GETs of ``layer``'s blob after ``since`` that reach its TOC or footer."""
    toc_offset = toc_of(layer)[0]
    count = 0
    for method, path, rng, _status in env.proxy.log[since:]:
        if method != "GET" or not path.split("?")[0].endswith(layer.digest):
            continue
        ends = [int(b) for _a, b in re.findall(r"(\d+)-(\d+)", rng or "")]
        if not ends or max(ends) >= toc_offset:
            count += 1
    return count


def cached_toc(env, layer):
    digest = toc_of(layer)[1]
    return os.path.join(env.cache, "sha256", digest[7:9], digest[7:])


def test_container_mount_reads_no_footer_or_toc_after_pull(env, images):
    mark = env.mark()
    env.podman("pull", "-q", images["ref"])
    for name in ("base", "app"):
        layer = images[name]
        assert tail_requests(env, layer, mark) >= 1, "the store read no TOC at pull?"
        with open(cached_toc(env, layer), "rb") as f:
            assert f.read() == toc_of(layer)[2]
    mark = env.mark()
    assert run(env, images["ref"], "cat", "/app/hello.txt").stdout == \
        "hello from the TOC cache\n"
    for name in ("base", "app"):
        assert tail_requests(env, images[name], mark) == 0, name
    # the mount really went to the registry for the files (the count sees requests)
    assert env.layer_gets(images["base"], mark)[1] > 0


def test_new_container_starts_during_a_registry_outage(env, images):
    env.podman("pull", "-q", images["ref"])
    run(env, images["ref"], "cat", "/app/hello.txt")       # what the command reads is cached
    env.registry.kill()
    try:
        started = time.monotonic()
        out = run(env, images["ref"], "cat", "/app/hello.txt", check=False, timeout=90)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "hello from the TOC cache\n"
        assert time.monotonic() - started < 60
        # what was never read still fails cleanly, instead of the mount failing
        out = run(env, images["ref"], "cat", "/app/big.bin", check=False, timeout=90)
        assert out.returncode != 0 and "Input/output error" in out.stderr
    finally:
        env.registry.start()


def test_damaged_cached_toc_falls_back_to_the_registry(env, images):
    env.podman("pull", "-q", images["ref"])
    app = images["app"]
    path = cached_toc(env, app)
    good = toc_of(app)[2]
    os.chmod(path, 0o600)
    with open(path, "wb") as f:                 # same size, different bytes
        f.write(good.replace(b"hello.txt", b"HELLO.txt"))
    mark = env.mark()
    assert run(env, images["ref"], "cat", "/app/hello.txt").stdout == \
        "hello from the TOC cache\n"
    assert tail_requests(env, app, mark) >= 1   # read from the registry instead
    assert tail_requests(env, images["base"], mark) == 0
    with open(path, "rb") as f:
        assert f.read() == good                 # and kept again for the next mounts
    with open(env.log, encoding="utf-8", errors="replace") as f:
        assert "is damaged" in f.read()


def test_a_mounted_layer_pins_its_toc(env, images):
    env.podman("pull", "-q", images["ref"])
    path = cached_toc(env, images["app"])
    assert os.path.exists(path)
    env.podman("run", "-d", "--name", "tocpin", "--network", "none", "--ulimit",
               "nofile=1024:1024", "--ulimit", "nproc=1024:1024", images["ref"], "sleep", "600")
    old = time.time() - 3600

    def gc():
        os.utime(path, (old, old))              # not used recently: only a pin keeps it
        cli("gc", "--max-size", "0", "--config", env.config)

    try:
        gc()
        assert os.path.exists(path), "the TOC of a mounted layer was evicted"
    finally:
        env.podman("rm", "-f", "-t", "0", "tocpin", check=False)
    gc()
    assert not os.path.exists(path), "gc evicts an unpinned TOC (the check above can fail)"
    # the next container reads it from the registry again and keeps it
    assert run(env, images["ref"], "cat", "/app/hello.txt").returncode == 0
    assert os.path.exists(path)
