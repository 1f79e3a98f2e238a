"""``stargz-overlay plugin-path`` and ``stargz-overlay mount``."""

import os
import subprocess
import sys


from .fusehelp import Mount, _daemon_pids
from .layers import build_layer
from ..format.tarbuild import TarBuilder


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "stargz_overlay", *args], capture_output=True,
                       text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"stargz-overlay {' '.join(args)} failed: {r.stderr}")
    return r


def test_plugin_path_prints_the_built_so(so):
    out = cli("plugin-path").stdout.strip()
    assert os.path.isabs(out) and os.path.samefile(out, so)


def test_mount_dry_run_composes_the_command(tmp_path, so):
    b = TarBuilder()
    b.file("x", b"x")
    layer = build_layer(str(tmp_path), "x", b)
    out = cli("mount", "--dry-run", "--blob", layer.blob, "--lower", str(tmp_path),
              "--upper", str(tmp_path / "u"), "--work", str(tmp_path / "w"),
              "--state-dir", str(tmp_path / "state"), "--threaded", str(tmp_path / "m")).stdout
    argv = out.split()
    assert argv[0].endswith("fuse-overlayfs") and argv[-1] == str(tmp_path / "m")
    opts = argv[2].split(",")
    assert f"plugins={so}" in opts and "fast_ino=1" in opts and "threaded=1" in opts
    lowers = [o for o in opts if o.startswith("lowerdir=")][0][len("lowerdir="):].split(":")
    assert lowers[0].startswith("//stargz/") and "/" + str(tmp_path / "state") in lowers[0]
    assert lowers[1] == str(tmp_path)
    assert f"upperdir={tmp_path / 'u'}" in opts


def test_mount_refuses_fuse_overlayfs_2(tmp_path):
    fake = tmp_path / "fuse-overlayfs"
    fake.write_text("#!/bin/sh\necho 'fuse-overlayfs 2.0.0'\n")
    fake.chmod(0o755)
    r = cli("mount", "--dry-run", "--fuse-overlayfs", str(fake), "--lower", str(tmp_path),
            str(tmp_path / "m"), check=False)
    assert r.returncode == 1
    assert "fuse-overlayfs 2.0; plugin layers need fuse-overlayfs 1.x" in r.stderr
    assert "Traceback" not in r.stderr


def test_mount_really_mounts(tmp_path, so, config):
    b = TarBuilder()
    b.dir("etc")
    b.file("etc/motd", b"lazy hello\n")
    layer = build_layer(str(tmp_path), "m", b)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(str(mnt), [])
    try:
        cli("mount", "--config", config, "--blob", layer.blob, "--upper", str(tmp_path / "u"),
            "--work", str(tmp_path / "w"), "--state-dir", str(tmp_path / "state"), str(mnt))
        m.pids = _daemon_pids(str(mnt))
        assert os.path.ismount(mnt)
        assert (mnt / "etc/motd").read_bytes() == b"lazy hello\n"
        (mnt / "etc/new").write_bytes(b"w")
        assert (tmp_path / "u/etc/new").read_bytes() == b"w"
    finally:
        m.unmount()


def test_mount_reports_bad_layers(tmp_path, so):
    r = cli("mount", "--blob", str(tmp_path / "missing.blob"), str(tmp_path / "m"), check=False)
    assert r.returncode == 1 and "no such file" in r.stderr
    r = cli("mount", "--upper", str(tmp_path), "--blob", str(tmp_path), str(tmp_path / "m"),
            check=False)
    assert r.returncode == 1 and "go together" in r.stderr
