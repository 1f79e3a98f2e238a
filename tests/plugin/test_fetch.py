"""Prefetch, background fetch, parallel misses and metrics against a real docker-registry.

Requests are counted at a proxy in front of the registry (``Proxy``); where
timing matters, a shaped link (contrib/bench/netshape.py: latency and a
bandwidth cap) sits between the proxy and the registry.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from stargz_overlay.layer_spec import LayerSpec
from stargz_overlay.metrics import read_snapshots
from stargz_overlay.reader import StargzReader
from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import TOC_DIGEST_ANNOTATION, RegistryClient
from stargz_overlay.source import FileSource
from stargz_overlay.writer import convert

from .fusehelp import REPO, plugin_lower, write_config
from ..format.tarbuild import TarBuilder
from ..imagefixture import BUSYBOX
from ..registryfixture import Proxy, Registry, push_image

sys.path.insert(0, os.path.join(REPO, "contrib", "bench"))
from netshape import Shaper  # noqa: E402

PRIO = {f"app/p{i}": os.urandom(400_000) for i in range(8)}      # prioritized, in this order
OTHER = {f"app/o{i}": os.urandom(150_000) for i in range(4)}
OTHER["app/big"] = os.urandom(1_500_000)
HEAD = {f"h/f{i}": os.urandom(100_000) for i in range(6)}


class Layer:
    def __init__(self, tmp, name, builder, prioritized=None, legacy=False):
        self.tar = os.path.join(tmp, f"{name}.tar")
        with open(self.tar, "wb") as f:
            f.write(builder.bytes())
        self.blob = os.path.join(tmp, f"{name}.blob")
        with open(self.tar, "rb") as src, open(self.blob, "wb") as out:
            self.result = convert(src, out, chunk_size=128 << 10, prioritized=prioritized,
                                  legacy=legacy, compression_level=1)
        with FileSource(self.blob) as source:
            reader = StargzReader(source)
            self.ranges = {e.name: (e.chunks[0].offset, e.chunks[-1].end)
                           for e in reader.toc.entries if e.type == "reg" and e.size}
            self.region = reader.prefetch_range()
        self.size = os.path.getsize(self.blob)


def _app_tree():
    b = TarBuilder().dir("app")
    for name, data in {**OTHER, **PRIO}.items():
        b.file(name, data)
    return b


def _base_tree():
    with open(BUSYBOX, "rb") as f:
        busybox = f.read()
    b = TarBuilder().dir("bin").dir("etc").dir("tmp")
    b.file("bin/busybox", busybox, mode=0o755)
    for tool in ("sh", "cat", "md5sum", "ls"):
        b.symlink(f"bin/{tool}", "busybox")
    b.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    return b


def _head_tree():
    b = TarBuilder().dir("h")
    for name, data in HEAD.items():
        b.file(name, data)
    return b


@pytest.fixture(scope="module")
def images(tmp_path_factory, so):
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox is not installed (Debian package busybox-static)")
    tmp = str(tmp_path_factory.mktemp("fetchimg"))
    app = Layer(tmp, "app", _app_tree(), prioritized=list(PRIO))
    base = Layer(tmp, "base", _base_tree())
    head = Layer(tmp, "head", _head_tree(), legacy=True)
    assert app.region is not None and base.region is None and head.region is None
    reg = Registry(tmp)
    try:
        conf = RegistriesConf.from_text(f'[[registry]]\nlocation = "{reg.host}"\n'
                                        f'insecure = true\n')
        with RegistryClient(registries_conf=conf, auth_files=[], certs_dir=os.devnull) as c:
            push_image(c, f"{reg.host}/fetch/app:1", [base.blob, app.blob],
                       layer_annotations=[{TOC_DIGEST_ANNOTATION: base.result.toc_digest},
                                          {TOC_DIGEST_ANNOTATION: app.result.toc_digest}])
            push_image(c, f"{reg.host}/fetch/head:1", [head.blob],
                       layer_annotations=[{TOC_DIGEST_ANNOTATION: head.result.toc_digest}])
        yield {"reg": reg, "app": app, "base": base, "head": head}
    finally:
        reg.stop()


class Link:
    """plugin -> (optional shaped link) -> counting Proxy -> registry.

    The shaped link is on the plugin's side of the proxy, as the network is on
    the client's side of a registry: the proxy's buffers never hide the
    plugin's flow control from the link.
    """

    def __init__(self, reg, mbit=None, rtt_ms=0.0):
        self.shaper = None
        self.proxy = Proxy(reg.host)
        self.host = self.proxy.host
        if mbit:
            host, port = self.proxy.host.rsplit(":", 1)
            self.shaper = Shaper((host, int(port)), rtt_ms=rtt_ms, mbit=mbit)
            self.host = self.shaper.start()

    def blob_gets(self):
        return self.proxy.requests("GET", kind="blob")

    def stop(self):
        self.proxy.stop()
        if self.shaper:
            self.shaper.stop()


@pytest.fixture
def links(images):
    made = []

    def make(**kw):
        link = Link(images["reg"], **kw)
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop()


def config_for(tmp_path, link, **extra):
    (tmp_path / "registries.conf").write_text("")
    (tmp_path / "auth.json").write_text("{}")
    (tmp_path / "certs.d").mkdir(exist_ok=True)
    # read_timeout: the product's default; these tests count requests, and a stream
    # stalled past a short timeout on a loaded machine resumes with a second request
    registry = {"insecure": [link.host], "registries_conf": str(tmp_path / "registries.conf"),
                "auth_file": str(tmp_path / "auth.json"), "certs_dir": str(tmp_path / "certs.d"),
                "connect_timeout": 2.0, "read_timeout": 30.0}
    tables = extra.pop("tables", {})
    tables.setdefault("blob", {"max_retries": 1, "fetching_timeout_sec": 10.0,
                               "min_wait_msec": 50})
    extra.setdefault("metrics_period_sec", 0.2)
    return write_config(tmp_path / "config.toml", str(tmp_path / "cache"),
                        str(tmp_path / "plugin.log"), registry=registry, tables=tables, **extra)


def mount_layers(tmp_path, so, mounts, link, images, config, names=("app", "base"),
                 repo="fetch/app:1", options=()):
    lowers = []
    for i, name in enumerate(names):
        layer = images[name]
        spec = LayerSpec("registry", ref=f"{link.host}/{repo}", digest=layer.result.blob_digest,
                         toc=layer.result.toc_digest, size=layer.size, config=config)
        lowers.append(plugin_lower(spec, tmp_path / f"l{i}"))
    m = mounts(tmp_path / "mnt", lowers, options=options, so=so)
    m.mount()
    return m


def gets_for(link, layer):
    return [g for g in link.blob_gets() if layer.result.blob_digest in g[1]]


def snapshot(tmp_path):
    snaps = read_snapshots(str(tmp_path / "metrics"))
    return snaps[0] if snaps else None


def layer_stats(tmp_path, layer):
    snap = snapshot(tmp_path)
    if snap is None:
        return None
    return next((x for x in snap["layers"] if x["id"] == layer.result.blob_digest), None)


def wait_for(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def read(m, name):
    with open(os.path.join(m.mnt, name), "rb") as f:
        return f.read()


def range_len(header):
    lo, hi = re.fullmatch(r"bytes=(\d+)-(\d+)", header).groups()
    return int(hi) - int(lo) + 1


def test_landmark_region_is_prefetched_in_one_request(tmp_path, so, mounts, links, images):
    app = images["app"]
    link = links()
    cfg = config_for(tmp_path, link)
    m = mount_layers(tmp_path, so, mounts, link, images, cfg)
    at_mount = len(link.blob_gets())
    assert at_mount == 2             # one read per layer: footer and TOC (its last 64 KiB)
    os.listdir(m.mnt)                            # first callback in the daemon
    wait_for(lambda: (layer_stats(tmp_path, app) or {}).get("prefetch") == "done",
             what="the prefetch")
    new = link.blob_gets()[at_mount:]
    assert [g[2] for g in new] == [f"bytes=0-{app.region[1] - 1}"]      # ONE request
    assert app.result.blob_digest in new[0][1]
    assert "no prefetch: the layer says nothing is to be prefetched" in \
        open(tmp_path / "plugin.log").read()                             # base: no.prefetch
    for name, data in PRIO.items():
        assert read(m, name) == data
    assert len(link.blob_gets()) == at_mount + 1                         # all cache hits
    assert read(m, "app/o1") == OTHER["app/o1"]
    last = link.blob_gets()[-1]
    assert len(link.blob_gets()) == at_mount + 2 and range_len(last[2]) <= \
        app.ranges["app/o1"][1] - app.ranges["app/o1"][0]
    stats = wait_for(lambda: (s := layer_stats(tmp_path, app))["local_files"] == len(PRIO) + 1
                     and s, what="the metrics file")      # rewritten every 0.2 s
    assert stats["fetched"]["prefetch"] == app.region[1]
    assert stats["requests"]["prefetch"] == 1


def test_opens_wait_for_the_stream_not_for_the_whole_region(tmp_path, so, mounts, links,
                                                           images):
    """At 8 Mbit/s the 3.2 MB region takes ~3.5 s: the first prioritized file is served
    as soon as its bytes are in, an unrelated file does not wait for the region, and the
    last prioritized file waits for the stream instead of being requested again."""
    app = images["app"]
    link = links(mbit=8, rtt_ms=10)
    cfg = config_for(tmp_path, link)
    m = mount_layers(tmp_path, so, mounts, link, images, cfg)
    started = time.monotonic()
    os.listdir(m.mnt)
    times = {}
    for name in ("app/p0", "app/o2", "app/p7"):
        data = read(m, name)
        times[name] = time.monotonic() - started
        assert data == {**PRIO, **OTHER}[name]
    region_time = app.region[1] * 8 / 8e6
    assert times["app/p0"] < region_time / 2, times
    assert times["app/o2"] < region_time * 0.75, times
    assert times["app/p7"] > region_time * 0.7, times
    new = gets_for(link, app)[1:]                # after footer + TOC
    assert len(new) == 2, new                    # the region, and app/o2 on demand
    assert new[0][2] == f"bytes=0-{app.region[1] - 1}"
    stats = wait_for(lambda: (s := layer_stats(tmp_path, app)) and
                     s["prefetch"] == "done" and s, what="prefetch done")
    assert stats["fetched"]["on_demand"] == range_len(new[1][2])
    snap = snapshot(tmp_path)
    waits = sum(v for n, labels, v in snap["counters"] if n == "prefetch_waits_total")
    assert waits >= 1


def test_no_prefetch_settings(tmp_path, so, mounts, links, images):
    """noprefetch: nothing but the opened files; a legacy layer's head with prefetch_size."""
    head = images["head"]
    link = links()
    cfg = config_for(tmp_path, link, noprefetch=True)
    m = mount_layers(tmp_path, so, mounts, link, images, cfg)
    at_mount = len(link.blob_gets())
    os.listdir(m.mnt)
    # the daemon's workers have started (and a prefetch would have) once the metrics
    # say "off" for both layers: no fixed sleep that a loaded machine can outlast
    wait_for(lambda: all((layer_stats(tmp_path, x) or {}).get("prefetch") == "off"
                         for x in (images["app"], images["base"])), what="prefetch off")
    assert len(link.blob_gets()) == at_mount
    m.unmount()

    size = head.ranges["h/f3"][1] + 10          # f0..f3 end within it, f4 does not
    cfg = config_for(tmp_path, link, prefetch_size=size)
    m = mount_layers(tmp_path, so, mounts, link, images, cfg, names=("head",),
                     repo="fetch/head:1")
    at_mount = len(link.blob_gets())
    os.listdir(m.mnt)
    wait_for(lambda: (layer_stats(tmp_path, head) or {}).get("prefetch") == "done",
             what="the head prefetch")
    new = link.blob_gets()[at_mount:]
    assert [g[2] for g in new] == [f"bytes=0-{head.ranges['h/f3'][1] - 1}"]
    for i in range(4):
        assert read(m, f"h/f{i}") == HEAD[f"h/f{i}"]
    assert len(link.blob_gets()) == at_mount + 1
    assert read(m, "h/f4") == HEAD["h/f4"]
    assert len(link.blob_gets()) == at_mount + 2


