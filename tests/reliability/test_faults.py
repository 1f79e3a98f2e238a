"""Registry and disk faults under a real fuse-overlayfs mount of registry layers.

A real docker-registry serves one eStargz layer; the plugin reaches it
directly (kill, SIGSTOP) or through ``FaultProxy`` (500s, latency, flipped
bytes, dead redirects, cut connections).  What must hold every time: an open
of data that is not cached fails with EIO within the configured deadline
(wall clock measured), data already cached and all metadata keep working,
and once the fault is gone the same mount serves the file correctly without
any clean-up.  The cache survives a full disk and a daemon killed mid-write
without a single unverified entry.
"""

import errno
import os
import random
import subprocess
import threading
import time

import pytest

from ..registryfixture import Registry, refused_port
from .faultproxy import FaultProxy
from .helpers import alive, check_cache, cli, unread_requests, wait_until
from .regimage import DEADLINE, push_files, registry_config

SMALL = {f"small/f{i:02d}": random.Random(i).randbytes(40_000 + 1000 * i) for i in range(16)}
BIG = random.Random(99).randbytes(24 << 20)
FILES = dict(SMALL, big=BIG)
# an unfetched open fails within the deadline plus retries' backoff and FUSE overhead
FAIL_WITHIN = DEADLINE + 4


@pytest.fixture(scope="module")
def registry(tmp_path_factory, so):
    tmp = tmp_path_factory.mktemp("faults")
    reg = Registry(str(tmp))
    try:
        layer = push_files(str(tmp), reg, FILES)
        yield reg, layer
    finally:
        reg.stop()


@pytest.fixture
def proxy(registry):
    p = FaultProxy(registry[0].host)
    yield p
    p.stop()


def mount(tmp_path, so, mounts, layer, host, name="mnt", options=(), conf_dir=None,
          layer_dir=None, **extra):
    config, paths = registry_config(conf_dir or tmp_path / "conf", [host], **extra)
    m = mounts(tmp_path / name, [layer.lower(host, config, layer_dir or tmp_path / f"{name}.l")],
               tmp_path / f"{name}.up", tmp_path / f"{name}.wk", options=list(options), so=so)
    m.mount()
    m.paths = paths
    return m


def read_in_thread(path, timeout):
    """(bytes or OSError, seconds); a read still blocked after ``timeout`` fails the test."""
    box = {}

    def run():
        started = time.monotonic()
        try:
            with open(path, "rb") as f:
                box["result"] = f.read()
        except OSError as exc:
            box["result"] = exc
        box["seconds"] = time.monotonic() - started

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"reading {path} still blocked after {timeout} s"
    return box["result"], box["seconds"]


def expect_eio(m, name, within=FAIL_WITHIN):
    result, seconds = read_in_thread(os.path.join(m.mnt, name), within + 10)
    assert isinstance(result, OSError) and result.errno == errno.EIO, result
    assert seconds < within, f"EIO after {seconds:.1f} s, the bound is {within} s"
    return seconds


def expect_data(m, name, timeout=30):
    result, seconds = read_in_thread(os.path.join(m.mnt, name), timeout)
    assert result == FILES[name], result if isinstance(result, OSError) else "wrong bytes"
    return seconds


def metadata_still_works(m):
    listing = subprocess.run(["find", m.mnt, "-printf", "%p %s %m\n"], capture_output=True,
                             timeout=30)
    assert listing.returncode == 0
    assert len(listing.stdout.splitlines()) == len(FILES) + 2          # + root, small/
    for name, data in FILES.items():
        assert os.stat(os.path.join(m.mnt, name)).st_size == len(data)
    assert alive(m.pids[0])


def test_killed_registry(tmp_path, so, mounts, registry):
    reg, layer = registry
    m = mount(tmp_path, so, mounts, layer, reg.host)
    expect_data(m, "small/f00")
    reg.kill()
    try:
        expect_eio(m, "small/f01")
        expect_data(m, "small/f00", timeout=5)          # cached: served while the registry is gone
        metadata_still_works(m)
    finally:
        reg.start()
    expect_data(m, "small/f01")                         # the same mount recovers by itself


def test_hung_registry(tmp_path, so, mounts, registry):
    reg, layer = registry
    m = mount(tmp_path, so, mounts, layer, reg.host)
    expect_data(m, "small/f00")
    reg.freeze()                                        # accepts connections, never answers
    try:
        expect_eio(m, "small/f02")
        expect_data(m, "small/f00", timeout=5)
        metadata_still_works(m)
    finally:
        reg.thaw()
    expect_data(m, "small/f02")


