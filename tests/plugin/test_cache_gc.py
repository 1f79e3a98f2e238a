"""The file cache over months: LRU eviction that never touches content in use, crash
safety (kill -9 in the middle of a cache write), a full disk failing one open only.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from stargz_overlay.cache import ContentCache
from stargz_overlay.layer_spec import LayerSpec

from .fusehelp import REPO, blob_spec, plugin_lower, write_config
from .layers import build_layer
from ..format.tarbuild import TarBuilder
from ..registryfixture import Proxy, Registry, push_image

sys.path.insert(0, os.path.join(REPO, "contrib", "bench"))
from netshape import Shaper  # noqa: E402

PLUGIN_DIR = os.path.join(REPO, "plugin")


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def age(cache, digest, seconds):
    """Pretend ``digest`` was last used ``seconds`` ago."""
    path = cache.path(digest)
    st = os.stat(path)
    os.utime(path, (time.time() - seconds, st.st_mtime))


def child(code, *args):
    """A Python child process running ``code`` (prints "ready" when set up)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": PLUGIN_DIR})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def gc_cli(config, *args):
    out = subprocess.run([sys.executable, "-m", "stargz_overlay", "gc", "--config", config,
                          "--json", *args], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": PLUGIN_DIR})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_collect_evicts_least_recently_used_unused_content(tmp_path):
    root = str(tmp_path / "cache")
    cache = ContentCache(root)
    blobs = [os.urandom(100 << 10) for _ in range(6)]
    digests = [cache.put([b], len(b))[0] for b in blobs]
    for i, d in enumerate(digests):
        age(cache, d, 3600 - i * 100)            # 0 is the least recently used
    # 1: pinned by a live process; 2: pinned by a process that died; 3: open here;
    # 5: used just now (within the grace period)
    live = child("""
        import sys, time
        from stargz_overlay.cache import ContentCache
        pin = ContentCache(sys.argv[1]).pin([sys.argv[2]])
        print("ready", flush=True)
        time.sleep(60)
        """, root, digests[1])
    dead = child("""
        import sys, os
        from stargz_overlay.cache import ContentCache
        ContentCache(sys.argv[1]).pin([sys.argv[2]])
        print("ready", flush=True)
        os._exit(0)
        """, root, digests[2])
    dead.wait()
    writer = child("""
        import sys, os, fcntl, time
        fd = os.open(os.path.join(sys.argv[1], "tmp", "fetch-live"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("ready", flush=True)
        time.sleep(60)
        """, root)
    with open(os.path.join(root, "tmp", "fetch-dead"), "wb") as f:
        f.write(b"partial")
    held = open(cache.path(digests[3]), "rb")
    ContentCache(root, clean=False).lookup(digests[5], len(blobs[5]))   # a use (another
    # process's first): bumps its access time
    try:
        dry = cache.collect(300 << 10, dry_run=True)
        assert dry.evicted_files == 3 and all(os.path.exists(cache.path(d)) for d in digests)
        report = cache.collect(300 << 10)
        assert (report.live_pins, report.dead_pins, report.open_files) == (1, 1, 1)
        assert (report.tmp_removed, report.tmp_busy) == (1, 1)
        # LRU order: 0, then 2 (its pin died with its process), then 4; 5 is fresh
        present = [os.path.exists(cache.path(d)) for d in digests]
        assert present == [False, True, False, True, False, True]
        assert report.evicted_bytes == 3 * (100 << 10) and not report.over_limit
        assert os.listdir(os.path.join(root, "tmp")) == ["fetch-live"]
        # nothing unused is left: a 0 limit cannot be met, and says so
        report = cache.collect(0)
        assert report.evicted_files == 0 and report.over_limit
        assert held.read() == blobs[3]
    finally:
        held.close()
        for proc in (live, writer):
            proc.kill()
            proc.wait()
    age(cache, digests[3], 3600)                 # (reading it above counted as a use)
    report = cache.collect(0)                    # the pin and the writer are gone now
    assert report.dead_pins == 1 and report.tmp_removed == 1
    assert [os.path.exists(cache.path(d)) for d in digests] == [False] * 5 + [True]
    assert ContentCache(root).lookup(digests[5], len(blobs[5])) is not None


def test_store_makes_room_within_the_size_limit(tmp_path):
    cache = ContentCache(str(tmp_path / "cache"), max_size=300 << 10)
    old = [cache.put([os.urandom(100 << 10)], 100 << 10)[0] for _ in range(3)]
    for i, d in enumerate(old):
        age(cache, d, 1000 - i)
    new = os.urandom(150 << 10)
    cache.get(digest_of(new), len(new), lambda: [new])
    assert [os.path.exists(cache.path(d)) for d in old] == [False, False, True]
    assert cache.usage()[1] <= 300 << 10


FILES = {f"d/f{i}": os.urandom(60_000) for i in range(6)}
BIG = os.urandom(4 << 20)


def layer_tree(files, big=None):
    b = TarBuilder().dir("d")
    for name, data in files.items():
        b.file(name, data)
    if big is not None:
        b.file("big", big)
    return b


def mount_blob(mounts, tmp_path, so, config, blob, name="mnt", options=()):
    m = mounts(tmp_path / name, [plugin_lower(blob_spec(blob, config), tmp_path / f"{name}.l")],
               options=options, so=so)
    m.mount()
    return m


def test_gc_never_evicts_content_of_a_mounted_layer(tmp_path, so, mounts):
    config = write_config(tmp_path / "config.toml", str(tmp_path / "cache"),
                          str(tmp_path / "plugin.log"))
    other = {f"d/f{i}": os.urandom(50_000) for i in range(3)}
    layer_a = build_layer(str(tmp_path), "a", layer_tree(FILES))
    layer_b = build_layer(str(tmp_path), "b", layer_tree(other))
    mb = mount_blob(mounts, tmp_path, so, config, layer_b.blob, "mb")
    for name in other:
        with open(os.path.join(mb.mnt, name), "rb") as f:
            f.read()
    mb.unmount()
    cache = ContentCache(str(tmp_path / "cache"))
    for data in other.values():
        age(cache, digest_of(data), 3600)        # B is unmounted and long unused
    ma = mount_blob(mounts, tmp_path, so, config, layer_a.blob, "ma")
    held = open(os.path.join(ma.mnt, "d/f0"), "rb")
    with open(os.path.join(ma.mnt, "d/f1"), "rb") as f:
        assert f.read() == FILES["d/f1"]
    try:
        for data in FILES.values():
            if os.path.exists(cache.path(digest_of(data))):
                age(cache, digest_of(data), 3600)        # old too: only the pin protects
        report = gc_cli(config, "--max-size", "0")
        assert report["live_pins"] == 1 and report["evicted_files"] == len(other)
        for data in other.values():
            assert not os.path.exists(cache.path(digest_of(data)))
        for name in ("d/f0", "d/f1"):
            assert os.path.exists(cache.path(digest_of(FILES[name])))
        assert held.read() == FILES["d/f0"]
        for name, data in FILES.items():            # the rest of A still opens fine
            with open(os.path.join(ma.mnt, name), "rb") as f:
                assert f.read() == data
    finally:
        held.close()
    ma.unmount()                                     # its pin goes with it
    for data in FILES.values():
        age(cache, digest_of(data), 3600)
    report = gc_cli(config, "--max-size", "0")
    assert report["dead_pins"] == 0 and report["live_pins"] == 0
    assert report["evicted_files"] == len(FILES) and report["remaining_bytes"] == 0


def test_mount_evicts_unused_content_for_its_size_limit(tmp_path, so, mounts):
    config = write_config(tmp_path / "config.toml", str(tmp_path / "cache"),
                          str(tmp_path / "plugin.log"),
                          tables={"directory_cache": {"max_size": "300KiB"}})
    cache = ContentCache(str(tmp_path / "cache"))
    old = [cache.put([os.urandom(100 << 10)], 100 << 10)[0] for _ in range(3)]
    for d in old:
        age(cache, d, 3600)
    layer = build_layer(str(tmp_path), "a", layer_tree(FILES))
    m = mount_blob(mounts, tmp_path, so, config, layer.blob)
    for name in ("d/f0", "d/f1", "d/f2"):
        with open(os.path.join(m.mnt, name), "rb") as f:
            assert f.read() == FILES[name]
    assert sum(os.path.exists(cache.path(d)) for d in old) <= 1
    assert cache.usage()[1] <= 300 << 10


@pytest.fixture
def tmpfs(tmp_path):
    path = tmp_path / "small"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot mount a small tmpfs for the cache: {r.stderr.strip()}"
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_fails_the_open_not_the_mount(tmp_path, so, mounts, tmpfs, log_of):
    config = write_config(tmp_path / "config.toml", str(tmpfs / "cache"),
                          str(tmp_path / "plugin.log"))
    cache = ContentCache(str(tmpfs / "cache"))
    filler = [cache.put([os.urandom(600 << 10)], 600 << 10)[0] for _ in range(3)]
    for d in filler:
        age(cache, d, 3600)                          # unused content: may be evicted
    layer = build_layer(str(tmp_path), "a", layer_tree(FILES, BIG))
    m = mount_blob(mounts, tmp_path, so, config, layer.blob)
    with pytest.raises(OSError) as exc:
        open(os.path.join(m.mnt, "big"), "rb").read()        # 4 MiB on a 3 MiB disk
    assert exc.value.errno == errno.ENOSPC
    assert "is full" in log_of() and "cannot open big" in log_of()
    assert not any(os.path.exists(cache.path(d)) for d in filler)   # evicted trying
    for name, data in FILES.items():                 # the mount goes on working
        with open(os.path.join(m.mnt, name), "rb") as f:
            assert f.read() == data
    assert sorted(os.listdir(m.mnt)) == ["big", "d"]
    assert os.listdir(tmpfs / "cache" / "tmp") == []
    with pytest.raises(OSError) as exc:
        open(os.path.join(m.mnt, "big"), "rb")
    assert exc.value.errno == errno.ENOSPC


@pytest.fixture(scope="module")
def slow_image(tmp_path_factory, so):
    tmp = str(tmp_path_factory.mktemp("crashimg"))
    big = os.urandom(12 << 20)
    layer = build_layer(tmp, "crash", TarBuilder().file("big", big), chunk_size=1 << 20,
                        compression_level=1)
    reg = Registry(tmp)
    try:
        from stargz_overlay.registries_conf import RegistriesConf
        from stargz_overlay.registry import TOC_DIGEST_ANNOTATION, RegistryClient
        conf = RegistriesConf.from_text(f'[[registry]]\nlocation = "{reg.host}"\n'
                                        f'insecure = true\n')
        with RegistryClient(registries_conf=conf, auth_files=[], certs_dir=os.devnull) as c:
            push_image(c, f"{reg.host}/crash/app:1", [layer.blob],
                       layer_annotations=[{TOC_DIGEST_ANNOTATION: layer.result.toc_digest}])
        yield reg, layer, big
    finally:
        reg.stop()


def test_kill_9_during_a_cache_write_leaves_no_corrupt_entry(tmp_path, so, mounts, slow_image):
    reg, layer, big = slow_image
    host, port = reg.host.rsplit(":", 1)
    shaper = Shaper((host, int(port)), rtt_ms=2, mbit=24)
    proxy = Proxy(shaper.start())
    try:
        (tmp_path / "registries.conf").write_text("")
        (tmp_path / "auth.json").write_text("{}")
        config = write_config(tmp_path / "config.toml", str(tmp_path / "cache"),
                              str(tmp_path / "plugin.log"),
                              registry={"insecure": [proxy.host],
                                        "registries_conf": str(tmp_path / "registries.conf"),
                                        "auth_file": str(tmp_path / "auth.json")})
        spec = LayerSpec("registry", ref=f"{proxy.host}/crash/app:1",
                         digest=layer.result.blob_digest, toc=layer.result.toc_digest,
                         config=config)

        def mount(name):
            m = mounts(tmp_path / name, [plugin_lower(spec, tmp_path / f"{name}.l")], so=so)
            m.mount()
            return m

        m = mount("mnt")
        errors = []

        def reader():
            try:
                with open(os.path.join(m.mnt, "big"), "rb") as f:
                    f.read()
            except OSError as exc:
                errors.append(exc.errno)

        t = threading.Thread(target=reader)
        t.start()
        tmpdir = tmp_path / "cache" / "tmp"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sizes = [os.path.getsize(tmpdir / n) for n in os.listdir(tmpdir)]
            if sizes and sizes[0] >= 4 << 20:        # half written
                break
            time.sleep(0.01)
        else:
            pytest.fail("the cache write never got under way")
        for pid in m.pids:
            os.kill(pid, signal.SIGKILL)
        t.join(30)
        assert errors                                  # the reader saw the crash
        cache = ContentCache(str(tmp_path / "cache"), clean=False)
        final = cache.path(digest_of(big))
        assert not os.path.exists(final)               # never a partial entry
        leftovers = os.listdir(tmpdir)
        assert len(leftovers) == 1 and 0 < os.path.getsize(tmpdir / leftovers[0]) < len(big)
        m.unmount()                                    # the dead mount (ENOTCONN)
        report = gc_cli(config, "--max-size", "0")
        assert report["tmp_removed"] == 1 and report["dead_pins"] == 1
        assert os.listdir(tmpdir) == []
        m2 = mount("mnt2")
        with open(os.path.join(m2.mnt, "big"), "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(big).digest()
        assert ContentCache(str(tmp_path / "cache")).lookup(digest_of(big), len(big)) == final
    finally:
        proxy.stop()
        shaper.stop()
