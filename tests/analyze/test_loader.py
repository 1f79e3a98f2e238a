"""Library search rules on hand-made ELF files: RPATH vs RUNPATH, LD_LIBRARY_PATH,
$ORIGIN, ld.so.conf includes, wrong-class libraries skipped, musl's path file."""

from stargz_overlay.analyze import analyze_image
from stargz_overlay.image_convert import open_endpoint

from ..imagefixture import tar_layer, write_layout
from .test_elf import make_elf

LD = "/lib64/ld-linux-x86-64.so.2"


def run(tmp_path, files, entrypoint, env=()):
    spec = write_layout(str(tmp_path / "img"), "t", [tar_layer(files)])
    result, = analyze_image(open_endpoint(spec), entrypoint=entrypoint, env=list(env),
                            note=lambda text: None)
    return result


def lib(*needed, **kw):
    return make_elf(interp=None, needed=needed, **kw)


def test_glibc_search_order(tmp_path):
    files = {
        "lib64/ld-linux-x86-64.so.2": lib(soname="ld-linux-x86-64.so.2"),
        "usr/bin/prog": make_elf(interp=LD, needed=("liba.so", "libb.so", "libconf.so",
                                                    "libmissing.so"), rpath="/rp"),
        "rp/liba.so": lib("libr.so", "libc.so.6", "ld-linux-x86-64.so.2",
                          runpath="$ORIGIN/sub"),
        "rp/sub/libr.so": lib("libq.so"),
        "rp/libq.so": lib(),
        "usr/lib/x86_64-linux-gnu/liba.so": lib(),               # shadowed by DT_RPATH
        "ldlp/libb.so": lib(bits=32),                            # wrong class: skipped
        "usr/lib/x86_64-linux-gnu/libb.so": lib(),
        "usr/lib/x86_64-linux-gnu/libc.so.6": lib(soname="libc.so.6"),
        "etc/ld.so.conf": b"include ld.so.conf.d/*.conf\n",
        "etc/ld.so.conf.d/a.conf": b"# comment\n/conf/dir   # trailing comment\n",
        "etc/ld.so.conf.d/skip.txt": b"/not/used\n",
        "conf/dir/libconf.so": lib(),
        "not/used/libmissing.so": lib(),
    }
    res = run(tmp_path, files, ["/usr/bin/prog"], env=["LD_LIBRARY_PATH=/ldlp"])
    reasons = {f.path: f.reason for f in res.files if f.kind == "file"}
    assert list(reasons) == ["/usr/bin/prog", "/lib64/ld-linux-x86-64.so.2", "/rp/liba.so",
                             "/usr/lib/x86_64-linux-gnu/libb.so", "/conf/dir/libconf.so",
                             "/rp/sub/libr.so", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                             "/rp/libq.so"]
    assert reasons["/rp/liba.so"].endswith("(found in /rp via DT_RPATH of /usr/bin/prog)")
    assert reasons["/usr/lib/x86_64-linux-gnu/libb.so"].endswith("via default library path)")
    assert reasons["/conf/dir/libconf.so"].endswith("via /etc/ld.so.conf.d/a.conf)")
    assert reasons["/rp/sub/libr.so"].endswith("via DT_RUNPATH of /rp/liba.so)")
    assert reasons["/rp/libq.so"].endswith("via DT_RPATH of /usr/bin/prog)")
    assert res.problems == ["libmissing.so (DT_NEEDED of /usr/bin/prog) is not in the image's "
                            "library search path"]


def test_runpath_hides_rpath(tmp_path):
    files = {
        "lib64/ld-linux-x86-64.so.2": lib(),
        "prog": make_elf(interp=LD, needed=("liba.so",), rpath="/rp", runpath="/run"),
        "rp/liba.so": lib(),
        "run/liba.so": lib(),
    }
    res = run(tmp_path, files, ["/prog"])
    assert [f.path for f in res.files if f.kind == "file"] == [
        "/prog", "/lib64/ld-linux-x86-64.so.2", "/run/liba.so"]


def test_musl_path_file_and_reserved_names(tmp_path):
    files = {
        "lib/ld-musl-x86_64.so.1": lib(soname="libc.musl-x86_64.so.1"),
        "lib/libc.musl-x86_64.so.1": ("symlink", "ld-musl-x86_64.so.1"),
        "bin/app": make_elf(interp="/lib/ld-musl-x86_64.so.1",
                            needed=("libfoo.so.1", "libc.musl-x86_64.so.1", "libpthread.so.0")),
        "etc/ld-musl-x86_64.path": b"/opt/lib\n/usr/lib\n",
        "opt/lib/libfoo.so.1": lib("libbar.so"),
        "lib/libfoo.so.1": lib(),                                # not on the path file's list
        "usr/lib/libbar.so": lib(),
    }
    res = run(tmp_path, files, ["/bin/app"])
    assert [f.path for f in res.files if f.kind == "file"] == [
        "/bin/app", "/lib/ld-musl-x86_64.so.1", "/etc/ld-musl-x86_64.path",
        "/opt/lib/libfoo.so.1", "/usr/lib/libbar.so"]
    assert res.problems == []
