"""The plugin ABI against the real /usr/bin/fuse-overlayfs 1.x binary.

If a slot of ``struct data_source`` or a field of ``struct ovl_layer`` were
misplaced, fuse-overlayfs would call the wrong callback or read the wrong
field: these tests check that each callback is reached with the arguments the
ABI describes and that its answers arrive intact (inode numbers, l->fd used
by statfs, per-layer private data).
"""

import os
import re
import shutil
import subprocess

import pytest

from stargz_overlay.layer_spec import LayerSpec, encode
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource

from .fusehelp import blob_spec, plugin_lower, write_config
from .layers import build_layer
from ..format.tarbuild import TarBuilder

INO_BASE = 1 << 40


def small_tree(tag):
    b = TarBuilder()
    b.dir("dir", mode=0o750)
    b.file("dir/file", f"content of {tag}\n".encode(), xattrs={"user.tag": tag.encode()})
    b.symlink("link", "dir/file")
    b.file(f"only-{tag}", tag.encode())
    return b


def toc_inodes(blob):
    with FileSource(blob) as src:
        toc = StargzReader(src).toc
    return {name: entry.ino for name, entry in toc.walk()}


def test_exports_exactly_the_plugin_symbols(so):
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True,
                         check=True).stdout
    symbols = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert {"plugin_version", "plugin_name", "plugin_load", "plugin_release"} <= symbols
    assert symbols - {"plugin_version", "plugin_name", "plugin_load", "plugin_release"} \
        <= {"PyInit__stargz_plugin"}


def test_callbacks_reached_with_abi_arguments(tmp_path, so, config, mounts, log_of):
    a = build_layer(str(tmp_path), "a", small_tree("a"))
    b = build_layer(str(tmp_path), "b", small_tree("b"))
    spec_a = blob_spec(a.blob, config, a.result.toc_digest)
    spec_b = blob_spec(b.blob, config)
    m = mounts(tmp_path / "mnt", [plugin_lower(spec_a, tmp_path / "la"),
                                  plugin_lower(spec_b, tmp_path / "lb")], so=so)
    m.mount()
    mnt = m.mnt
    # no upperdir: statfs goes to the first layer's l->fd (ovl_layer +32)
    st = os.statvfs(mnt)
    ref = os.statvfs(tmp_path / "la")
    assert (st.f_bsize, st.f_blocks) == (ref.f_bsize, ref.f_blocks)
    # statat/readdir answers arrive intact; each layer (private data, +40) keeps its range
    ino_a, ino_b = toc_inodes(a.blob), toc_inodes(b.blob)
    assert os.lstat(f"{mnt}/dir/file").st_ino == INO_BASE + ino_a["dir/file"]
    assert os.lstat(f"{mnt}/only-b").st_ino == INO_BASE + (1 << 32) + ino_b["only-b"]
    assert {e.name: e.inode() for e in os.scandir(mnt)}["only-a"] == INO_BASE + ino_a["only-a"]
    assert os.stat(f"{mnt}/dir").st_mode & 0o7777 == 0o750
    assert open(f"{mnt}/only-b", "rb").read() == b"b"
    assert open(f"{mnt}/link", "rb").read() == b"content of a\n"
    assert os.readlink(f"{mnt}/link") == "dir/file"
    assert os.getxattr(f"{mnt}/dir/file", "user.tag") == b"a"
    assert os.listxattr(f"{mnt}/dir/file") == ["user.tag"]
    with pytest.raises(OSError) as exc:
        os.getxattr(f"{mnt}/dir/file", "user.missing")
    assert exc.value.errno == 61              # ENODATA
    with pytest.raises(OSError) as exc:
        open(f"{mnt}/new", "wb")
    assert exc.value.errno == 30              # EROFS: no upper layer
    m.unmount()

    log = log_of()
    calls = re.findall(r"call (\w+)\((.*)\) -> (.*)", log)
    names = [c[0] for c in calls]
    data_a, path_a = encode(spec_a), os.fsencode(str(tmp_path / "la"))
    assert ("num_of_layers", f"{data_a.encode()!r}, {path_a!r}", "1") in calls
    assert ("load_data_source", f"ptr, {data_a.encode()!r}, {path_a!r}, 0", "0") in calls
    statats = [c for c in calls if c[0] == "statat"]
    assert statats and all(c[1].split(", ")[3] == "256" for c in statats)  # AT_SYMLINK_NOFOLLOW
    assert any(c[0] == "getxattr" and "b'user.tag'" in c[1] for c in calls)
    assert any(c[0] == "readlinkat" and c[1].startswith("ptr, b'link'") for c in calls)
    assert any(c[0] == "opendir" for c in calls) and "readdir" in names
    assert "closedir" in names and "file_exists" in names and "openat" in names
    assert names.count("cleanup") == 2
    assert log.count("plugin released") == 1