def cached_read_during_a_hung_fetch(tmp_path, so, mounts, registry):
    """Seconds a read of a cached file takes while another open waits for a hung registry
    (threaded mount); also checks that the hung open ends in EIO within the bound."""
    reg, layer = registry
    m = mount(tmp_path, so, mounts, layer, reg.host, options=["threaded=1"])
    expect_data(m, "small/f00")
    os.stat(os.path.join(m.mnt, "small/f03"))
    reg.freeze()
    try:
        box = {}
        blocked = threading.Thread(target=lambda: box.update(r=read_in_thread(
            os.path.join(m.mnt, "small/f03"), FAIL_WITHIN + 10)), daemon=True)
        blocked.start()
        # the fetch of f03 is waiting once its request sits unread at the frozen registry
        # (a fixed sleep could end before the open even began on a loaded machine, and
        # then the cached read measured nothing)
        assert wait_until(lambda: unread_requests(reg.port), DEADLINE), \
            "the open of small/f03 sent no request"
        cached_seconds = expect_data(m, "small/f00", timeout=FAIL_WITHIN + 10)
        blocked.join(FAIL_WITHIN + 15)
    finally:
        reg.thaw()
    result, seconds = box["r"]
    assert isinstance(result, OSError) and result.errno == errno.EIO
    assert seconds < FAIL_WITHIN
    return cached_seconds


def test_a_hung_fetch_stalls_other_opens_at_most_the_deadline(tmp_path, so, mounts, registry):
    """fuse-overlayfs 1.x holds its big lock in ovl_open across the plugin's openat, so
    every other open (and lookup, getattr) of the mount waits for a fetch in progress:
    with a hung registry, until the fetch gives up.  The deadline bounds that stall."""
    seconds = cached_read_during_a_hung_fetch(tmp_path, so, mounts, registry)
    print(f"a cached read waited {seconds:.1f} s behind a hung fetch (deadline {DEADLINE} s)")
    assert seconds < FAIL_WITHIN


@pytest.mark.xfail(strict=True, reason="fuse-overlayfs 1.x ovl_open() takes enter_big_lock() "
                   "around ovl_do_open(), which calls the plugin's openat: while one file is "
                   "fetched, opens of cached files (and lookups, getattr) wait for it; the "
                   "plugin cannot release that lock, only bound the fetch (deadline)")
def test_a_hung_fetch_does_not_delay_cached_files(tmp_path, so, mounts, registry):
    assert cached_read_during_a_hung_fetch(tmp_path, so, mounts, registry) < 1.0


def test_slow_registry(tmp_path, so, mounts, registry, proxy):
    _, layer = registry
    proxy.latency = 0.2
    proxy.rate = 4 << 20
    m = mount(tmp_path, so, mounts, layer, proxy.host)
    for name in ("small/f04", "small/f05"):
        assert expect_data(m, name) < FAIL_WITHIN


def test_http_500s(tmp_path, so, mounts, registry, proxy):
    _, layer = registry
    m = mount(tmp_path, so, mounts, layer, proxy.host)
    proxy.fail_status, proxy.fail_count = 500, 1        # one transient 500: retried
    expect_data(m, "small/f06")
    assert proxy.fail_count == 0
    proxy.fail_status, proxy.fail_count = 500, None     # a registry that keeps failing
    expect_eio(m, "small/f07")
    expect_data(m, "small/f06", timeout=5)
    metadata_still_works(m)
    proxy.fail_status, proxy.retry_after = 503, 3600    # "come back in an hour": not waited for
    expect_eio(m, "small/f07", within=3)
    proxy.reset()
    expect_data(m, "small/f07")


def test_wrong_bytes(tmp_path, so, mounts, registry, proxy):
    _, layer = registry
    m = mount(tmp_path, so, mounts, layer, proxy.host)
    start, end = layer.ranges["small/f08"]
    proxy.flip_byte = (start + end) // 2
    expect_eio(m, "small/f08")
    assert check_cache(m.paths["cache"]) == []
    proxy.reset()
    expect_data(m, "small/f08")
    assert check_cache(m.paths["cache"]) == []


def test_redirect_to_a_dead_host(tmp_path, so, mounts, registry, proxy):
    _, layer = registry
    m = mount(tmp_path, so, mounts, layer, proxy.host)
    with refused_port() as port:                            # nothing listens there
        proxy.redirect_to = f"http://127.0.0.1:{port}"
        expect_eio(m, "small/f09")
    proxy.reset()
    expect_data(m, "small/f09")


def test_connections_cut_mid_answer(tmp_path, so, mounts, registry, proxy):
    _, layer = registry
    m = mount(tmp_path, so, mounts, layer, proxy.host)
    proxy.cut_after = 1000
    expect_eio(m, "small/f10")
    proxy.reset()
    expect_data(m, "small/f10")


