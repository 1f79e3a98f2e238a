"""The mount program: what it rewrites, what it leaves alone, how it hands over."""

import os
import re
import subprocess
import sys
import time

import pytest

from stargz_overlay import mount_program
from stargz_overlay.layer_spec import decode
from stargz_overlay.mount_program import clean_stale, rewrite, split_options
from stargz_overlay.store_view import encode_ref

from .conftest import cli_env, estargz, mount_program_wrapper, push, running_store
from ..imagefixture import tar_layer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_plain_lower_dirs_pass_through_unchanged(tmp_path):
    lowers = [tmp_path / "l1", tmp_path / "l2"]
    for d in lowers:
        d.mkdir()
    argv = ["-o", f"lowerdir={lowers[0]}:{lowers[1]},upperdir=/u,workdir=/w,,volatile,"
                  'context="system_u:object_r:container_file_t:s0:c1,c2"', "/merged"]
    assert rewrite(argv) == (argv, False)
    argv = ["-olowerdir=l/A:l/B,upperdir=u", "-o", "uidmapping=0:1000:1,xattr_permissions=2",
            "-f", "/merged"]
    assert rewrite(argv, cwd=str(tmp_path)) == (argv, False)


def test_split_options_keeps_quoted_commas():
    assert split_options('a=1,context="x:y,z",b,,c\\,d') == \
        ["a=1", 'context="x:y,z"', "b", "", "c\\,d"]


@pytest.fixture(scope="module")
def menv(tmp_path_factory):
    with running_store(tmp_path_factory.mktemp("mountprog"), mount_program=False) as e:
        yield e


@pytest.fixture(scope="module")
def store_layer(menv):
    layer = estargz(tar_layer({"etc": ("dir",), "etc/greeting": b"hi from the store\n"}))
    ref = push(menv.registry.host, "mp/app:1", [layer]).replace(menv.registry.host,
                                                                menv.host, 1)
    diff = os.path.join(menv.mnt, "store", encode_ref(ref), layer.digest, "diff")
    assert os.path.isdir(diff)
    return ref, layer, diff


def test_store_layers_become_plugin_layers(tmp_path, menv, store_layer):
    ref, layer, diff = store_layer
    graph = tmp_path / "graph"
    (graph / "l").mkdir(parents=True)
    os.symlink(diff, graph / "l" / "STORE")              # as containers/storage links it
    (graph / "plain").mkdir()
    os.symlink("../plain", graph / "l" / "PLAIN")
    argv = ["-o", "lowerdir=l/STORE:l/PLAIN,upperdir=/u,workdir=/w,context=\"a,b\"",
            str(tmp_path / "merged")]
    new, changed = rewrite(argv, cwd=str(graph))
    assert changed
    assert new[:2] == ["-o", f"fast_ino=1,plugins={mount_program.plugin_so()}"]
    opts = split_options(new[3])
    assert opts[1:] == ["upperdir=/u", "workdir=/w", 'context="a,b"']
    items = opts[0][len("lowerdir="):].split(":")
    assert items[1] == "l/PLAIN"                          # untouched, even relative
    m = re.match(r"^//stargz/([A-Za-z0-9_-]+)/(/.+)$", items[0])
    spec = decode(m.group(1))
    assert (spec.kind, spec.ref, spec.digest, spec.path) == ("store-layer", ref, layer.digest,
                                                             menv.state)
    assert spec.toc and spec.size == len(layer.blob) and spec.config == menv.config
    assert m.group(2).startswith(os.path.join(menv.state, "mounts") + "/")
    # a plugins= already given keeps its plugins and gets ours added
    new, _ = rewrite(["-o", "plugins=/x.so,lowerdir=l/STORE", "/m"], cwd=str(graph))
    assert f"plugins=/x.so:{mount_program.plugin_so()}" in new[3]
    assert new[1] == "fast_ino=1"


def test_real_mount_through_the_mount_program(tmp_path, menv, store_layer):
    """Like containers/storage: stderr captured, the program must return once mounted."""
    ref, layer, diff = store_layer
    graph = tmp_path / "graph"
    (graph / "l").mkdir(parents=True)
    os.symlink(diff, graph / "l" / "STORE")
    (graph / "plain" / "etc").mkdir(parents=True)
    (graph / "plain" / "etc" / "plain").write_text("plain layer\n")
    os.symlink("../plain", graph / "l" / "PLAIN")
    for d in ("upper", "work", "merged"):
        (tmp_path / d).mkdir()
    prog = mount_program_wrapper(str(tmp_path))
    started = time.monotonic()
    res = subprocess.run([prog, "-o", f"lowerdir=l/PLAIN:l/STORE,upperdir={tmp_path}/upper,"
                                      f"workdir={tmp_path}/work", str(tmp_path / "merged")],
                         cwd=str(graph), capture_output=True, text=True, timeout=60)
    try:
        assert res.returncode == 0, res.stderr
        assert time.monotonic() - started < 30          # stderr was not kept open
        merged = tmp_path / "merged"
        assert (merged / "etc" / "greeting").read_text() == "hi from the store\n"
        assert (merged / "etc" / "plain").read_text() == "plain layer\n"
        (merged / "etc" / "greeting").write_text("changed\n")
        assert (tmp_path / "upper" / "etc" / "greeting").read_text() == "changed\n"
        with open("/proc/self/mountinfo") as f:
            line = next(x for x in f if f" {merged} " in x)
        assert "fuse" in line
    finally:
        subprocess.run(["fusermount3", "-u", str(tmp_path / "merged")], capture_output=True)
    # the store's copy is untouched
    with open(os.path.join(diff, "etc", "greeting")) as f:
        assert f.read() == "hi from the store\n"


def test_stale_mount_directories_are_removed(tmp_path):
    base = tmp_path / "mounts"
    old = base / "old-1" / "0"
    old.mkdir(parents=True)
    (old / ".lock").write_text("")
    fresh = base / "fresh-1" / "0"
    fresh.mkdir(parents=True)
    past = time.time() - 3600
    os.utime(base / "old-1", (past, past))
    clean_stale(str(base))
    assert not (base / "old-1").exists()
    assert (base / "fresh-1").exists()


def test_refuses_fuse_overlayfs_2(tmp_path, menv, store_layer):
    fake = tmp_path / "fuse-overlayfs"
    fake.write_text("#!/bin/sh\necho 'fuse-overlayfs: version 2.0.0'\n")
    fake.chmod(0o755)
    graph = tmp_path / "graph"
    (graph / "l").mkdir(parents=True)
    os.symlink(store_layer[2], graph / "l" / "STORE")
    res = subprocess.run([sys.executable, "-m", "stargz_overlay.mount_program", "-o",
                          "lowerdir=l/STORE,upperdir=/u,workdir=/w", "/m"], cwd=str(graph),
                         env=cli_env(STARGZ_OVERLAY_FUSE_OVERLAYFS=str(fake)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "fuse-overlayfs 2.0" in res.stderr and "1.x" in res.stderr
    # without store layers, any fuse-overlayfs is run as it is
    res = subprocess.run([sys.executable, "-m", "stargz_overlay.mount_program", "-o",
                          "lowerdir=/tmp,upperdir=/u,workdir=/w", "/m"],
                         env=cli_env(STARGZ_OVERLAY_FUSE_OVERLAYFS=str(fake)),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "version 2.0.0" in res.stdout


def test_console_script_is_declared():
    with open(os.path.join(REPO, "setup.py")) as f:
        text = f.read()
    assert "stargz-overlay-mount = stargz_overlay.mount_program:main" in text