@pytest.mark.parametrize("case", ["bad-data", "unknown-kind", "missing-blob", "not-stargz",
                                  "wrong-toc", "bad-config", "no-path", "busy-dir"])
def test_load_failure_fails_the_mount_with_one_clear_message(tmp_path, so, config, mounts,
                                                             case):
    good = build_layer(str(tmp_path), "good", small_tree("g"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(5000))
    work = str(tmp_path / "w")
    expected = {
        "bad-data": "is not base64url text",
        "unknown-kind": "unknown layer kind",
        "missing-blob": "cannot open",
        "not-stargz": "not a stargz/eStargz blob",
        "wrong-toc": "TOC digest is",
        "bad-config": "unknown key",
        "no-path": "needs a directory after DATA",
        "busy-dir": "in use by another mount",
    }[case]
    if case == "bad-data":
        lower = f"//stargz/not*base64/{work}"
    elif case == "unknown-kind":
        import base64
        data = base64.urlsafe_b64encode(b'{"kind":"ftp"}').decode().rstrip("=")
        lower = f"//stargz/{data}/{work}"
    elif case == "missing-blob":
        lower = plugin_lower(blob_spec(tmp_path / "nope.blob", config), work)
    elif case == "not-stargz":
        lower = plugin_lower(blob_spec(junk, config), work)
    elif case == "wrong-toc":
        lower = plugin_lower(blob_spec(good.blob, config, "sha256:" + "0" * 64), work)
    elif case == "bad-config":
        bad = write_config(tmp_path / "bad.toml", str(tmp_path / "c"), str(tmp_path / "l.log"),
                           cache_size="1G")
        lower = plugin_lower(blob_spec(good.blob, bad), work)
    elif case == "no-path":
        lower = f"//stargz/{encode(blob_spec(good.blob, config))}/"
    else:                 # the same layer directory twice in one mount
        lower = plugin_lower(blob_spec(good.blob, config), work)
        lower = f"{lower}:{lower}"
    m = mounts(tmp_path / "mnt", [lower], so=so)
    result = m.mount(check=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("stargz-overlay:")]
    assert len(ours) == 1 and expected in ours[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not m.mounted


def test_registry_spec_round_trip_has_no_forbidden_characters():
    spec = LayerSpec("registry", ref="127.0.0.1:5000/a/b:tag", digest="sha256:" + "a" * 64,
                     toc="sha256:" + "b" * 64, size=12345, config="/etc/x,y:z.toml")
    data = encode(spec)
    assert not set(data) & set("/:,=")
    from stargz_overlay.layer_spec import decode
    assert decode(data) == spec


def test_without_fast_ino_fstat_gives_the_statat_identity(tmp_path, so, config, mounts, log_of):
    a = build_layer(str(tmp_path), "a", small_tree("a"))
    m = mounts(tmp_path / "mnt", [plugin_lower(blob_spec(a.blob, config), tmp_path / "la")],
               tmp_path / "up", tmp_path / "wk", so=so, fast_ino=False)
    m.mount()
    inos = toc_inodes(a.blob)
    for name in ("dir", "dir/file", "only-a", "link"):
        assert os.lstat(f"{m.mnt}/{name}").st_ino == INO_BASE + inos[name]
    assert open(f"{m.mnt}/dir/file", "rb").read() == b"content of a\n"
    calls = re.findall(r"call (\w+)\((.*)\) -> (.*)", log_of())
    fstats = [c for c in calls if c[0] == "fstat"]
    assert fstats and all(c[2] == "0" for c in fstats)
    # the inode probe: openat(O_RDONLY|O_NONBLOCK|O_NOFOLLOW) fails with ELOOP on the symlink
    assert any(c[0] == "openat" and c[1].startswith("ptr, b'link'") and c[2] == "ELOOP"
               for c in calls)
