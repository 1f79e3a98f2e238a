"""The GCC rule on the benchmark's real gcc image (this machine's Debian gcc-12),
checked against what the same compile on this machine opens (strace)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from stargz_overlay.analyze import analyze_image
from stargz_overlay.analyze_gcc import is_driver, linker_script_inputs
from stargz_overlay.image_convert import open_endpoint
from stargz_overlay.image_fs import LayerOpener, image_manifests

from ..plugin.fusehelp import REPO

sys.path.insert(0, os.path.join(REPO, "contrib"))
import images  # noqa: E402

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TRACED = re.compile(r'(?:open|openat|execve)\((?:AT_FDCWD, |-?\d+, )?"([^"]+)"')


@pytest.fixture(scope="module")
def gcc_image(tmp_path_factory):
    """``(oci:DIR:TAG, the image's command)`` of contrib/images.py's gcc image."""
    for package in images.WORKLOAD_PACKAGES["gcc"]:
        if not images.installed(package):
            pytest.skip(f"Debian package {package} is not installed: the gcc image is made "
                        f"of this machine's own gcc")
    spec = images.build("gcc", str(tmp_path_factory.mktemp("gccimg") / "layout"))
    return spec


def analyze(spec, args=None):
    (result,) = analyze_image(open_endpoint(spec), args=args, note=lambda text: None)
    return result


def files(result):
    return {f.path for f in result.files if f.kind == "file"}


def image_file(fs, host_path):
    """The image's regular file for a path the host opened.  The host is merged-/usr
    but the image keeps each package's own paths (/lib/... or /usr/lib/...)."""
    for path in (os.path.normpath(host_path), os.path.realpath(host_path)):
        for variant in (path, "/usr" + path, path[4:] if path.startswith("/usr/") else path):
            node = fs.lookup(variant)
            if node is not None and node.type == "reg":
                return node
    return None


def test_driver_names():
    for name in ("gcc", "cc", "g++", "c++", "gcc-12", "g++-12", "x86_64-linux-gnu-gcc-12",
                 "aarch64-linux-gnu-g++", "gcc-12.2"):
        assert is_driver(name), name
    for name in ("gcc-ar", "gcc-ar-12", "gcc-nm-12", "cc1", "cc1plus", "distcc", "ccache",
                 "x86_64-linux-gnu-gcc-ranlib-12", "cpp", "clang"):
        assert not is_driver(name), name


def test_linker_scripts():
    libc = ("/* GNU ld script\n   Use the shared library (GROUP here is a comment) */\n"
            "OUTPUT_FORMAT(elf64-x86-64)\nGROUP ( /lib/x86_64-linux-gnu/libc.so.6 "
            "/usr/lib/x86_64-linux-gnu/libc_nonshared.a  AS_NEEDED ( "
            "/lib64/ld-linux-x86-64.so.2 ) )\n")
    assert linker_script_inputs(libc) == ["/lib/x86_64-linux-gnu/libc.so.6",
                                          "/usr/lib/x86_64-linux-gnu/libc_nonshared.a",
                                          "/lib64/ld-linux-x86-64.so.2"]
    assert linker_script_inputs("GROUP ( libgcc_s.so.1 -lgcc )\nINPUT(a.o,b.o)") == \
        ["libgcc_s.so.1", "-lgcc", "a.o", "b.o"]


def test_the_benchmark_compile(gcc_image):
    res = analyze(gcc_image)
    found = files(res)
    lib = next(p for p in found if p.endswith("/cc1"))
    gcc_dir = os.path.dirname(lib)
    assert re.fullmatch(r"/usr/(lib|libexec)/gcc/[^/]+/\d+(\.\d+)*", gcc_dir), gcc_dir
    for name in ("collect2", "liblto_plugin.so", "crtbeginS.o", "crtendS.o", "libgcc.a",
                 "libgcc_s.so", "include/stddef.h"):
        assert f"{gcc_dir}/{name}" in found, name
    assert "cc1plus" not in " ".join(found) and "lto-wrapper" not in " ".join(found)
    basenames = {os.path.basename(p) for p in found}
    for name in ("crti.o", "crtn.o", "libc.so", "libc.so.6", "libc_nonshared.a",
                 "libgcc_s.so.1", "stdc-predef.h", "stdio.h", "features.h", "FILE.h",
                 "libisl.so.23.2.0" if os.path.exists("/usr/lib/x86_64-linux-gnu/libisl.so.23")
                 else "stdio.h"):
        assert name in basenames, name
    assert basenames & {"crt1.o", "Scrt1.o"}
    # as and ld resolved through their symlinks, with their own libraries
    links = {f.path: f.reason for f in res.files if f.kind == "symlink"}
    assert "/usr/bin/as" in links and "/usr/bin/ld" in links
    ld = links["/usr/bin/ld"].rpartition(" ")[2]
    while ld in links:
        ld = links[ld].rpartition(" ")[2]
    assert ld in found and os.path.basename(ld).endswith(("-ld", "ld.bfd")), ld
    assert any(f.reason.startswith("DT_NEEDED ") and f" of {ld} (" in f.reason
               for f in res.files), "ld's libraries"
    # stdio.h's includes come after it and name it
    order = [f.path for f in res.files]
    stdio = next(p for p in order if p.endswith("/include/stdio.h"))
    assert any(f.reason == f"header #included by {stdio} (gcc)" for f in res.files)
    assert order.index(stdio) < order.index(next(p for p in order if p.endswith("/FILE.h")))
    # the headers come from the text printf wrote; that file is not a command
    assert any(f.reason == "header #included by /tmp/h.c (written by the command) (gcc)"
               for f in res.files)
    assert not any("h.c" in p for p in res.problems), res.problems


def test_covers_what_the_real_compile_opens(gcc_image, tmp_path):
    """>= 90% of the bytes a real `gcc` compile of the same command opens (of the files
    the image has) are inferred, and what is inferred beyond it stays small."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (it gives the real compile's file opens)")
    endpoint = open_endpoint(gcc_image)
    with LayerOpener(endpoint, note=lambda text: None) as opener:
        (_, manifest), = image_manifests(endpoint)
        fs = opener.open(manifest)
        res = analyze(gcc_image)
        (command,) = [a for a in res.argv if "gcc " in a]
        command = command.replace("/tmp/", f"{tmp_path}/")
        trace = tmp_path / "trace"
        subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e",
                        "trace=open,openat,execve", "/bin/sh", "-c", command],
                       check=True, cwd=tmp_path, env={"PATH": PATH}, capture_output=True)
        opened = {}
        for line in trace.read_text().splitlines():
            m = TRACED.search(line)
            if m is None or m.group(1).startswith(str(tmp_path)) or \
                    not os.path.isfile(m.group(1)):
                continue
            node = image_file(fs, m.group(1))
            if node is not None:
                opened[node.path] = node.size
        inferred = {}
        for path in files(res):
            inferred[path] = fs.lookup(path).size
    assert len(opened) > 40, sorted(opened)
    needed = sum(opened.values())
    missed = {p: s for p, s in opened.items() if p not in inferred}
    extra = {p: s for p, s in inferred.items() if p not in opened}
    print(f"real compile opens {len(opened)} files / {needed} bytes of the image; "
          f"missed {len(missed)} / {sum(missed.values())} bytes: {sorted(missed)}; "
          f"inferred beyond it {len(extra)} / {sum(extra.values())} bytes: {sorted(extra)}")
    assert sum(missed.values()) <= 0.10 * needed, sorted(missed)
    assert sum(extra.values()) <= 0.10 * needed, sorted(extra)


def test_stages_follow_the_options(gcc_image):
    only_compile = files(analyze(gcc_image, ["gcc", "-c", "-I/opt/inc", "/src/x.c"]))
    assert any(p.endswith("/cc1") for p in only_compile)
    assert any(p.endswith("-as") for p in only_compile)          # x86_64-linux-gnu-as
    assert not any(p.endswith(("/collect2", "crti.o", "libc.so")) for p in only_compile)
    assert any(p.endswith("/stdio.h") for p in only_compile)      # text unseen: stdio.h
    link_only = files(analyze(gcc_image, ["gcc", "-o", "/tmp/p", "/tmp/p.o", "-lm"]))
    assert not any(p.endswith(("/cc1", "/stdio.h")) for p in link_only)
    assert any(p.endswith("/collect2") for p in link_only)
    assert any(os.path.basename(p) in ("libm.so", "libm.so.6") for p in link_only)
    written = analyze(gcc_image, ["/bin/sh", "-c", "printf '#include <math.h>\\nint main(void)"
                                                   "{return 0;}\\n' > m.c && cc -c m.c"])
    names = {os.path.basename(p) for p in files(written)}
    assert "math.h" in names and "stdio.h" not in names and "crti.o" not in names
    version = analyze(gcc_image, ["gcc", "--version"])
    assert not any("/usr/lib/gcc/" in p for p in files(version))
    assert any(p.endswith("gcc-12") for p in files(version))


def test_other_commands_are_unaffected(gcc_image):
    res = analyze(gcc_image, ["/bin/sh", "-c", "printf '#include <stdio.h>\\n' > /tmp/a.c "
                                               "&& ls /tmp >/dev/null 2>&1; cat /tmp/a.c"])
    found = files(res)
    assert any(p.endswith("/ls") for p in found) and any(p.endswith("/cat") for p in found)
    assert not any("/gcc" in p or p.startswith("/usr/include") for p in found), sorted(found)
    assert not any("gcc" in f.reason for f in res.files)
    assert not res.problems, res.problems
