"""Layer paths whose skeleton path exceeds PATH_MAX (a tar name may have 4095 bytes).

LayerView materialises such directories one component at a time, relative to
directory fds: they open, carry the layer's metadata, list their children, and
no fd is left open; a symlink planted in the skeleton is never followed.
"""

import errno
import io
import os
import stat

import pytest

from stargz_overlay.cache import ContentCache
from stargz_overlay.layer_view import LayerView
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource
from stargz_overlay.writer import convert

from ..format.tarbuild import TarBuilder

PARTS = ["d%02d" % i + "n" * 251 for i in range(15)] + ["s" * 200]
DEEP = "/".join(PARTS)                   # 4040 bytes: with the tree's path, beyond PATH_MAX
LEAF = "f" * 54
LONGEST = DEEP + "/" + LEAF              # 4095 bytes: the tar limit


def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def view(tmp_path):
    b = TarBuilder()
    for depth in range(1, len(PARTS)):
        b.dir("/".join(PARTS[:depth]))
    b.dir(DEEP, mode=0o751, uid=7, gid=8, mtime=1234567, xattrs={"user.deep": b"yes"})
    b.file(LONGEST, b"the longest", mode=0o640)
    b.symlink(DEEP + "/link", LEAF)
    b.dir(DEEP + "/sub")
    b.file("short/file", b"short")
    out = io.BytesIO()
    convert(io.BytesIO(b.bytes()), out)
    blob = tmp_path / "b.blob"
    blob.write_bytes(out.getvalue())
    view = LayerView(StargzReader(FileSource(str(blob))), str(tmp_path / "w"),
                     ContentCache(str(tmp_path / "cache")), 1, "t")
    assert len(os.fsencode(os.path.join(view.tree, DEEP))) >= 4096
    yield view
    view.close()
    assert not os.path.exists(tmp_path / "w" / "tree")


def test_a_directory_beyond_path_max_is_materialised(view):
    before = open_fds()
    fd = view.open_dir(DEEP)             # its 14 parents are materialised on the way
    try:
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o751, 7, 8)
        assert st.st_mtime == 1234567
        assert os.getxattr(fd, "user.deep") == b"yes"
        assert sorted(os.listdir(fd)) == sorted([LEAF, "link", "sub"])
    finally:
        os.close(fd)
    for path in (DEEP + "/sub", DEEP, "", "short"):        # made, and made later
        os.close(view.open_dir(path))
    fd = view.open(DEEP + "/link", os.O_RDONLY)            # symlink followed in the TOC
    try:
        assert os.read(fd, 100) == b"the longest"
    finally:
        os.close(fd)
    assert open_fds() == before


def test_errors_beyond_path_max_leave_no_fd(view):
    before = open_fds()
    for path, code in ((LONGEST, errno.ENOTDIR), (DEEP + "/none", errno.ENOENT)):
        with pytest.raises(OSError) as exc:
            view.open_dir(path)
        assert exc.value.errno == code
    with pytest.raises(OSError) as exc:
        view.open(LONGEST, os.O_RDONLY | os.O_DIRECTORY)
    assert exc.value.errno == errno.ENOTDIR
    assert open_fds() == before


def test_a_symlink_planted_in_the_skeleton_is_not_followed(view, tmp_path):
    os.close(view.open_dir(DEEP))
    outside = tmp_path / "outside"
    (outside / PARTS[14] / PARTS[15]).mkdir(parents=True)
    # replace the 14th directory by a symlink to a directory outside the layer
    fd = view._open_skeleton("/".join(PARTS[:13]))
    try:
        os.rename(PARTS[13], "moved", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink(str(outside), PARTS[13], dir_fd=fd)
    finally:
        os.close(fd)
    before = open_fds()
    with pytest.raises(OSError) as exc:
        view.open_dir(DEEP)
    assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert open_fds() == before
