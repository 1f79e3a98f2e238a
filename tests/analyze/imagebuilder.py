"""A two-layer test image made of this machine's real python3.11, its libraries
and a slice of its standard library, laid out as an OCI image.

Layer 0 is a merged-/usr base (``/lib -> usr/lib``, ``/lib64 -> usr/lib64``,
the host's own symlink chain to ld.so) holding the interpreter, the libraries
``ldd`` names, a slice of ``/usr/lib/python3.11`` with its ``__pycache__``
(source mtimes kept, so the .pyc files stay valid), decoy modules, two hostile
ELF files placed first in the library search path, a ``.pth`` file and an
``/app`` that the upper layer hides.  Layer 1 whites out that ``.pth``, makes
``/app`` opaque and ships the application, a rewritten ``encodings/aliases.py``
(its old .pyc no longer valid) and, when gcc exists, a small program with a
``$ORIGIN`` RUNPATH.
"""

import ast
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import tarfile

import pytest

PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
DYNLOAD = f"{STDLIB}/lib-dynload"
TAG = "cpython-311"
JSON_EXT = f"{DYNLOAD}/_json.cpython-311-x86_64-linux-gnu.so"
SSL_EXT = f"{DYNLOAD}/_ssl.cpython-311-x86_64-linux-gnu.so"
# frozen in 3.11 (present as sources, never read) and decoys nobody imports at startup
FROZEN_SOURCES = ["os", "site", "stat", "posixpath", "genericpath", "abc", "codecs", "io",
                  "_collections_abc", "_sitebuiltins", "ntpath", "runpy", "zipimport"]
DECOYS = ["warnings", "decimal", "_pydecimal", "typing", "copy", "weakref", "string",
          "locale", "contextlib", "textwrap", "collections/abc", "encodings/latin_1",
          "encodings/cp1252", "json/tool", "importlib/__init__", "importlib/util",
          "importlib/machinery", "importlib/_abc", "sre_compile", "sre_parse"]
DIST = "usr/local/lib/python3.11/dist-packages"
# python3.11 -S ARGS -> code that imports the same modules at top level only
PROBES = {"-c import json": "import json",
          "-m json.tool": "import runpy; runpy.run_module('json.tool')"}

DEMO_MAIN = r"""
#include <stdio.h>
double demo_value(double x);
int main(int argc, char **argv) { printf("%f\n", demo_value(argc)); return 0; }
"""
DEMO_LIB = r"""
#include <math.h>
double demo_value(double x) { return sqrt(x) * cbrt(x); }
"""

MAIN_PY = b"""import json
import mylib
from helper import greet as _greet
try:
    import not_installed_anywhere
except ImportError:
    import fallback_mod

def later():
    import decoy_lazy        # runs only when called: not a startup import

if __name__ == "__main__":
    print(_greet(json.dumps([1])))
"""


def require_host():
    for path in (PYTHON, STDLIB, JSON_EXT):
        if not os.path.exists(path):
            pytest.skip(f"{path} is missing: these tests copy the host's Debian python3.11")
    if shutil.which("ldd") is None:
        pytest.skip("ldd is not installed (it gives the expected libraries)")


def ldd(path):
    """Absolute paths (as ldd prints them) of the libraries ``path`` loads, ld.so included."""
    out = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
    return libs


class Tree:
    """Files of one layer: name -> (kind, payload, mode, mtime)."""

    def __init__(self):
        self.entries = {}

    def dir(self, name):
        self.entries[name.strip("/")] = ("dir", None, 0o755, 1700000000)

    def file(self, name, data, mode=0o644, mtime=1700000000):
        self.entries[name.strip("/")] = ("reg", data, mode, int(mtime))

    def symlink(self, name, target):
        self.entries[name.strip("/")] = ("symlink", target, 0o777, 1700000000)

    def host(self, path, as_name=None):
        """Copy a host path, recreating every symlink met on the way."""
        path = os.path.abspath(path)
        parts = path.strip("/").split("/")
        current = ""
        for i, part in enumerate(parts):
            current = f"{current}/{part}"
            if os.path.islink(current):
                target = os.readlink(current)
                if as_name is None:
                    self.symlink(current, target)
                rest = "/".join(parts[i + 1:])
                resolved = os.path.normpath(os.path.join(os.path.dirname(current), target))
                return self.host(os.path.join(resolved, rest) if rest else resolved, as_name)
        st = os.stat(path)
        with open(path, "rb") as f:
            self.file(as_name or path, f.read(), st.st_mode & 0o7777, st.st_mtime)
        return path

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self.entries):
                kind, payload, mode, mtime = self.entries[name]
                info = tarfile.TarInfo(name)
                info.mode, info.mtime = mode, mtime
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, payload
                    tar.addfile(info)
                else:
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        return buf.getvalue()


