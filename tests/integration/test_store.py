"""The store on its own: on-demand lookups, what is absent and why, the notifications.

Everything goes through the real mount (fuse-overlayfs 1.x with the plugin);
the registry is real, behind a counting proxy.
"""

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from stargz_overlay.registry import TOC_DIGEST_ANNOTATION
from stargz_overlay.store_view import encode_ref

from .conftest import busybox_tar, cli, cli_env, estargz, plain_gzip, push, running_store
from ..imagefixture import tar_layer

DATA = os.urandom(300_000)
FILES = tar_layer({"srv": ("dir",), "srv/a.txt": b"alpha\n", "srv/data.bin": DATA,
                   "srv/link": ("symlink", "a.txt")})


@pytest.fixture(scope="module")
def senv(tmp_path_factory):
    with running_store(tmp_path_factory.mktemp("store"), mount_program=False) as e:
        yield e


@pytest.fixture(scope="module")
def layers():
    good = estargz(FILES)
    unpinned = estargz(FILES, chunk_size=32768)
    unpinned.annotations = {}
    wrong = estargz(tar_layer({"x": b"y"}))
    wrong.annotations = dict(wrong.annotations)
    wrong.annotations[TOC_DIGEST_ANNOTATION] = "sha256:" + "0" * 64
    return {"good": good, "gzip": plain_gzip(busybox_tar()), "unpinned": unpinned,
            "wrong": wrong}


@pytest.fixture(scope="module")
def image(senv, layers):
    ref = put(senv, "store/test:1", [layers["gzip"], layers["good"], layers["unpinned"],
                                          layers["wrong"]])
    return ref


def put(env, name, layers):
    """Push to the registry itself; return the reference through the counting proxy."""
    return push(env.registry.host, name, layers).replace(env.registry.host, env.host, 1)


def layer_dir(env, ref, digest):
    return os.path.join(env.mnt, "store", encode_ref(ref), digest)


