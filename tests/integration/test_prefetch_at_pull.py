"""Prefetch at ``podman pull``: the store fetches the prioritized files before any container.

An eStargz image converted with prioritized files holds them before
``.prefetch.landmark``.  With prefetch on, the store starts that region's
prefetch (one Range request) as soon as it resolves the layer at pull, into
the shared cache; the container's mount then finds the files there.  With
``noprefetch = true`` nothing but the footer and TOC is read at pull.
Counted at the proxy in front of a real docker-registry, with real podman,
store and fuse-overlayfs.
"""

import hashlib
import io
import json
import os
import re
import time

import pytest

from stargz_overlay.reader import StargzReader
from stargz_overlay.registry import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from stargz_overlay.source import BytesSource
from stargz_overlay.writer import convert

from .conftest import Layer, StoreEnv, busybox_tar, estargz, push, run
from ..imagefixture import tar_layer

HOT = os.urandom(200_000)
START = b"#!/bin/sh\necho started\n"
COLD = os.urandom(400_000)
APP = tar_layer({"app": ("dir",), "app/cold.bin": COLD, "app/hot.bin": HOT,
                 "app/start.sh": START})
PRIORITIZED = ["app/start.sh", "app/hot.bin"]


def optimized(tar_bytes, prioritized):
    """A Layer converted like ``convert --analyze`` leaves it: prioritized files first."""
    out = io.BytesIO()
    res = convert(io.BytesIO(tar_bytes), out, chunk_size=65536, prioritized=prioritized)
    assert not res.missed_prioritized
    return Layer(out.getvalue(), res.diff_id,
                 {TOC_DIGEST_ANNOTATION: res.toc_digest,
                  UNCOMPRESSED_SIZE_ANNOTATION: str(res.uncompressed_size)}, tar_bytes)


@pytest.fixture(scope="module")
def layers():
    base = estargz(busybox_tar())
    app = optimized(APP, PRIORITIZED)
    region = StargzReader(BytesSource(app.blob)).prefetch_range()
    assert region is not None
    return {"base": base, "app": app, "region": region}


@pytest.fixture(scope="module")
def penv(tmp_path_factory):
    """A StoreEnv whose configuration turns prefetch on (metrics every second)."""
    e = StoreEnv(tmp_path_factory.mktemp("prefetch-at-pull"))
    try:
        with open(e.config, encoding="utf-8") as f:
            text = f.read()
        assert "noprefetch = true\n" in text and "[registry]" in text
        text = text.replace("noprefetch = true\n", "noprefetch = false\n")
        text = text.replace("[registry]", "metrics_period_sec = 1.0\n[registry]", 1)
        with open(e.config, "w", encoding="utf-8") as f:
            f.write(text)
        e.start_store()
        yield e
    finally:
        e.close()


def pushed(env, layers):
    ref = push(env.registry.host, "prefetch/app:1", [layers["base"], layers["app"]],
               cmd=("/bin/sh", "/app/start.sh"))
    return ref.replace(env.registry.host, env.host, 1)       # through the counting proxy


def region_gets(env, layer, region, since):
    """Ranges ``(a, b)`` (inclusive) of GETs of ``layer`` after ``since`` touching ``region``."""
    out = []
    for method, path, rng, _status in env.proxy.log[since:]:
        if method != "GET" or not path.split("?")[0].endswith(layer.digest):
            continue
        spans = [(int(a), int(b)) for a, b in re.findall(r"(\d+)-(\d+)", rng or "")]
        if not spans:
            spans = [(0, len(layer.blob) - 1)]
        out += [(a, b) for a, b in spans if a < region[1] and b >= region[0]]
    return out


def cached(env, data):
    path = os.path.join(env.cache, "sha256", hashlib.sha256(data).hexdigest()[:2],
                        hashlib.sha256(data).hexdigest())
    return os.path.exists(path)


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_pull_prefetches_the_prioritized_files_in_one_request(penv, layers):
    ref = pushed(penv, layers)
    app, region = layers["app"], layers["region"]
    mark = penv.mark()
    penv.podman("pull", "-q", ref)
    assert wait_for(lambda: cached(penv, HOT) and cached(penv, START)), \
        "the prioritized files did not reach the cache after the pull"
    assert not cached(penv, COLD)
    gets = region_gets(penv, app, region, mark)
    assert len(gets) == 1, gets                       # ONE request for the landmark region
    assert gets[0][0] <= region[0] and gets[0][1] >= region[1] - 1, (gets, region)
    assert penv.layer_gets(app, mark)[0] == 0         # never the whole blob

    # the store's metrics count those bytes as prefetch
    def prefetched():
        rows = [r for i in penv.status()["images"] for r in i["layers"]
                if r["digest"] == app.digest and r.get("fetch")]
        return rows and rows[0]["fetch"]["fetched"]["prefetch"] >= region[1] - region[0]
    assert wait_for(prefetched, 15), json.dumps(penv.status(), indent=1)[:3000]

    # and status's lasting counters (which outlive the daemons) have them too
    def counted():
        rows = [r for i in penv.status()["images"] for r in i["layers"]
                if r["digest"] == app.digest]
        return rows and rows[0]["blob_bytes"] >= region[1] - region[0]
    assert wait_for(counted, 15), json.dumps(penv.status(), indent=1)[:3000]

    mark = penv.mark()
    out = run(penv, ref, "sh", "-c", "sh /app/start.sh; sha256sum /app/hot.bin")
    assert out.stdout.split() == ["started", hashlib.sha256(HOT).hexdigest(), "/app/hot.bin"]
    assert region_gets(penv, app, region, mark) == []  # nothing more of the region
    assert penv.layer_gets(app, mark) == (0, 0)        # nor of the TOC (cached at pull)
    penv.podman("rmi", ref)


def test_no_prefetch_at_pull_when_prefetch_is_off(env, layers):
    ref = pushed(env, layers)                          # env: noprefetch = true
    app, region = layers["app"], layers["region"]
    mark = env.mark()
    env.podman("pull", "-q", ref)
    time.sleep(2)                                      # a prefetch would have started by now
    assert not cached(env, HOT) and not cached(env, START)
    assert region_gets(env, app, region, mark) == []
    env.podman("rmi", ref)