def test_unresolvable_registry_name(tmp_path, so, mounts, registry):
    _, layer = registry
    host = "nonexistent.invalid:5000"
    config, _ = registry_config(tmp_path / "conf", [host])
    m = mounts(tmp_path / "mnt", [layer.lower(host, config, tmp_path / "l")], so=so)
    started = time.monotonic()
    result = m.mount(check=False)
    assert time.monotonic() - started < FAIL_WITHIN
    assert result.returncode != 0 and not m.mounted
    ours = [line for line in result.stderr.splitlines() if line.startswith("stargz-overlay:")]
    assert len(ours) == 1 and "nonexistent.invalid" in ours[0], result.stderr
    rc, out, err, _ = cli("ls", f"docker://{host}/rel/app:1", "--layer", "0", timeout=60)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "nonexistent.invalid" in err, err


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs for the cache (root needed; skipped with the reason otherwise)."""
    path = tmp_path / "smalldisk"
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test: {r.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_cache_disk_full(tmp_path, so, mounts, registry, small_disk):
    reg, layer = registry
    cache = str(small_disk / "cache")
    m = mount(tmp_path, so, mounts, layer, reg.host, cache_dir=cache)
    expect_data(m, "small/f11")
    result, seconds = read_in_thread(os.path.join(m.mnt, "big"), FAIL_WITHIN + 30)
    assert isinstance(result, OSError) and result.errno in (errno.ENOSPC, errno.EIO), result
    expect_data(m, "small/f11", timeout=5)              # cached data keeps working
    assert check_cache(cache) == []
    leftovers = [n for n in os.listdir(os.path.join(cache, "tmp"))]
    assert leftovers == [], f"partial files left in the cache: {leftovers}"
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    expect_data(m, "big", timeout=60)                   # room again: no restart needed
    assert check_cache(cache) == []


def test_daemon_killed_mid_write(tmp_path, so, mounts, registry, proxy):
    """Power loss while a file is being written to the cache: nothing half-written is ever
    served, and the next mount fetches the file again and serves it verified."""
    _, layer = registry
    conf = tmp_path / "conf"
    proxy.rate = 3 << 20                                # ~8 s for the 24 MiB file
    m = mount(tmp_path, so, mounts, layer, proxy.host, conf_dir=conf, layer_dir=tmp_path / "l")
    cache = m.paths["cache"]
    tmpdir = os.path.join(cache, "tmp")
    reader = threading.Thread(target=read_in_thread, args=(os.path.join(m.mnt, "big"), 60),
                              daemon=True)
    reader.start()

    def writing():
        sizes = [os.path.getsize(os.path.join(tmpdir, n)) for n in os.listdir(tmpdir)]
        return any(s >= 4 << 20 for s in sizes)

    assert wait_until(writing, 30), "the fetch never started writing to the cache"
    pid = m.pids[0]
    os.kill(pid, 9)
    assert wait_until(lambda: not alive(pid), 10)
    reader.join(15)
    m.unmount()
    assert check_cache(cache) == []
    big_digest = layer_digest_of(layer, "big")
    assert not os.path.exists(os.path.join(cache, "sha256", big_digest[:2], big_digest))
    proxy.reset()
    m2 = mount(tmp_path, so, mounts, layer, proxy.host, name="mnt2", conf_dir=conf,
               layer_dir=tmp_path / "l")
    expect_data(m2, "big", timeout=60)
    assert check_cache(cache) == []
    m2.unmount()
    leftovers = os.listdir(tmpdir)
    print(f"partial files left in cache/tmp after the crash and a new mount: {leftovers}")


def layer_digest_of(layer, name):
    import hashlib
    return hashlib.sha256(layer.files[name]).hexdigest()


def test_damaged_cache_entry_is_refetched(tmp_path, so, mounts, registry):
    """A published entry whose data never reached the disk (power loss after the rename,
    without fsync) is detected on first use by a new mount and fetched again."""
    reg, layer = registry
    conf = tmp_path / "conf"
    m = mount(tmp_path, so, mounts, layer, reg.host, conf_dir=conf)
    expect_data(m, "small/f12")
    expect_data(m, "small/f13")
    m.unmount()
    cache = m.paths["cache"]
    for name, damage in (("small/f12", "flip"), ("small/f13", "truncate")):
        hexd = layer_digest_of(layer, name)
        path = os.path.join(cache, "sha256", hexd[:2], hexd)
        os.chmod(path, 0o600)
        with open(path, "r+b") as f:
            if damage == "flip":
                f.seek(100)
                byte = f.read(1)
                f.seek(100)
                f.write(bytes([byte[0] ^ 0xFF]))
            else:
                f.truncate(1000)
        os.chmod(path, 0o400)
    assert len(check_cache(cache)) == 2
    m2 = mount(tmp_path, so, mounts, layer, reg.host, name="mnt2", conf_dir=conf)
    expect_data(m2, "small/f12")
    expect_data(m2, "small/f13")
    assert check_cache(cache) == []
