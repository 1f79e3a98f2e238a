"""Laziness, caching, integrity and threads of plugin layers, on real mounts.

Blob reads are counted from the plugin log (``log_reads``): every read of a
layer blob is logged with its offset and length.
"""

import errno
import os
import random
import stat
import subprocess
import threading
import time

import pytest

from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource

from .conftest import blob_reads
from .fusehelp import blob_spec, plugin_lower
from .layers import build_layer
from ..format.tarbuild import TarBuilder

FILES = {f"d{i}/f{j}": os.urandom(1000 + 3000 * j) for i in range(3) for j in range(6)}
BIG = os.urandom(600_000)


def lazy_tree():
    b = TarBuilder()
    for i in range(3):
        b.dir(f"d{i}")
    for name, data in FILES.items():
        b.file(name, data, xattrs={"user.n": name.encode()} if name.endswith("f1") else {})
    b.file("big", BIG)
    b.hardlink("big-link", "big")
    b.symlink("sym", "d0/f0")
    return b


def file_ranges(blob):
    """{name: (start, end)} of each regular file's compressed bytes in the blob."""
    with FileSource(blob) as src:
        r = StargzReader(src)
        return {e.name: (e.chunks[0].offset, e.chunks[-1].end)
                for e in r.toc.entries if e.type == "reg" and e.size}


def reads_in(reads, rng):
    return [r for r in reads if r[0] < rng[1] and r[0] + r[1] > rng[0]]


@pytest.fixture
def layer(tmp_path):
    # level 0: stored deflate blocks, so a member's size depends only on its length
    return build_layer(str(tmp_path), "lazy", lazy_tree(), chunk_size=128 << 10,
                       compression_level=0)


def mount_one(mounts, tmp_path, so, config, blob, options=(), name="mnt", upper=True):
    m = mounts(tmp_path / name, [plugin_lower(blob_spec(blob, config), tmp_path / f"{name}.l")],
               tmp_path / f"{name}.up" if upper else None,
               tmp_path / f"{name}.wk" if upper else None, options=options, so=so)
    m.mount()
    return m


def test_only_opened_files_are_fetched(tmp_path, so, config, mounts, log_of, layer):
    m = mount_one(mounts, tmp_path, so, config, layer.blob)
    at_load = blob_reads(log_of())
    assert len(at_load) == 2                          # footer, then TOC
    subprocess.run(["ls", "-lRi", m.mnt], check=True, capture_output=True)
    subprocess.run(["find", m.mnt, "-printf", "%p %s %m %u\n"], check=True, capture_output=True)
    for dirpath, dirs, files in os.walk(m.mnt):
        for name in files + dirs:
            os.lstat(os.path.join(dirpath, name))
            os.listxattr(os.path.join(dirpath, name), follow_symlinks=False)
    assert os.readlink(os.path.join(m.mnt, "sym")) == "d0/f0"
    assert blob_reads(log_of()) == at_load            # metadata never touches the blob

    ranges = file_ranges(layer.blob)
    with open(os.path.join(m.mnt, "d1/f3"), "rb") as f:
        assert f.read() == FILES["d1/f3"]
    new = blob_reads(log_of())[len(at_load):]
    assert new and all(reads_in([r], ranges["d1/f3"]) for r in new)
    assert sum(r[1] for r in new) <= ranges["d1/f3"][1] - ranges["d1/f3"][0]

    before = len(blob_reads(log_of()))
    with open(os.path.join(m.mnt, "d1/f3"), "rb") as f:   # reopen: cache hit
        assert f.read() == FILES["d1/f3"]
    with open(os.path.join(m.mnt, "sym"), "rb") as f:     # through a symlink: fetched once
        assert f.read() == FILES["d0/f0"]
    after_sym = len(blob_reads(log_of()))
    assert after_sym == before + 1
    for name in ("big", "big-link"):                       # hardlinks share one fetch
        with open(os.path.join(m.mnt, name), "rb") as f:
            assert f.read() == BIG
    big_reads = reads_in(blob_reads(log_of()), ranges["big"])
    assert len(big_reads) == 1


def test_cache_survives_remount_and_is_shared_by_layers(tmp_path, so, config, mounts, log_of,
                                                        layer):
    m = mount_one(mounts, tmp_path, so, config, layer.blob)
    with open(os.path.join(m.mnt, "d2/f5"), "rb") as f:
        assert f.read() == FILES["d2/f5"]
    m.unmount()
    # a different blob holding the same file content, mounted with the first
    b = TarBuilder()
    b.file("copy", FILES["d2/f5"])
    other = build_layer(str(tmp_path), "other", b)
    m2 = mounts(tmp_path / "m2", [plugin_lower(blob_spec(other.blob, config), tmp_path / "o.l"),
                                  plugin_lower(blob_spec(layer.blob, config), tmp_path / "l.l")],
                so=so)
    start = len(blob_reads(log_of()))
    m2.mount()
    for name in ("copy", "d2/f5"):
        with open(os.path.join(m2.mnt, name), "rb") as f:
            assert f.read() == FILES["d2/f5"]
    assert len(blob_reads(log_of())) == start + 4     # only the two footers + TOCs
    cache = os.path.join(tmp_path, "cache")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert not os.listdir(os.path.join(cache, "tmp"))