def module_files(tree, module):
    """Copy ``module`` (a path under the stdlib, no suffix) and its host .pyc."""
    src = f"{STDLIB}/{module}.py"
    if not os.path.exists(src):
        return
    tree.host(src)
    directory, base = os.path.split(src)
    pyc = f"{directory}/__pycache__/{base[:-3]}.{TAG}.pyc"
    if os.path.exists(pyc):
        tree.host(pyc)


def truth_modules(code, flags=("-S",)):
    """What the host's python3.11 imports for ``-c code``: name -> (origin, cached)."""
    probe = ("import sys\n" + code + "\n"            # sys is built in: imports nothing
             "print(repr({n: [getattr(m.__spec__, 'origin', None),"
             " getattr(m.__spec__, 'cached', None)] for n, m in list(sys.modules.items())"
             " if getattr(m, '__spec__', None) is not None}))")
    out = subprocess.run([PYTHON, *flags, "-c", probe], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    return ast.literal_eval(out.splitlines()[-1])


def hostile_elfs():
    """A truncated ELF and one whose program headers sit at an absurd offset."""
    with open(PYTHON, "rb") as f:
        head = f.read(4096)
    truncated = head[:100]
    absurd = bytearray(head[:64])
    struct.pack_into("<Q", absurd, 32, 1 << 60)      # e_phoff
    return truncated, bytes(absurd) + b"\0" * 4000


def build_demo(workdir):
    """gcc-built /opt/demo/bin/demo (RUNPATH $ORIGIN/../lib) and libdemo.so; None without gcc."""
    if shutil.which("gcc") is None:
        return None
    root = os.path.join(workdir, "demo")
    os.makedirs(f"{root}/bin", exist_ok=True)
    os.makedirs(f"{root}/lib", exist_ok=True)
    with open(f"{root}/main.c", "w") as f:
        f.write(DEMO_MAIN)
    with open(f"{root}/lib.c", "w") as f:
        f.write(DEMO_LIB)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", f"{root}/lib/libdemo.so.1",
                    "-Wl,-soname,libdemo.so.1", f"{root}/lib.c", "-lm"], check=True)
    os.symlink("libdemo.so.1", f"{root}/lib/libdemo.so")
    subprocess.run(["gcc", "-o", f"{root}/bin/demo", f"{root}/main.c", f"-L{root}/lib",
                    "-ldemo", "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib"], check=True)
    return root


