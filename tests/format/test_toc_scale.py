"""Opening a blob whose TOC has 100,000 entries: time and peak memory.

The targets (issue 2) are < 1 s and < 150 MB.  The blob is synthetic (the
TOC is written directly; data members are never read by an open), and the
open runs in a fresh interpreter so the peak RSS is that of the open alone.
contrib/bench/format_bench.py measures the same on real converted blobs.
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from stargz_overlay.footer import encode_footer

ENTRIES = 100_000
TARGET_MB = 150
TIME_GUARD_S = 2.0     # the target is 1 s; the guard leaves room for a loaded machine

OPEN = r"""
import json, sys, time
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource
start = time.perf_counter()
r = StargzReader(FileSource(sys.argv[1]))
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "entries": len(r.toc.entries), "hwm_kib": hwm}))
"""


def synthetic_blob(path, entries=ENTRIES):
    """A layer-like TOC: dirs of 40 entries each (files with digests, empty files, symlinks)."""
    toc = []
    offset = 0
    digest = "sha256:" + hashlib.sha256(b"x").hexdigest()
    d = 0
    while len(toc) < entries:
        base = f"usr/lib/python3/dist-packages/pkg{d // 50}/mod{d}"
        toc.append({"name": base + "/", "type": "dir", "modtime": "2023-11-14T22:13:20Z",
                    "mode": 493})
        for j in range(min(39, entries - len(toc))):
            name = f"{base}/module_{j}.py"
            if j % 13 == 12:
                toc.append({"name": name, "type": "symlink", "linkName": f"module_{j - 1}.py",
                            "modtime": "2023-11-14T22:13:20Z", "mode": 511})
            elif j % 13 == 11:
                toc.append({"name": name, "type": "reg", "modtime": "2023-11-14T22:13:20Z",
                            "mode": 420, "digest": "sha256:" + hashlib.sha256(b"").hexdigest()})
            else:
                offset += 97
                toc.append({"name": name, "type": "reg", "size": 1000 + j,
                            "modtime": "2023-11-14T22:13:20Z", "mode": 420, "offset": offset,
                            "digest": digest, "chunkDigest": digest})
        d += 1
    toc_json = json.dumps({"version": 1, "entries": toc}, separators=(",", ":")).encode()
    data = b"\0" * (offset + 1000)
    member = io.BytesIO()
    with tarfile.open(fileobj=member, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tar.addfile(info, io.BytesIO(toc_json))
    with open(path, "wb") as f:
        f.write(data)
        f.write(gzip.compress(member.getvalue(), 1))
        f.write(encode_footer(len(data)))


@pytest.fixture(scope="module")
def opened(tmp_path_factory):
    blob = tmp_path_factory.mktemp("scale") / "many.esgz"
    synthetic_blob(blob)
    plugin_dir = os.path.dirname(os.path.dirname(
        __import__("stargz_overlay").__file__))
    env = dict(os.environ, PYTHONPATH=plugin_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = [json.loads(subprocess.run([sys.executable, "-c", OPEN, str(blob)], check=True,
                                      capture_output=True, text=True, env=env).stdout)
            for _ in range(2)]
    return min(runs, key=lambda r: r["seconds"])


def test_100k_entry_toc_opens_quickly(opened):
    assert opened["entries"] >= ENTRIES
    assert opened["seconds"] < TIME_GUARD_S, opened


def test_100k_entry_toc_peak_memory(opened):
    assert opened["hwm_kib"] / 1024 < TARGET_MB, opened