def test_marker_and_lookups_on_demand(senv, layers, image):
    with open(os.path.join(senv.mnt, "stargz-overlay-store.json")) as f:
        marker = json.load(f)
    assert marker["state_dir"] == senv.state and marker["config"] == senv.config
    good = layers["good"]
    mark = senv.mark()
    d = layer_dir(senv, image, good.digest)
    assert os.path.isdir(os.path.join(d, "diff"))
    with open(os.path.join(d, "info")) as f:
        info = json.load(f)
    assert info == {"compressed-diff-digest": good.digest, "compressed-size": len(good.blob),
                    "diff-digest": good.diff_id, "diff-size": len(FILES), "compression": 2}
    assert os.stat(os.path.join(d, "blob")).st_size == len(good.blob)
    assert senv.layer_gets(good, mark)[0] == 0          # stat of blob fetched nothing
    # the diff tree is the layer
    assert sorted(os.listdir(os.path.join(d, "diff", "srv"))) == ["a.txt", "data.bin", "link"]
    assert os.readlink(os.path.join(d, "diff", "srv", "link")) == "a.txt"
    with open(os.path.join(d, "diff", "srv", "a.txt"), "rb") as f:
        assert f.read() == b"alpha\n"
    full, ranged = senv.layer_gets(good, mark)
    assert full == 0 and ranged < len(DATA) // 4
    # the blob, when read, is the registry's blob, whole and verified
    with open(os.path.join(d, "blob"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == good.digest.split(":")[1]
    # a layer can be named by its TOC digest (newer containers/storage does that)
    toc = good.annotations[TOC_DIGEST_ANNOTATION]
    with open(os.path.join(layer_dir(senv, image, toc), "diff", "srv", "a.txt"), "rb") as f:
        assert f.read() == b"alpha\n"


@pytest.mark.parametrize("name,reason", [
    ("gzip", "no toc.digest annotation and footer is plain gzip"),
    ("unpinned", "without a TOC digest annotation"),
    ("wrong", "TOC does not match the manifest's TOC digest annotation"),
])
def test_unusable_layers_are_absent_with_a_reason(senv, layers, image, name, reason):
    d = layer_dir(senv, image, layers[name].digest)
    assert not os.path.exists(os.path.join(d, "diff"))
    assert not os.path.exists(d)
    report = senv.status()
    rows = {r["digest"]: r for img in report["images"] if img["ref"] == image
            for r in img["layers"]}
    assert rows[layers[name].digest]["mode"] == "pulled"
    assert reason in rows[layers[name].digest]["reason"]


def test_names_that_are_not_references_or_digests(senv, image, layers):
    store = os.path.join(senv.mnt, "store")
    for name in ("not-base64!", encode_ref("short-name:1"), encode_ref("UPPER/x:1"), "%%%"):
        assert not os.path.exists(os.path.join(store, name))
    ref_dir = os.path.join(store, encode_ref(image))
    assert os.path.isdir(ref_dir)
    for name in ("latest", "sha256:xyz", "sha256:" + "a" * 64, ".wh.x"):
        assert not os.path.exists(os.path.join(ref_dir, name))
    assert not os.path.exists(os.path.join(store, encode_ref(image), layers["good"].digest,
                                           "other"))


def test_namespace_listings_never_stop_on_demand_lookups(senv, layers):
    store = os.path.join(senv.mnt, "store")
    try:
        listed = os.listdir(store)
    except OSError as exc:
        listed = exc.errno
    assert listed in ([], errno.ENOENT)
    ref = put(senv, "store/listed:1", [layers["good"]])
    ref_dir = os.path.join(store, encode_ref(ref))
    try:
        os.listdir(ref_dir)
    except OSError:
        pass
    # new names are still looked up after the listings
    assert os.path.isdir(os.path.join(ref_dir, layers["good"].digest, "diff"))
    other = put(senv, "store/listed:2", [layers["good"]])
    assert os.path.isdir(os.path.join(store, encode_ref(other), layers["good"].digest, "diff"))


def test_use_and_release_notifications(senv, layers):
    ref = put(senv, "store/notify:1", [layers["good"]])
    d = layer_dir(senv, ref, layers["good"].digest)
    assert os.path.isdir(os.path.join(d, "diff"))
    # containers/storage: os.Create(<layer>/use) then os.Remove; rmdir(<layer>) on release.
    # A store that supports GC answers both with ENOENT.
    for _ in range(2):
        with pytest.raises(FileNotFoundError):
            os.close(os.open(os.path.join(d, "use"), os.O_CREAT | os.O_RDWR | os.O_TRUNC))
    with pytest.raises(FileNotFoundError):
        os.rmdir(d)
    doc = json.load(open(os.path.join(senv.state, "layers",
                                      layers["good"].digest.split(":")[1] + ".json")))
    assert doc["uses"] >= 2 and doc["releases"] >= 1
    # after the release the layer still answers (it is opened again on demand)
    with open(os.path.join(d, "diff", "srv", "a.txt"), "rb") as f:
        assert f.read() == b"alpha\n"


def test_transient_registry_failure_is_retried(senv, layers):
    ref = put(senv, "store/flaky:1", [layers["good"]])
    d = layer_dir(senv, ref, layers["good"].digest)
    senv.registry.kill()
    try:
        started = time.monotonic()
        assert not os.path.exists(os.path.join(d, "diff"))
        assert time.monotonic() - started < 30
    finally:
        senv.registry.start()
    layer = json.load(open(os.path.join(senv.state, "layers",
                                        layers["good"].digest.split(":")[1] + ".json")))
    assert layer["lazy"] is False and "cannot resolve it now" in layer["reason"]
    deadline = time.monotonic() + 15
    while not os.path.exists(os.path.join(d, "diff")):
        assert time.monotonic() < deadline, "the store never asked the registry again"
        time.sleep(0.5)


def test_foreground_store_notifies_systemd_and_stops_on_sigterm(tmp_path, senv):
    mnt = str(tmp_path / "fg")
    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(30)
    proc = subprocess.Popen([sys.executable, "-m", "stargz_overlay", "store", "--foreground",
                             mnt, "--state-dir", str(tmp_path / "fgstate"), "--config",
                             senv.config], env=cli_env(NOTIFY_SOCKET=sock_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        message = sock.recv(4096).decode()
        assert message.startswith("READY=1")
        assert os.path.ismount(mnt)
        assert os.path.exists(os.path.join(mnt, "stargz-overlay-store.json"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not os.path.ismount(mnt)
        assert os.path.isdir(os.path.join(mnt, "store"))   # the ALS path outlives the mount
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
        sock.close()
        from stargz_overlay.store import index_path
        if os.path.exists(index_path(mnt)):
            os.unlink(index_path(mnt))


def test_store_command_errors(tmp_path, senv):
    res = cli("store", senv.mnt, "--state-dir", str(tmp_path / "s"), "--config", senv.config,
              check=False)
    assert res.returncode == 1 and "already a mount point" in res.stderr
    res = cli("store", str(tmp_path / "m"), "--state-dir", str(tmp_path / "m" / "s"),
              check=False)
    assert res.returncode == 1 and "inside the mountpoint" in res.stderr
    res = cli("store", str(tmp_path / "m"), "--config", str(tmp_path / "missing.toml"),
              check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli("store", str(tmp_path / "m"), "--config", senv.config, "--dry-run")
    assert "static_nlink" in res.stdout and "fast_ino=1" in res.stdout
    res = cli("store", "--unmount", str(tmp_path / "m"), check=False)
    assert res.returncode == 1 and "not mounted" in res.stderr


def test_status_text(senv, layers, image):
    os.path.exists(os.path.join(layer_dir(senv, image, layers["good"].digest), "diff"))
    text = cli("status", "--state-dir", senv.state, "--config", senv.config).stdout
    assert f"image {image}" in text
    assert "lazy" in text and "pulled" in text and "% local" in text
    # --store finds the state through the mounted store's marker
    text2 = cli("status", "--store", senv.mnt).stdout
    assert f"image {image}" in text2
