"""The merged image view: whiteouts, opaque dirs, symlinks kept inside the root, loops,
hardlinks, layer provenance; the same answers from plain gzip and from eStargz layers."""

import io
import tarfile

import pytest

from stargz_overlay.errors import StargzError
from stargz_overlay.image_convert import ConvertOptions, ImageConverter, open_endpoint
from stargz_overlay.image_fs import LayerOpener, image_manifests

from ..imagefixture import write_layout

PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
LIBFOO = b"\x7fELF pretend library" * 100


def tar(entries):
    """``[(name, kind, payload)]`` -> tar bytes; kinds: reg, dir, sym, link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, payload
                t.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, payload
                t.addfile(info)
            else:
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


LAYERS = [
    tar([("etc", "dir", None), ("etc/passwd", "reg", PASSWD),
         ("usr/lib/libfoo.so", "reg", LIBFOO), ("usr/lib/libfoo-hl.so", "link", "usr/lib/libfoo.so"),
         ("lib64", "sym", "usr/lib"), ("loop1", "sym", "loop2"), ("loop2", "sym", "/loop1"),
         ("escape", "sym", "../../../../etc/passwd"), ("abs", "sym", "/usr/lib/libfoo.so"),
         ("chain", "sym", "lib64/../lib/libfoo.so"), ("nochain", "sym", "lib64/../lib64/x"),
         ("dir/a", "reg", b"a"), ("dir/b", "reg", b"b"),
         ("opq/x", "reg", b"x"), ("opq/y", "reg", b"y"),
         ("tofile/child", "reg", b"c"), ("todir", "reg", b"was a file"),
         ("x/old", "reg", b"old"), ("empty", "sym", "")]),
    tar([("dir/.wh.a", "reg", b""), ("opq/.wh..wh..opq", "reg", b""), ("opq/z", "reg", b"z"),
         ("tofile", "reg", b"now a file"), ("todir/child", "reg", b"new child"),
         ("x", "reg", b"x is a file here"), ("usr/lib/libbar.so", "reg", b"bar")]),
    tar([("x/new", "reg", b"new"), ("dir/c", "reg", b"c")]),
]


@pytest.fixture(scope="module", params=["gzip", "estargz"])
def fs(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fs-{request.param}")
    spec = write_layout(str(tmp / "src"), "v1", LAYERS)
    if request.param == "estargz":
        dst = f"oci:{tmp / 'esgz'}:v1"
        ImageConverter(open_endpoint(spec), open_endpoint(dst, create=True),
                       ConvertOptions(chunk_size=512)).run()
        spec = dst
    endpoint = open_endpoint(spec)
    notes = []
    opener = LayerOpener(endpoint, note=notes.append)
    (_, manifest), = image_manifests(endpoint)
    image = opener.open(manifest)
    kinds = {layer.kind for layer in image.layers}
    assert kinds == ({"estargz"} if request.param == "estargz" else {"gzip"})
    assert bool(notes) == (request.param == "gzip")       # downloads are announced
    yield image
    opener.close()


def test_symlinks_resolve_inside_the_image(fs):
    node = fs.resolve("/lib64/libfoo.so")
    assert node.path == "/usr/lib/libfoo.so" and node.layer.index == 0
    assert node.via == (("/lib64", 0),)
    assert fs.read(node) == LIBFOO
    assert fs.read(node, 5, 4) == LIBFOO[5:9]
    assert fs.resolve("/escape").path == "/etc/passwd"          # .. stops at the root
    assert fs.resolve("/usr/../../../../etc/passwd").path == "/etc/passwd"
    assert fs.resolve("/chain").path == "/usr/lib/libfoo.so"      # .. after a link: physical
    assert fs.lookup("/nochain") is None                          # (/usr/lib64 does not exist)
    assert fs.resolve("/abs", follow=False).type == "symlink"
    assert fs.resolve("/abs").type == "reg"
    assert fs.read("/usr/lib/libfoo-hl.so") == LIBFOO           # hardlink
    assert fs.resolve("/").type == "dir"
    assert fs.lookup("/empty") is None
    assert fs.lookup("/etc/passwd/x") is None                   # a file used as a dir


def test_symlink_loops_are_bounded(fs):
    with pytest.raises(StargzError, match="too many levels of symbolic links"):
        fs.resolve("/loop1")
    assert fs.lookup("/loop1/x") is None


def test_whiteouts_and_opaque_directories(fs):
    assert fs.lookup("/dir/a") is None
    assert fs.listdir("/dir") == ["b", "c"]
    assert fs.lookup("/dir/b").layer.index == 0 and fs.lookup("/dir/c").layer.index == 2
    assert fs.listdir("/opq") == ["z"]
    assert fs.lookup("/opq/x") is None
    assert fs.read("/tofile") == b"now a file"                   # dir replaced by a file
    assert fs.lookup("/tofile/child") is None
    assert fs.read("/todir/child") == b"new child"               # file replaced by a dir
    assert fs.listdir("/x") == ["new"]                           # file in between hides x/old
    assert fs.lookup("/x/old") is None
    assert fs.listdir("/usr/lib") == ["libbar.so", "libfoo-hl.so", "libfoo.so"]
    assert fs.lookup("/usr/lib/libbar.so").layer.index == 1
    assert not any(n.startswith(".wh.") for n in fs.listdir("/opq") + fs.listdir("/dir"))