def test_background_fetch_makes_layers_local_then_survives_an_outage(tmp_path, so, mounts,
                                                                     links, images):
    app, base, reg = images["app"], images["base"], images["reg"]
    link = links()
    cfg = config_for(tmp_path, link, no_background_fetch=False,
                     tables={"background_fetch": {"silence_period_msec": 300}})
    m = mount_layers(tmp_path, so, mounts, link, images, cfg)
    at_mount = len(link.blob_gets())
    assert read(m, "app/o0") == OTHER["app/o0"]        # a foreground open, then quiet
    wait_for(lambda: all((layer_stats(tmp_path, x) or {}).get("background") == "done"
                         for x in (app, base)), timeout=60, what="background fetch")
    for layer in (app, base):
        stats = layer_stats(tmp_path, layer)
        assert stats["local_bytes"] == stats["file_bytes"] and stats["local_files"] == \
            stats["files"]
    bg = [g for g in link.blob_gets()[at_mount:] if g[2] and range_len(g[2]) > 0]
    assert len(bg) == 1 + 1 + 1 + 1      # o0, app prefetch, app rest, base whole: one each
    reg.kill()
    try:
        for name, data in {**PRIO, **OTHER}.items():
            assert read(m, name) == data
        # the container's programs run with the registry gone
        out = subprocess.run(["chroot", m.mnt, "/bin/sh", "-c",
                              "cat /app/p3 /app/big | md5sum; ls /bin"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        import hashlib
        assert hashlib.md5(PRIO["app/p3"] + OTHER["app/big"]).hexdigest() in out.stdout
        assert len(link.blob_gets()) == at_mount + len(bg)
    finally:
        reg.start()


def two_mounts(tmp_path, so, mounts, link, images, cfg):
    made = []
    for name in ("one", "two"):
        lowers = []
        for i, layer in enumerate((images["app"], images["base"])):
            spec = LayerSpec("registry", ref=f"{link.host}/fetch/app:1",
                             digest=layer.result.blob_digest, toc=layer.result.toc_digest,
                             size=layer.size, config=cfg)
            lowers.append(plugin_lower(spec, tmp_path / f"{name}.l{i}"))
        m = mounts(tmp_path / name, lowers, so=so)
        m.mount()
        os.listdir(m.mnt)
        made.append(m)
    return made


def test_two_mounts_of_a_layer_prefetch_it_once(tmp_path, so, mounts, links, images):
    """Two containers of one image start together: one region request, not two; the
    other mount's opens find their files in the shared cache."""
    app = images["app"]
    link = links(mbit=24, rtt_ms=5)
    cfg = config_for(tmp_path, link)
    made = two_mounts(tmp_path, so, mounts, link, images, cfg)
    results = {}

    def reader(m):
        results[m.mnt] = [read(m, name) == data for name, data in PRIO.items()]

    threads = [threading.Thread(target=reader, args=(m,)) for m in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(all(ok) and len(ok) == len(PRIO) for ok in results.values()), results
    regions = [g for g in gets_for(link, app) if g[2] == f"bytes=0-{app.region[1] - 1}"]
    assert len(regions) == 1
    others = [g for g in gets_for(link, app)
              if g not in regions and not g[2].endswith(f"-{app.size - 1}")]
    assert sum(range_len(g[2]) for g in others) < app.region[1] / 2     # at most a few files


def test_two_mounts_of_a_layer_fetch_it_once_in_the_background(tmp_path, so, mounts, links,
                                                               images):
    """The second mount leaves the layers to the first one's background fetch (an flock
    in the cache) and finds them in the shared cache."""
    app, base = images["app"], images["base"]
    link = links(mbit=24, rtt_ms=5)          # slow enough for the two to overlap
    cfg = config_for(tmp_path, link, no_background_fetch=False, noprefetch=True,
                     tables={"background_fetch": {"silence_period_msec": 200}})
    made = two_mounts(tmp_path, so, mounts, link, images, cfg)

    def all_done():
        snaps = read_snapshots(str(tmp_path / "metrics"))
        return len(snaps) == 2 and all(x["local_bytes"] == x["file_bytes"]
                                       for snap in snaps for x in snap["layers"])
    wait_for(all_done, timeout=60, what="both mounts 100% local")
    for layer in (app, base):
        data = [range_len(g[2]) for g in gets_for(link, layer)
                if not g[2].endswith(f"-{layer.size - 1}")]          # not the footer/TOC
        assert sum(data) <= layer.size, (layer.size, data)           # one copy, not two
    for m in made:
        assert read(m, "app/big") == OTHER["app/big"]


def test_background_fetch_is_paced(tmp_path, so, mounts, links, images):
    """max_rate_mbit caps the background rate (the base layer: ~2 MB at 4 Mbit/s)."""
    base = images["base"]
    link = links()
    cfg = config_for(tmp_path, link, no_background_fetch=False, noprefetch=True,
                     tables={"background_fetch": {"silence_period_msec": 100,
                                                  "max_rate_mbit": 4.0}})
    m = mount_layers(tmp_path, so, mounts, link, images, cfg, names=("base",))
    os.listdir(m.mnt)
    started = time.monotonic()
    wait_for(lambda: (layer_stats(tmp_path, base) or {}).get("background") == "done",
             timeout=60, what="background fetch")
    elapsed = time.monotonic() - started
    data = base.size - 4096        # roughly what the background range carries
    assert elapsed > data * 8 / 4e6 * 0.6, elapsed


def test_background_fetch_yields_to_foreground_opens(tmp_path, so, mounts, links, images):
    """A cold open during background fetching: the background stream pauses while it
    waits (counted in the metrics) and the open is not starved.  (What still arrives
    after a pause is bounded by the background connections' small receive buffer.)"""
    app, base = images["app"], images["base"]
    link = links(mbit=16, rtt_ms=10)
    cfg = config_for(tmp_path, link, no_background_fetch=False, noprefetch=True,
                     tables={"background_fetch": {"silence_period_msec": 100,
                                                  "max_rate_mbit": 4.0}})
    m = mount_layers(tmp_path, so, mounts, link, images, cfg)
    assert read(m, "app/o0") == OTHER["app/o0"]           # a first foreground open
    wait_for(lambda: (layer_stats(tmp_path, app) or {}).get("background") == "running",
             what="the background fetch")
    time.sleep(0.5)                              # it streams the app layer (10 s at 4 Mbit/s)
    started = time.monotonic()
    assert read(m, "bin/busybox")                          # cold: base is fetched later
    took = time.monotonic() - started
    alone = base.ranges["bin/busybox"][1] - base.ranges["bin/busybox"][0]
    alone = alone * 8 / 16e6 + 0.05
    assert took < alone * 2, (took, alone)
    snap = wait_for(lambda: (s := snapshot(tmp_path)) and any(
        n == "background_paused_seconds_total" for n, _, _ in s["counters"]) and s,
        what="a background pause in the metrics")
    paused = sum(v for n, _, v in snap["counters"] if n == "background_paused_seconds_total")
    assert paused > 0.1


def test_metrics_match_the_bytes_the_registry_served(tmp_path, so, mounts, links, images):
    app, base = images["app"], images["base"]
    link = links()
    cfg = config_for(tmp_path, link, no_background_fetch=False,
                     tables={"background_fetch": {"silence_period_msec": 300}})
    m = mount_layers(tmp_path, so, mounts, link, images, cfg)
    for name in ("app/p1", "app/o3", "bin/busybox"):
        read(m, name)
    wait_for(lambda: all((layer_stats(tmp_path, x) or {}).get("background") == "done"
                         for x in (app, base)), timeout=60, what="background fetch")
    time.sleep(0.5)
    snap = snapshot(tmp_path)
    served = sum(range_len(g[2]) for g in link.blob_gets() if g[3] == 206)
    fetched = sum(sum(x["fetched"].values()) for x in snap["layers"])
    assert fetched == served == link.proxy.bytes_sent
    requests = sum(sum(x["requests"].values()) for x in snap["layers"])
    assert requests == len(link.blob_gets())
    counters = {(n, tuple(sorted(lab.items()))): v for n, lab, v in snap["counters"]}
    assert counters[("cache_misses_total", (("layer", base.result.blob_digest),))] == 1
    # the CLI prints the same figures as Prometheus text
    out = subprocess.run([sys.executable, "-m", "stargz_overlay", "metrics", "--config", cfg],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    total = 0
    for line in out.stdout.splitlines():
        if line.startswith("stargz_overlay_fetched_bytes_total{"):
            total += int(line.rsplit(" ", 1)[1])
    assert total == served
    assert "# TYPE stargz_overlay_fetch_request_seconds histogram" in out.stdout
    assert re.search(r'stargz_overlay_layer_local_ratio\{layer="%s",pid="\d+"\} 1\b'
                     % app.result.blob_digest, out.stdout)
    js = json.loads(subprocess.run([sys.executable, "-m", "stargz_overlay", "metrics",
                                    "--config", cfg, "--json"], capture_output=True,
                                   text=True, timeout=60, check=True).stdout)
    assert {x["id"] for d in js["daemons"] for x in d["layers"]} == \
        {app.result.blob_digest, base.result.blob_digest}
    prom = [n for n in os.listdir(tmp_path / "metrics") if n.endswith(".prom")]
    assert len(prom) == 1
    # ... and status shows them per layer
    (tmp_path / "state").mkdir()
    out = subprocess.run([sys.executable, "-m", "stargz_overlay", "status", "--state-dir",
                          str(tmp_path / "state"), "--config", cfg, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    live = json.loads(out.stdout)["live_layers"]
    fig = live[app.result.blob_digest]
    assert fig["fetched"] == layer_stats(tmp_path, app)["fetched"]
    assert fig["local_ratio"] == 1.0 and fig["background"] == "done"
    text = subprocess.run([sys.executable, "-m", "stargz_overlay", "status", "--state-dir",
                           str(tmp_path / "state"), "--config", cfg], capture_output=True,
                          text=True, timeout=60).stdout
    assert "100.0% local" in text
    assert f"prefetch {fig['fetched']['prefetch'] / (1 << 20):.1f} (done)" in text
    m.unmount()
    assert read_snapshots(str(tmp_path / "metrics")) == []


def test_parallel_misses_respect_the_connection_limit(tmp_path, images, links):
    """Cold opens from several threads fetch concurrently in the plugin, at most
    max_concurrency requests at once per registry (fuse-overlayfs itself serialises
    ``open`` under its big lock, so this drives the plugin's open path directly)."""
    from stargz_overlay.cache import ContentCache
    from stargz_overlay.config import load_config
    from stargz_overlay.layer_fetch import FetchContext, LayerFetch
    from stargz_overlay.layer_view import LayerView
    from stargz_overlay import registry_layers

    app = images["app"]
    link = links()
    link.proxy.latency = 0.4
    results = {}
    for limit in (8, 2):
        sub = tmp_path / f"limit{limit}"
        sub.mkdir()
        config = load_config(config_for(sub, link, max_concurrency=limit))
        cache = ContentCache(config.cache_dir)
        ctx = FetchContext(config, cache)
        client = registry_layers.make_client(config)
        spec = LayerSpec("registry", ref=f"{link.host}/fetch/app:1",
                         digest=app.result.blob_digest, toc=app.result.toc_digest,
                         size=app.size)
        source, toc = registry_layers.open_layer(client, spec)
        reader = StargzReader(ctx.metered(source, spec.digest, "app"), toc_digest=toc)
        view = LayerView(reader, str(sub / "layer"), cache, 0, "app")
        LayerFetch(view, ctx, spec.digest)
        names = sorted(PRIO)
        barrier = threading.Barrier(len(names))
        errors = []

        def open_one(name):
            barrier.wait()
            try:
                fd = view.open(name, os.O_RDONLY)
                with os.fdopen(fd, "rb") as f:
                    if f.read() != PRIO[name]:
                        errors.append(name)
            except Exception as exc:        # noqa: BLE001 - reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_one, args=(n,)) for n in names]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        results[limit] = (time.monotonic() - started, max(ctx.limiter.peak.values()))
        assert not errors
        view.fetch.close()
        view.close()
        client.close()
    (fast, peak8), (slow, peak2) = results[8], results[2]
    assert peak8 == 8 and peak2 == 2
    assert fast < 8 * 0.4 / 2, results             # concurrent, not one after the other
    assert slow >= 4 * 0.4 * 0.9, results           # 8 opens through 2 connections
