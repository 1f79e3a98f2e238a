"""Build real test images without internet, from this Debian machine's own packages.

    .venv/bin/python contrib/images.py python|python-full|gcc|bigdata OCI_DIR [--tag TAG]

Each image is a minimal Debian root made of the files of a few installed Debian
packages and everything they depend on (``dpkg -L`` over the ``Depends`` closure),
written as an OCI layout with gzip layers: a base layer (libc, dash as /bin/sh,
/etc basics) and one layer per workload.  The same function serves the demo, the
benchmarks and the tests, so they all run the same bytes.

``python``       base + python3 (the interpreter and the whole standard library)
``python-full``  base + the gcc layer + python3, like the official python image
                 (python on a build toolchain; what HelloBench's python case pulls)
``gcc``          base + gcc, binutils and the C library headers
``bigdata``      python + 256 MiB of incompressible data files the workload reads
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile

from stargz_overlay.oci_layout import OCILayout

BASE_PACKAGES = ("libc6", "dash", "coreutils")
WORKLOAD_PACKAGES = {
    "python": ("python3-minimal", "python3.11", "libpython3.11-stdlib"),
    "gcc": ("gcc-12", "libc6-dev"),
}
USRMERGE_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SKIP_PREFIXES = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/info/", "/usr/share/lintian/",
                 "/usr/share/locale/")
KINDS = ("python", "python-full", "gcc", "bigdata")
BIGDATA_BYTES = 256 << 20
MTIME = 1700000000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def _dpkg(*args):
    return subprocess.run(["dpkg-query", *args], check=True, capture_output=True,
                          text=True).stdout


def installed(package):
    try:
        return "install ok installed" in _dpkg("-W", "-f=${Status}", package)
    except subprocess.CalledProcessError:
        return False


def closure(packages):
    """The installed packages in the Depends/Pre-Depends closure of ``packages``."""
    seen, todo = set(), list(packages)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if not installed(name):
            raise SystemExit(f"Debian package {name} is not installed "
                             f"(apt-get install {name})")
        seen.add(name)
        fields = _dpkg("-W", "-f=${Depends}, ${Pre-Depends}", name)
        for group in fields.split(","):
            choices = [re.sub(r"[ (].*|:any|:\w+$", "", alt.strip())
                       for alt in group.split("|") if alt.strip()]
            chosen = next((c for c in choices if c in seen or installed(c)), None)
            if chosen and chosen not in seen:
                todo.append(chosen)
    return sorted(seen)


def package_paths(packages):
    paths = set()
    for name in packages:
        for line in _dpkg("-L", name).splitlines():
            if line.startswith("/") and not line.startswith(SKIP_PREFIXES) and line != "/.":
                paths.add(line)
    return paths


def _info(name, **kw):
    info = tarfile.TarInfo(name.lstrip("/"))
    info.mtime = MTIME
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def layer_from_paths(paths, extra=()):
    """A tar layer holding ``paths`` as they are on this machine, plus ``extra``
    ``(TarInfo, bytes or None)`` pairs; parents come before children."""
    buf = io.BytesIO()
    replaced = {info.name for info, _ in extra}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(paths):
            if path.lstrip("/") in replaced:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue                       # e.g. diverted or conffile-less paths
            if path in USRMERGE_DIRS or os.path.isdir(path) and not os.path.islink(path):
                tar.addfile(_info(path, type=tarfile.DIRTYPE, mode=0o755))
            elif os.path.islink(path):
                tar.addfile(_info(path, type=tarfile.SYMTYPE, linkname=os.readlink(path)))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    data = f.read()
                tar.addfile(_info(path, size=len(data), mode=st.st_mode & 0o7777),
                            io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def base_layer():
    paths = package_paths(closure(BASE_PACKAGES))
    etc = {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
           "etc/group": b"root:x:0:\nnogroup:x:65534:\n",
           "etc/hostname": b"stargz-demo\n"}
    extra = [(_info("tmp", type=tarfile.DIRTYPE, mode=0o1777), None),
             (_info("root", type=tarfile.DIRTYPE, mode=0o700), None),
             (_info("bin/sh", type=tarfile.SYMTYPE, linkname="dash"), None)]
    extra += [(_info(name, size=len(data), mode=0o644), data) for name, data in etc.items()]
    return layer_from_paths(paths, extra)


def workload_layer(kind, base_packages):
    packages = [p for p in closure(WORKLOAD_PACKAGES[kind]) if p not in base_packages]
    paths = package_paths(packages)
    extra = []
    if kind == "python":
        extra.append((_info("usr/bin/python3", type=tarfile.SYMTYPE, linkname="python3.11"),
                      None))
    if kind == "gcc":
        extra.append((_info("usr/bin/gcc", type=tarfile.SYMTYPE, linkname="gcc-12"), None))
        extra.append((_info("usr/bin/cc", type=tarfile.SYMTYPE, linkname="gcc-12"), None))
    return layer_from_paths(paths, extra)


def bigdata_layer(size=BIGDATA_BYTES, files=64):
    """``files`` incompressible files under /data, ``size`` bytes in all (seeded, so
    every build is identical)."""
    each = size // files
    extra = [(_info("data", type=tarfile.DIRTYPE, mode=0o755), None)]
    for i in range(files):
        seed = hashlib.sha256(b"stargz-bigdata-%d" % i).digest()
        blocks, digest = [], seed
        for _ in range(each // 32):
            digest = hashlib.sha256(digest).digest()
            blocks.append(digest)
        data = b"".join(blocks)
        extra.append((_info(f"data/part{i:03d}.bin", size=len(data), mode=0o644), data))
    return layer_from_paths((), extra)


def write_image(layout_dir, tag, layers, cmd):
    """An OCI image of gzip ``layers`` (tar bytes) in ``layout_dir``; returns ``oci:DIR:TAG``."""
    layout = OCILayout(layout_dir, create=True)
    descs, diff_ids = [], []
    for layer in layers:
        blob = gzip.compress(layer, compresslevel=6, mtime=0)
        descs.append({"mediaType": OCI_GZIP, "digest": layout.put_blob_bytes(blob),
                      "size": len(blob)})
        diff_ids.append("sha256:" + hashlib.sha256(layer).hexdigest())
    config = json.dumps({
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine,
                                                                   os.uname().machine),
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                       "/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": layout.put_blob_bytes(config),
                   "size": len(config)},
        "layers": descs}).encode()
    layout.tag({"mediaType": OCI_MANIFEST, "digest": layout.put_blob_bytes(manifest),
                "size": len(manifest)}, tag)
    return f"oci:{os.path.abspath(layout_dir)}:{tag}"


def image_packages(kind):
    """The Debian packages image ``kind`` is made of (with their dependencies)."""
    names = list(BASE_PACKAGES)
    if kind in ("gcc", "python-full"):
        names += WORKLOAD_PACKAGES["gcc"]
    if kind in ("python", "python-full", "bigdata"):
        names += WORKLOAD_PACKAGES["python"]
    return closure(names)


def build(kind, layout_dir, tag=None):
    """Build image ``kind`` into ``layout_dir``; returns its ``oci:`` reference."""
    tag = tag or kind
    base_packages = set(closure(BASE_PACKAGES))
    layers = [base_layer()]
    if kind == "python-full":       # like the official python image: on a build toolchain
        layers.append(workload_layer("gcc", base_packages))
    if kind in ("python", "python-full", "bigdata"):
        layers.append(workload_layer("python", base_packages))
        cmd = ["python3", "-c", "print('hello')"]
    elif kind == "gcc":
        layers.append(workload_layer("gcc", base_packages))
        cmd = ["/bin/sh", "-c", "printf '#include <stdio.h>\\nint main(void){puts(\"hello\");"
                                "return 0;}\\n' > /tmp/h.c && gcc /tmp/h.c -o /tmp/h && /tmp/h"]
    else:
        raise SystemExit(f"unknown image kind {kind!r} ({', '.join(KINDS)})")
    if kind == "bigdata":
        layers.append(bigdata_layer())
        cmd = ["python3", "-c", "import glob\nfor p in sorted(glob.glob('/data/*')):\n"
                                "    open(p, 'rb').read()\nprint('hello')"]
    return write_image(layout_dir, tag, layers, cmd)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("layout", metavar="OCI_DIR")
    parser.add_argument("--tag")
    args = parser.parse_args()
    print(build(args.kind, args.layout, args.tag))


if __name__ == "__main__":
    main()
