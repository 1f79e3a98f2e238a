"""Load: parallel readers on one threaded mount, many mounts and containers at once.

Every request for blob bytes passes a counting proxy, so "fetched once" is
checked at the registry: after the mount(s) read their footer and TOC, no
byte of the blob may be requested twice.  Readers compare every byte they
read with the known content; a reader that does not finish in time is a
deadlock.  The fuse-overlayfs daemon's RSS is sampled from /proc.

``RELIABILITY_LOAD_SECONDS`` (default 20) sets how long the readers hammer (half of it
for the variant with background fetch).
"""

import hashlib
import os
import random
import subprocess
import threading
import time

import pytest

from ..registryfixture import Registry
from .faultproxy import FaultProxy
from .helpers import alive, check_cache, proc_status
from .regimage import push_files, registry_config

LOAD_SECONDS = float(os.environ.get("RELIABILITY_LOAD_SECONDS", "20"))
READERS = 8
RSS_GROWTH_LIMIT_MB = 24


def load_files():
    rnd = random.Random(7)
    files = {}
    for i in range(96):
        size = rnd.choice([1000, 7000, 30_000, 120_000, 300_000]) + rnd.randrange(1000)
        files[f"d{i % 8}/f{i:03d}"] = rnd.randbytes(size)
    files["d0/large1"] = rnd.randbytes(3 << 20)
    files["d1/large2"] = rnd.randbytes(5 << 20)          # two chunks
    return files


FILES = load_files()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, so):
    tmp = tmp_path_factory.mktemp("load")
    reg = Registry(str(tmp))
    try:
        yield reg, push_files(str(tmp), reg, FILES)
    finally:
        reg.stop()


@pytest.fixture
def proxy(registry):
    p = FaultProxy(registry[0].host)
    yield p
    p.stop()


def blob_ranges(entries):
    """[(start, end)] of the ranged blob GETs in proxy log ``entries`` (end exclusive)."""
    out = []
    for method, path, rng, status in entries:
        if method == "GET" and rng and status in (200, 206):
            for a, b in (tuple(map(int, part.split("-"))) for part in
                         rng.split("=", 1)[1].split(",")):
                out.append((a, b + 1))
    return out


def refetched_bytes(ranges):
    """Bytes requested more than once across ``ranges``."""
    events = sorted([(a, 1) for a, _ in ranges] + [(b, -1) for _, b in ranges])
    depth, last, twice = 0, 0, 0
    for pos, step in events:
        if depth > 1:
            twice += (pos - last) * (depth - 1)
        depth += step
        last = pos
    return twice


class ReaderStats:
    def __init__(self):
        self.reads = 0
        self.bytes = 0
        self.wrong = 0
        self.errors = []
        self.slowest = 0.0
        self.done = False


def hammer(mnt, idx, stop_at, stats):
    rnd = random.Random(1000 + idx)
    names = sorted(FILES)
    dirs = sorted({n.split("/")[0] for n in names})
    while time.monotonic() < stop_at:
        name = rnd.choice(names)
        started = time.monotonic()
        try:
            if rnd.random() < 0.1:
                os.listdir(os.path.join(mnt, rnd.choice(dirs)))
                os.stat(os.path.join(mnt, name))
            with open(os.path.join(mnt, name), "rb") as f:
                data = f.read()
        except OSError as exc:
            stats.errors.append(f"{name}: {exc}")
            continue
        stats.slowest = max(stats.slowest, time.monotonic() - started)
        stats.reads += 1
        stats.bytes += len(data)
        if data != FILES[name]:
            stats.wrong += 1
    stats.done = True


def sample_rss(pid, samples, stop):
    while not stop.is_set():
        rss = proc_status(pid, "VmRSS")
        if rss is not None:
            samples.append((time.monotonic(), rss / 1024))
        stop.wait(0.25)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background-fetch"])
def test_eight_readers_hammer_one_threaded_mount(tmp_path, so, mounts, registry, proxy,
                                                 background):
    from stargz_overlay.config import Config
    _, layer = registry
    extra = {}
    if hasattr(Config(), "no_background_fetch"):
        extra["no_background_fetch"] = not background
    elif background:
        pytest.skip("this version has no background fetch")
    config, paths = registry_config(tmp_path / "conf", [proxy.host], **extra)
    m = mounts(tmp_path / "mnt", [layer.lower(proxy.host, config, tmp_path / "l")],
               tmp_path / "up", tmp_path / "wk", options=["threaded=1"], so=so)
    m.mount()
    pid = m.pids[0]
    mark = len(proxy.log)
    samples, stop = [], threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(pid, samples, stop), daemon=True)
    sampler.start()
    seconds = LOAD_SECONDS if not background else LOAD_SECONDS / 2
    started = time.monotonic()
    stats = [ReaderStats() for _ in range(READERS)]
    threads = [threading.Thread(target=hammer, args=(m.mnt, i, started + seconds, s),
                                daemon=True) for i, s in enumerate(stats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, started + seconds + 60 - time.monotonic()))
    stop.set()
    sampler.join(5)
    stuck = [i for i, s in enumerate(stats) if not s.done]
    assert not stuck, f"readers {stuck} never finished: deadlock"
    reads = sum(s.reads for s in stats)
    print(f"{READERS} readers, {seconds:g} s: {reads} reads, "
          f"{sum(s.bytes for s in stats) >> 20} MiB, slowest read "
          f"{max(s.slowest for s in stats):.2f} s")
    assert sum(s.wrong for s in stats) == 0, "wrong bytes were read"
    assert [e for s in stats for e in s.errors] == []
    assert reads >= READERS * 20, "the readers hardly read anything"
    assert alive(pid)

    # every file that was read was fetched, and no byte was fetched twice
    ranges = blob_ranges(proxy.log[mark:])
    assert refetched_bytes(ranges) == 0, f"bytes fetched twice: {sorted(ranges)}"
    assert check_cache(paths["cache"]) == []

    # memory is flat once every file has been seen
    third = started + seconds / 3
    later = [rss for t, rss in samples if t >= third]
    assert later, "no RSS samples"
    growth = max(later) - later[0]
    print(f"fuse-overlayfs RSS: {samples[0][1]:.0f} MiB at start, {later[0]:.0f} MiB after "
          f"{seconds / 3:.0f} s, at most {max(later):.0f} MiB, {later[-1]:.0f} MiB at the end")
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew by {growth:.0f} MiB under a steady load"