def corrupt_copy(tmp_path, layer, name):
    """A copy of the blob where ``name``'s compressed bytes are replaced by a valid gzip
    member of the same length holding other bytes: only the digest check can notice."""
    b = TarBuilder()
    for i in range(3):
        b.dir(f"d{i}")
    for fname, data in FILES.items():
        if fname == name:
            data = os.urandom(len(data))
        b.file(fname, data, xattrs={"user.n": fname.encode()} if fname.endswith("f1") else {})
    b.file("big", BIG)
    b.hardlink("big-link", "big")
    b.symlink("sym", "d0/f0")
    evil = build_layer(str(tmp_path), "evil", b, chunk_size=128 << 10, compression_level=0)
    good = file_ranges(layer.blob)[name]
    bad = file_ranges(evil.blob)[name]
    assert good == bad
    data = bytearray(open(layer.blob, "rb").read())
    original = bytes(data[good[0]:good[1]])
    data[good[0]:good[1]] = open(evil.blob, "rb").read()[bad[0]:bad[1]]
    path = os.path.join(tmp_path, "corrupt.blob")
    with open(path, "wb") as f:
        f.write(data)
    return path, good, original


@pytest.mark.parametrize("how", ["digest", "gzip"])
def test_corrupt_bytes_give_eio_never_wrong_data(tmp_path, so, config, mounts, log_of, layer,
                                                 how):
    name = "d0/f4"
    path, rng, original = corrupt_copy(tmp_path, layer, name)
    if how == "gzip":          # a broken gzip header instead
        with open(path, "r+b") as f:
            f.seek(rng[0])
            f.write(b"\xff" * 16)
    m = mount_one(mounts, tmp_path, so, config, path)
    target = os.path.join(m.mnt, name)
    for attempt in range(2):                         # each open retries and fails again
        with pytest.raises(OSError) as exc:
            with open(target, "rb") as f:
                f.read()
        assert exc.value.errno == errno.EIO
    text = log_of()
    assert f"cannot open {name}:" in text
    assert ("does not match" if how == "digest" else "corrupt gzip") in text
    assert len(reads_in(blob_reads(text), rng)) == 2
    with open(os.path.join(m.mnt, "d0/f3"), "rb") as f:      # the rest still works
        assert f.read() == FILES["d0/f3"]
    with open(path, "r+b") as f:                              # repaired: the next open works
        f.seek(rng[0])
        f.write(original)
    with open(target, "rb") as f:
        assert f.read() == FILES[name]
    cache = os.path.join(tmp_path, "cache")
    assert not os.listdir(os.path.join(cache, "tmp"))


def test_threaded_parallel_readers(tmp_path, so, config, mounts, log_of, layer):
    m = mount_one(mounts, tmp_path, so, config, layer.blob, options=["threaded=1"])
    expected = dict(FILES, big=BIG)
    expected["big-link"] = BIG
    errors = []
    barrier = threading.Barrier(8)

    def reader(seed):
        names = sorted(expected)
        random.Random(seed).shuffle(names)
        try:
            barrier.wait()
            with open(os.path.join(m.mnt, "big"), "rb") as f:   # all 8 at once
                assert f.read() == BIG
            for name in names:
                with open(os.path.join(m.mnt, name), "rb") as f:
                    if f.read() != expected[name]:
                        errors.append(f"wrong bytes in {name}")
        except Exception as exc:      # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors
    reads = blob_reads(log_of())
    for name, rng in file_ranges(layer.blob).items():
        assert len(reads_in(reads, rng)) == 1, name         # every file fetched once
    status = open(f"/proc/{m.pids[0]}/status").read()
    assert int(status.split("Threads:")[1].split()[0]) > 1


def test_default_mode_daemon_is_single_threaded_and_detached(tmp_path, so, config, mounts,
                                                             layer):
    m = mount_one(mounts, tmp_path, so, config, layer.blob)
    assert m.elapsed < 20 and m.result.stderr.count("stargz-overlay") == 0
    with open(os.path.join(m.mnt, "d0/f0"), "rb") as f:
        assert f.read() == FILES["d0/f0"]
    [pid] = m.pids

    def not_ours():
        comms = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comms.append(f.read().strip())
            except FileNotFoundError:       # a thread that has just ended
                pass
        return [c for c in comms if not c.startswith("sz-")]

    # fuse-overlayfs's own loop is single-threaded; our workers (metrics, prefetch,
    # background fetch) are named sz-* and started in the daemon only.  A worker names
    # itself once it runs, and has the daemon's name until then (the first open above
    # starts the metrics writer): wait for the names to settle, not for a fixed time.
    deadline = time.monotonic() + 10
    while len(others := not_ours()) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(others) == 1, others
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"


def test_prioritized_files_are_prefetched_in_the_daemon(tmp_path, so, config, mounts, log_of):
    wanted = ["d1/f2", "d0/f5", "big"]
    layer = build_layer(str(tmp_path), "prio", lazy_tree(), chunk_size=128 << 10)
    with open(layer.tar, "rb") as tar, open(layer.blob, "wb") as out:
        from stargz_overlay.writer import convert
        convert(tar, out, chunk_size=128 << 10, prioritized=wanted)
    m = mount_one(mounts, tmp_path, so, config, layer.blob)
    at_load = len(blob_reads(log_of()))
    os.listdir(m.mnt)                              # first callback in the daemon
    deadline = time.monotonic() + 20
    while "prefetched" not in log_of() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "prefetched 3 prioritized files" in log_of()
    prefetch_reads = blob_reads(log_of())[at_load:]
    assert len(prefetch_reads) == 1                # the whole region in one read
    for name in wanted:
        with open(os.path.join(m.mnt, name), "rb") as f:
            assert f.read() == (BIG if name == "big" else FILES[name])
    assert len(blob_reads(log_of())) == at_load + 1   # opens are cache hits
    with open(os.path.join(m.mnt, "d2/f0"), "rb") as f:
        assert f.read() == FILES["d2/f0"]
    assert len(blob_reads(log_of())) == at_load + 2
