#!/usr/bin/env python3
"""Plugin benchmark: metadata and reads through plugin layers vs. plain directories.

One eStargz layer of many files (local blob) is mounted by fuse-overlayfs 1.x
through the plugin, and the same layer extracted by tar is mounted as a plain
lower directory by the same fuse-overlayfs with the same options (fast_ino=1,
an upper dir).  Each phase runs once on a fresh mount (so the kernel's FUSE
caches are cold and every answer comes from fuse-overlayfs and its layers):

  find       walk the tree (readdir of every directory)
  stat       lstat every path
  read-cold  read every file; plugin: fetch + verify + cache each file
  read-warm  read every file again on a fresh mount; plugin: cache hits

Prints times and the plugin/plain ratio; writes JSON to contrib/bench/results/.
Needs root and /dev/fuse.

    python3 contrib/bench/plugin_meta.py [--files 5000] [--dirs 100] [--file-kb 8]
"""

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "plugin"))
sys.path.insert(0, ROOT)

from stargz_overlay.writer import convert  # noqa: E402
from tests.plugin.fusehelp import (Mount, blob_spec, plugin_lower, plugin_so,  # noqa: E402
                                   write_config)


def build(tmp, files, dirs, file_kb, seed=7):
    rnd = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in range(dirs):
            info = tarfile.TarInfo(f"usr/share/d{d:03d}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for i in range(files):
            size = rnd.randint(0, file_kb * 2048)
            data = rnd.randbytes(size // 4) * 4
            info = tarfile.TarInfo(f"usr/share/d{i % dirs:03d}/f{i:06d}")
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    tar_path = os.path.join(tmp, "layer.tar")
    with open(tar_path, "wb") as f:
        f.write(buf.getvalue())
    blob = os.path.join(tmp, "layer.blob")
    with open(blob, "wb") as out:
        res = convert(tar_path, out)
    plain = os.path.join(tmp, "plain")
    os.makedirs(plain)
    subprocess.run(["tar", "--numeric-owner", "-xpf", tar_path, "-C", plain], check=True)
    return blob, plain, res


def walk(root):
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        paths.extend(os.path.join(dirpath, n) for n in dirnames + filenames)
    return paths


def phase(name, paths, root):
    start = time.perf_counter()
    if name == "find":
        n = len(walk(root))
    elif name == "stat":
        for p in paths:
            os.lstat(os.path.join(root, p))
        n = len(paths)
    else:
        n = 0
        for p in paths:
            full = os.path.join(root, p)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    n += len(f.read())
    return time.perf_counter() - start, n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--file-kb", type=int, default=8, help="mean file size")
    parser.add_argument("--fsync", action="store_true", help="fdatasync cache files")
    parser.add_argument("--cache-dir", help="plugin cache directory (default: in the temp dir; "
                        "e.g. /dev/shm/x to take the disk out of the measurement)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        sys.exit("plugin_meta: needs root and /dev/fuse")
    so = plugin_so()
    tmp = tempfile.mkdtemp(prefix="stargz-bench-")
    mounts = []
    try:
        blob, plain, res = build(tmp, args.files, args.dirs, args.file_kb)
        cache_dir = args.cache_dir or os.path.join(tmp, "cache")
        if args.cache_dir and os.path.exists(cache_dir):
            sys.exit(f"plugin_meta: {cache_dir} exists; give a new directory")
        config = write_config(os.path.join(tmp, "config.toml"), cache_dir,
                              os.path.join(tmp, "plugin.log"), log_level="info",
                              log_reads=False, log_calls=False, fsync=args.fsync)
        rel = [os.path.relpath(p, plain) for p in walk(plain)]

        def fresh(kind, n):
            if kind == "plugin":
                lower = plugin_lower(blob_spec(blob, config, res.toc_digest),
                                     os.path.join(tmp, f"pl{n}"))
            else:
                lower = plain
            m = Mount(os.path.join(tmp, f"{kind}{n}.mnt"), [lower],
                      os.path.join(tmp, f"{kind}{n}.up"), os.path.join(tmp, f"{kind}{n}.wk"),
                      so=so if kind == "plugin" else None)
            mounts.append(m)
            m.mount()
            return m

        results = {}
        n = 0
        for name in ("find", "stat", "read-cold", "read-warm"):
            for kind in ("plain", "plugin"):
                n += 1
                m = fresh(kind, n)
                if name == "stat":
                    walk(m.mnt)        # lookups happen in the walk; stat then asks getattr
                results[(name, kind)] = phase(name, rel, m.mnt)
                if kind == "plugin" and n < 3:
                    results[("mount", "plugin")] = (m.elapsed, 0)
                elif kind == "plain" and n < 3:
                    results[("mount", "plain")] = (m.elapsed, 0)
                m.unmount()
        print(f"{args.files} files in {args.dirs} dirs, {res.uncompressed_size / 1e6:.1f} MB "
              f"({res.compressed_size / 1e6:.1f} MB blob), fuse-overlayfs fast_ino=1")
        print(f"{'phase':<10} {'plain dir':>11} {'plugin':>11} {'ratio':>7}")
        rows = []
        for name in ("mount", "find", "stat", "read-cold", "read-warm"):
            a, b = results[(name, "plain")][0], results[(name, "plugin")][0]
            print(f"{name:<10} {a * 1000:9.1f}ms {b * 1000:9.1f}ms {b / a:6.2f}x")
            rows.append({"phase": name, "plain_s": a, "plugin_s": b, "ratio": b / a})
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        with open(os.path.join(HERE, "results", "plugin_meta.json"), "w") as f:
            json.dump({"files": args.files, "dirs": args.dirs, "file_kb": args.file_kb,
                       "rows": rows}, f, indent=2)
    finally:
        for m in mounts:
            m.unmount()
        shutil.rmtree(tmp, ignore_errors=True)
        if args.cache_dir:
            shutil.rmtree(args.cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