def test_sixteen_mounts_of_one_layer_share_the_cache(tmp_path, so, mounts, registry, proxy):
    """16 fuse-overlayfs processes, one cache: each file is fetched once overall.

    (With Podman, ``test_sixteen_containers_start_at_once`` does the same through the
    store and the mount program.)
    """
    _, layer = registry
    extra = {"no_background_fetch": True, "noprefetch": True} if _has_fetch_keys() else {}
    config, paths = registry_config(tmp_path / "conf", [proxy.host], **extra)
    ms = []
    for i in range(16):
        m = mounts(tmp_path / f"mnt{i}", [layer.lower(proxy.host, config, tmp_path / f"l{i}")],
                   so=so)
        m.mount()
        ms.append(m)
    mark = len(proxy.log)
    names = sorted(FILES)
    failures = []

    def read_all(i, m):
        order = names[:]
        random.Random(i).shuffle(order)
        for name in order:
            try:
                with open(os.path.join(m.mnt, name), "rb") as f:
                    if f.read() != FILES[name]:
                        failures.append(f"mount {i}: {name}: wrong bytes")
            except OSError as exc:
                failures.append(f"mount {i}: {name}: {exc}")

    threads = [threading.Thread(target=read_all, args=(i, m), daemon=True)
               for i, m in enumerate(ms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a reader never finished: deadlock"
    assert failures == []
    ranges = blob_ranges(proxy.log[mark:])
    assert refetched_bytes(ranges) == 0, "a file was fetched by more than one mount"
    fetched = sum(b - a for a, b in ranges)
    assert fetched <= len(layer.blob)
    assert all(alive(m.pids[0]) for m in ms)


def _has_fetch_keys():
    from stargz_overlay.config import Config
    c = Config()
    return hasattr(c, "no_background_fetch") and hasattr(c, "noprefetch")


# -- containers ----------------------------------------------------------------

def _integration():
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pkg = os.path.join(here, "plugin", "stargz_overlay")
    return all(os.path.exists(os.path.join(pkg, n)) for n in ("store.py", "mount_program.py"))


APP_FILES = {f"app/f{i:02d}": random.Random(500 + i).randbytes(50_000 + 3000 * i)
             for i in range(12)}


def test_sixteen_containers_start_at_once(tmp_path):
    if not _integration():
        pytest.skip("the Podman integration (store.py, mount_program.py) is not there; "
                    "test_sixteen_mounts_of_one_layer_share_the_cache covers 16 mounts")
    from ..imagefixture import tar_layer
    from ..integration.conftest import StoreEnv, busybox_tar, estargz, push
    env = StoreEnv(tmp_path)
    try:
        env.start_store()
        base = estargz(busybox_tar())
        app = estargz(tar_layer(dict({"app": ("dir",)}, **APP_FILES)))
        ref = push(env.registry.host, "load/app:1", [base, app]).replace(
            env.registry.host, env.host, 1)
        env.podman("pull", "-q", ref)
        mark = env.mark()
        want = "".join(f"{hashlib.sha256(APP_FILES[n]).hexdigest()}  /{n}\n"
                       for n in sorted(APP_FILES))
        # named containers removed afterwards: with --rm, Podman 4.3.1 under load
        # sometimes loses the exit code ("no such exit code") of a container that ran fine
        names = [f"load{i}" for i in range(16)]

        def cmd(name):
            return ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                    "--events-backend", "none", "run", "--name", name, "--network", "none",
                    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", ref,
                    "sh", "-c", "sha256sum /app/*"]
        started = time.monotonic()
        procs = [subprocess.Popen(cmd(name), env=env.podman.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for name in names]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=300) + (p.returncode,))
            except subprocess.TimeoutExpired:
                p.kill()
                outs.append(p.communicate() + ("timeout",))
        elapsed = time.monotonic() - started
        print(f"16 containers ran in {elapsed:.1f} s")
        bad = [(rc, err[-300:]) for out, err, rc in outs if rc != 0 or out != want]
        assert bad == [], bad
        app_ranges = blob_ranges(e for e in env.proxy.log[mark:]
                                 if e[1].split("?")[0].endswith(app.digest))
        toc_reads = sum(1 for a, b in app_ranges if b == len(app.blob))
        print(f"app layer: {len(app_ranges)} ranged GETs after the pull, {toc_reads} of them "
              f"reading the blob's tail (footer/TOC)")
        data = [(a, b) for a, b in app_ranges if b != len(app.blob)]
        assert refetched_bytes(data) == 0, "a file was fetched by more than one container"
    finally:
        env.close()
