"""The merged view through plugin layers equals the same layers as plain directories.

Both stacks (stargz L2 / plain L1 / stargz L0 + upper vs. tar-extracted L2 / L1 / L0 +
upper) are mounted by the same fuse-overlayfs with the same options, then compared
byte for byte and stat for stat, before and after the same writes, and after a remount.
"""

import errno
import os
import shutil
import subprocess
import time

import pytest

from .fusehelp import blob_spec, diff_snapshots, plugin_lower, snapshot
from .layers import build_layer
from ..format.tarbuild import TarBuilder

T = 1600000000


def layer0():
    big = os.urandom(200_000)
    b = TarBuilder()
    b.dir("etc", mtime=T, xattrs={"user.dirattr": b"1"})
    b.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime=T, xattrs={"user.test": b"v"})
    b.file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42, mtime=T)
    b.dir("home", mtime=T)
    b.dir("home/user", mode=0o700, uid=1000, gid=1000, mtime=T + 1,
          xattrs={"user.home": b"\x00\xffbin"})
    b.file("home/user/.bashrc", b"alias ll='ls -l'\n", uid=1000, gid=1000, mtime=T)
    b.dir("usr", mtime=T)
    b.dir("usr/bin", mtime=T)
    b.file("usr/bin/tool", big, mode=0o755, mtime=T, xattrs={"user.cap": b"\x01\x02"})
    b.file("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755, mtime=T)
    b.file("usr/bin/hl1", b"hardlinked content\n", mtime=T)
    b.hardlink("usr/bin/hl2", "usr/bin/hl1")
    b.dir("usr/sbin", mtime=T)
    b.hardlink("usr/sbin/hl3", "usr/bin/hl1")
    b.dir("usr/lib", mtime=T)
    b.file("usr/lib/libx.so.1", b"\x7fELF" + os.urandom(5000), mtime=T)
    b.symlink("usr/lib/libx.so", "libx.so.1", mtime=T)
    b.symlink("abs", "/etc/passwd", mtime=T)
    b.symlink("dangling", "nowhere/at/all", mtime=T)
    b.dir("dev", mtime=T)
    b.char("dev/null", 1, 3, mode=0o666, mtime=T)
    b.block("dev/sda", 8, 0, mode=0o660, gid=6, mtime=T)
    b.fifo("dev/fifo", mode=0o600, mtime=T)
    b.file("empty", b"", mtime=T)
    b.file("dup1", b"same bytes\n", mtime=T)
    b.file("dup2", b"same bytes\n", mode=0o600, mtime=T + 5)
    b.dir("opq", mtime=T)
    b.file("opq/a", b"a\n", mtime=T)
    b.file("opq/b", b"b\n", mtime=T)
    b.dir("xopq", mtime=T)
    b.file("xopq/c", b"c\n", mtime=T)
    b.dir("gone", mtime=T)
    b.file("gone/inner", b"inner\n", mtime=T)
    b.file("gonefile", b"bye\n", mtime=T)
    b.dir("renameme", mtime=T)
    b.file("renameme/r1", b"r1\n", mtime=T)
    b.dir("data", mtime=T)
    b.file("data/f", b"f\n", mtime=T)
    b.dir("tmp", mode=0o1777, mtime=T)
    b.file("\u00fc\u00f1\u00ed.txt", "unicode\n".encode(), mtime=T)
    b.file("n" * 200, b"long name\n", mtime=T)
    b.file("old", b"old\n", mtime=0)
    return b


def make_layer1(path):
    """The plain middle layer, written directly."""
    os.makedirs(os.path.join(path, "etc"))
    os.makedirs(os.path.join(path, "usr/lib"))
    os.makedirs(os.path.join(path, "opq"))
    os.makedirs(os.path.join(path, "mid"))
    files = {"etc/hostname": b"box\n", "usr/lib/libx.so.1": b"layer1 lib\n",
             "opq/c_l1": b"l1\n", "gonefile2": b"l1 bye\n", "mid/only": b"mid\n"}
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    for d in ("", "etc", "usr", "usr/lib", "opq", "mid"):
        os.utime(os.path.join(path, d), (T, T))
    for name in files:
        os.utime(os.path.join(path, name), (T, T))


def layer2():
    b = TarBuilder()
    b.file(".wh.gonefile", b"", mtime=T)
    b.file(".wh.gone", b"", mtime=T)
    b.file(".wh.gonefile2", b"", mtime=T)
    b.dir("opq", mtime=T + 2)
    b.file("opq/.wh..wh..opq", b"", mtime=T)
    b.file("opq/new", b"new\n", mtime=T)
    b.dir("xopq", mtime=T + 2, xattrs={"trusted.overlay.opaque": b"y"})
    b.file("xopq/d", b"d\n", mtime=T)
    b.dir("etc", mode=0o750, mtime=T + 3)
    b.file("etc/passwd", b"root:x:0:0::/root:/bin/bash\n", mode=0o600, mtime=T + 3)
    b.dir("dev", mtime=T)
    b.char("dev/sda", 0, 0, mtime=T)
    b.dir("top", mtime=T)
    b.file("top/t", b"top\n" * 1000, mtime=T)
    b.symlink("top/up", "../usr/bin/tool", mtime=T)
    return b


@pytest.fixture
def stacks(tmp_path, so, config, mounts):
    l0 = build_layer(str(tmp_path), "l0", layer0())
    l2 = build_layer(str(tmp_path), "l2", layer2())
    l1 = str(tmp_path / "l1.plain")
    make_layer1(l1)
    plug = mounts(tmp_path / "p.mnt",
                  [plugin_lower(blob_spec(l2.blob, config, l2.result.toc_digest), tmp_path / "p.l2"),
                   l1,
                   plugin_lower(blob_spec(l0.blob, config, l0.result.toc_digest), tmp_path / "p.l0")],
                  tmp_path / "p.upper", tmp_path / "p.work", so=so)
    ref = mounts(tmp_path / "r.mnt", [l2.plain, l1, l0.plain],
                 tmp_path / "r.upper", tmp_path / "r.work")
    plug.mount()
    ref.mount()
    return plug, ref


def compare(a, b, **kw):
    diffs = diff_snapshots(snapshot(a, **kw), snapshot(b, **kw))
    assert not diffs, "\n".join(diffs)


def ops(root):
    """The same writes on each mount; returns the outcome of each (ok or errno name)."""
    p = lambda *n: os.path.join(root, *n)   # noqa: E731

    def append(name, data):
        with open(p(name), "ab") as f:
            f.write(data)

    steps = [
        ("append L2 file", lambda: append("etc/passwd", b"more\n")),
        ("append xattr file", lambda: append("usr/bin/tool", b"tail")),
        ("chmod", lambda: os.chmod(p("usr/bin/suid"), 0o700)),
        ("chown", lambda: os.chown(p("etc/shadow"), 123, 456)),
        ("create in 0700 dir", lambda: open(p("home/user/new"), "wb").close()),
        ("rm symlink", lambda: os.unlink(p("usr/lib/libx.so"))),
        ("rm empty", lambda: os.unlink(p("empty"))),
        ("rm -r dir", lambda: shutil.rmtree(p("data"))),
        ("rename L1 file", lambda: os.rename(p("etc/hostname"), p("etc/hostname2"))),
        ("rm renameme/r1", lambda: os.unlink(p("renameme/r1"))),
        ("mkdir src", lambda: os.mkdir(p("src"))),
        ("write src/x", lambda: open(p("src/x"), "wb").write(b"x\n")),
        ("mv -T dir over lower dir",
         lambda: subprocess.run(["mv", "-T", p("src"), p("renameme")], check=True,
                                capture_output=True)),
        ("setxattr L1 file", lambda: os.setxattr(p("usr/lib/libx.so.1"), "user.new", b"1")),
        ("setxattr L0 file", lambda: os.setxattr(p("etc/shadow"), "user.new", b"2")),
        ("hardlink lower file", lambda: os.link(p("usr/bin/hl1"), p("usr/bin/hl4"))),
        ("truncate", lambda: os.truncate(p("dup1"), 3)),
        ("mkdir whited-out name", lambda: os.mkdir(p("gone"))),
        ("create in it", lambda: open(p("gone/x"), "wb").close()),
        ("replace symlink", lambda: (os.unlink(p("abs")), os.symlink("/x", p("abs")))),
        ("unlink one hardlink", lambda: os.unlink(p("usr/sbin/hl3"))),
        ("rename lower dir", lambda: os.rename(p("home/user"), p("home/user2"))),
        ("rename lower file across dirs", lambda: os.rename(p("dup2"), p("tmp/dup2"))),
        ("rmdir non-empty lower", lambda: os.rmdir(p("usr/bin"))),
        ("rm fifo", lambda: os.unlink(p("dev/fifo"))),
        ("chmod lower dir", lambda: os.chmod(p("xopq"), 0o711)),
        ("write into opaque dir", lambda: open(p("opq/w"), "wb").write(b"w")),
    ]
    outcome = []
    for name, fn in steps:
        try:
            fn()
            outcome.append((name, "ok"))
        except OSError as exc:
            outcome.append((name, errno.errorcode.get(exc.errno, str(exc.errno))))
        except subprocess.CalledProcessError as exc:
            outcome.append((name, f"exit {exc.returncode}: {exc.stderr.strip()[-60:]!r}"))
    return outcome


def test_merged_view_matches_plain_dirs(stacks):
    plug, ref = stacks
    compare(plug.mnt, ref.mnt)


def test_writes_match_plain_dirs(stacks):
    plug, ref = stacks
    compare(plug.mnt, ref.mnt)        # loads every directory and file first
    # file times come from the kernel's coarse clock, up to a tick behind time.time()
    started = int(time.time()) - 1
    out_plug = ops(plug.mnt)
    out_ref = ops(ref.mnt)
    assert out_plug == out_ref
    assert ("mv -T dir over lower dir", "ok") in out_plug
    compare(plug.mnt, ref.mnt, dir_mtimes=False, written_since=started)
    compare(plug.upper, ref.upper, mtimes=False)
    for m in (plug, ref):
        m.unmount()
        m.mount()
    compare(plug.mnt, ref.mnt, dir_mtimes=False, written_since=started)


def test_same_layer_whiteout_does_not_hide_its_own_name(tmp_path, so, config, mounts):
    b = TarBuilder()
    b.file("both", b"kept\n")
    b.file(".wh.both", b"")
    b.file(".wh.lower", b"")
    layer = build_layer(str(tmp_path), "wh", b)
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "lower").write_bytes(b"hidden\n")
    (lower / "both").write_bytes(b"lower both\n")
    m = mounts(tmp_path / "mnt", [plugin_lower(blob_spec(layer.blob, config), tmp_path / "w"),
                                  str(lower)], so=so)
    m.mount()
    assert sorted(os.listdir(m.mnt)) == ["both"]
    assert open(os.path.join(m.mnt, "both"), "rb").read() == b"kept\n"