def build_layers(workdir):
    """``(lower tar, upper tar, info)`` for the test image."""
    require_host()
    low, up = Tree(), Tree()
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"),
                         ("sbin", "usr/sbin")):
        low.symlink(link, target)
    for d in ("usr/bin", "usr/lib64", "usr/local/lib", "etc/ld.so.conf.d", "tmp", "root"):
        low.dir(d)
    low.host(PYTHON)
    low.symlink("usr/bin/python3", "python3.11")
    libs = ldd(PYTHON) + ldd(JSON_EXT)
    for lib in libs:
        low.host(lib)
    low.file("etc/ld.so.conf", b"include /etc/ld.so.conf.d/*.conf\n\n")
    low.file("etc/ld.so.conf.d/libc.conf", b"# libc default configuration\n/usr/local/lib\n")
    low.file("etc/ld.so.conf.d/x86_64-linux-gnu.conf",
             b"# Multiarch support\n/usr/local/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n"
             b"/usr/lib/x86_64-linux-gnu\n")
    low.file("etc/ld.so.cache", b"ld.so-1.7.0 (not a real cache)")
    for extra in ("/usr/lib/locale/C.utf8/LC_CTYPE", "/usr/share/locale/locale.alias",
                  "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"):
        if os.path.exists(extra):
            low.host(extra)
    truncated, absurd = hostile_elfs()
    low.file("usr/local/lib/libz.so.1", truncated, 0o755)
    low.file("usr/local/lib/libexpat.so.1", absurd, 0o755)
    # the standard library slice: what python3.11 -S -c "import json" reads, frozen
    # modules' sources, decoys, _json and the _ssl extension (never imported)
    truth = {probe: truth_modules(code) for probe, code in PROBES.items()}
    for modules in truth.values():
        for name, (origin, cached) in modules.items():
            if origin and origin.startswith(STDLIB + "/"):
                low.host(origin)
                if cached and os.path.exists(cached):
                    low.host(cached)
    for module in FROZEN_SOURCES + DECOYS:
        module_files(low, module)
    low.host(SSL_EXT)
    for tool in ("/usr/bin/env", "/bin/dash"):
        low.host(tool)
        for lib in ldd(tool):
            low.host(lib)
    low.symlink("usr/bin/sh", "dash")
    low.file(f"{DIST}/evil.pth", b"import hidden_mod\n")
    low.file(f"{DIST}/hidden_mod.py", b"import json\n")
    low.file("app/mylib.py", b"import decoy_old\n")
    low.file("app/stale.py", b"")
    low.file("app/decoy_old.py", b"")

    up.file(f"{DIST}/.wh.evil.pth", b"")
    up.file(f"{DIST}/good.pth", b"# a comment\nimport goodmod\nextra_dir\nmissing_dir\n")
    up.file(f"{DIST}/goodmod.py", b"import keyword\n")
    up.dir(f"{DIST}/extra_dir")
    up.file(f"{DIST}/extra_dir/from_extra.py", b"")
    up.file("app/.wh..wh..opq", b"")
    up.file("app/main.py", MAIN_PY)
    up.file("app/mylib.py", b"import helper\nimport from_extra\n\n"
                            b"def f():\n    import decoy_lazy\n")
    up.file("app/helper.py", b"def greet(x):\n    return x\n")
    up.file("app/fallback_mod.py", b"FALLBACK = True\n")
    up.file("app/decoy_lazy.py", b"LAZY = True\n")
    up.file("app/run", b"#!/usr/bin/env python3\n" + MAIN_PY, 0o755)
    up.file("app/entry.sh", b'#!/bin/sh\nset -e\n[ -n "$DEBUG" ] && set -x\nexec "$@"\n', 0o755)
    with open(f"{STDLIB}/encodings/aliases.py", "rb") as f:
        up.file("usr/lib/python3.11/encodings/aliases.py", f.read(), 0o644, 1800000000)
    demo = build_demo(workdir)
    if demo is not None:
        up.host(f"{demo}/bin/demo", "opt/demo/bin/demo")
        up.host(f"{demo}/lib/libdemo.so.1", "opt/demo/lib/libdemo.so.1")
        up.symlink("opt/demo/lib/libdemo.so", "libdemo.so.1")
        for lib in ldd(f"{demo}/bin/demo"):
            if not lib.startswith(demo):
                low.host(lib)
    return low.tar(), up.tar(), {"truth": truth, "demo": demo}


CONFIG = {"Entrypoint": ["python3"], "Cmd": ["-c", "import json, mylib"],
          "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  "HOME=/home/app"],
          "WorkingDir": "/app"}


def _put(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest


def write_image(path, tag, layers, config=None, platforms=None, gzip_layers=True):
    """An OCI layout with the test image (an index of ``platforms`` if given);
    returns ``(spec, [layer digests])``."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    descs, diff_ids = [], []
    for layer in layers:
        blob = gzip.compress(layer, compresslevel=1, mtime=0) if gzip_layers else layer
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if gzip_layers else "")
        descs.append({"mediaType": media, "digest": _put(blobs, blob), "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(layer).hexdigest())

    def manifest(arch):
        cfg = json.dumps({"architecture": arch, "os": "linux",
                          "config": config if config is not None else CONFIG,
                          "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        body = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": _put(blobs, cfg), "size": len(cfg)},
                           "layers": descs}).encode()
        return {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": _put(blobs, body), "size": len(body)}
    if platforms:
        manifests = []
        for arch in platforms:
            desc = manifest(arch)
            desc["platform"] = {"os": "linux", "architecture": arch}
            manifests.append(desc)
        body = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": manifests}).encode()
        top = {"mediaType": "application/vnd.oci.image.index.v1+json",
               "digest": _put(blobs, body), "size": len(body)}
    else:
        top = manifest("amd64")
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [top]}, f)
    return f"oci:{path}:{tag}", [d["digest"] for d in descs]
