#!/usr/bin/env python3
"""Format benchmarks: stargz-overlay's writer and TOC reader versus the reference.

(a) Conversion throughput (MB/s of uncompressed tar input) of
    ``stargz_overlay.writer.convert`` and of Go's ``estargz.Build`` (Debian's
    0.12 library, through tests/interop/refestargz) at the same gzip level,
    on the same generated tar (small text-like files, large compressible and
    incompressible files).
(b) Time and peak memory to open a blob whose TOC has N entries (default
    100,000): ``StargzReader`` versus Go's ``estargz.Open``, each in its own
    process.

Prints a table and writes JSON to contrib/bench/results/ (git-ignored).

    python3 contrib/bench/format_bench.py [--size-mb 200] [--entries 100000]
                                          [--levels 9,6] [--workdir DIR] [--no-go]
"""

import argparse
import io
import json
import os
import platform
import random
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "plugin"))
sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))

import refgo  # noqa: E402  (tests/interop/refgo.py: builds the Go reference driver)

TARGET_TOC_SECONDS = 1.0
TARGET_TOC_MB = 150
MB = 1_000_000

WORDS = ("the of and to in is for on that with as by this from at are be or an it not "
         "stargz layer image container registry chunk digest offset gzip member tar file "
         "directory symlink python usr lib share bin etc config value error return import "
         "def class self none true false int string bytes json http range request").split()


# ---------------------------------------------------------------------------
# input generation

def text_corpus(rnd, size):
    """Pseudo-text (compresses about 3-4x with gzip)."""
    out = []
    total = 0
    while total < size:
        line = " ".join(rnd.choices(WORDS, k=rnd.randint(3, 14)))
        line += " %d\n" % rnd.randint(0, 1 << 20)
        out.append(line)
        total += len(line)
    return "".join(out).encode()[:size]


def generate_tar(path, size_mb, seed=1):
    """A tar of about ``size_mb`` MB: 20% small text files, 40% large compressible,
    40% large incompressible, plus dirs and symlinks.  Returns (bytes of content, files)."""
    rnd = random.Random(seed)
    corpus = text_corpus(rnd, 4 << 20)
    budget = size_mb * MB
    small_budget, large_budget = budget * 0.2, budget * 0.8
    content = 0
    files = 0

    def corpus_slice(n):
        start = rnd.randrange(0, len(corpus) - n) if n < len(corpus) else 0
        return corpus[start:start + n]

    def add(tar, name, data, mode=0o644):
        nonlocal content, files
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, 1700000000
        tar.addfile(info, io.BytesIO(data))
        content += len(data)
        files += 1

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        produced = 0
        d = 0
        while produced < small_budget:
            if files % 50 == 0:
                d += 1
                info = tarfile.TarInfo(f"usr/share/pkg{d}")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                tar.addfile(info)
            n = min(int(rnd.lognormvariate(8, 1.2)), 256 << 10)
            add(tar, f"usr/share/pkg{d}/file{files}.txt", corpus_slice(n))
            if files % 20 == 0:
                info = tarfile.TarInfo(f"usr/share/pkg{d}/link{files}")
                info.type, info.linkname = tarfile.SYMTYPE, f"file{files}.txt"
                tar.addfile(info)
            produced += n
        produced = 0
        i = 0
        while produced < large_budget:
            n = min(rnd.randint(2 << 20, 12 << 20), max(int(large_budget - produced), 1 << 20))
            if i % 2 == 0:
                pieces = []
                left = n
                while left > 0:
                    piece = corpus_slice(min(left, rnd.randint(4 << 10, 256 << 10)))
                    pieces.append(piece)
                    left -= len(piece)
                data = b"".join(pieces)[:n]
                add(tar, f"opt/data/text{i}.log", data)
            else:
                add(tar, f"opt/data/blob{i}.bin", rnd.randbytes(n), mode=0o755)
            produced += n
            i += 1
    return content, files


def generate_many_entries_tar(path, entries, seed=2):
    """A tar with ``entries`` entries: dirs, small files, empty files, symlinks, hardlinks."""
    rnd = random.Random(seed)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        count = 0
        d = 0
        while count < entries:
            info = tarfile.TarInfo(f"usr/lib/mod{d // 100}/pkg{d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
            tar.addfile(info)
            count += 1
            for j in range(min(40, entries - count)):
                name = f"usr/lib/mod{d // 100}/pkg{d}/module_{j}.py"
                kind = j % 10
                info = tarfile.TarInfo(name + ("" if kind < 8 else f".{kind}"))
                info.mtime, info.uid, info.gid = 1700000000, 0, 0
                if kind == 8:
                    info.type, info.linkname = tarfile.SYMTYPE, f"module_{j - 1}.py"
                    tar.addfile(info)
                elif kind == 9:
                    info.type, info.linkname = tarfile.LNKTYPE, \
                        f"usr/lib/mod{d // 100}/pkg{d}/module_{j - 2}.py"
                    tar.addfile(info)
                else:
                    data = b"" if kind == 7 else b"x = %d\n" % rnd.randrange(1 << 30)
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
                count += 1
            d += 1


# ---------------------------------------------------------------------------
# measurements

def convert_ours(tar_path, out_path, level, chunk_size=4 << 20):
    from stargz_overlay.writer import convert
    start = time.perf_counter()
    with open(out_path, "wb") as out:
        res = convert(tar_path, out, compression_level=level, chunk_size=chunk_size)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - start, res.toc_digest


VMHWM = r"""
def vmhwm():
    # peak RSS of this process in KiB; ru_maxrss would include the parent's peak
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1
"""

OPEN_OURS = VMHWM + r"""
import json, sys, time, tracemalloc
sys.path.insert(0, sys.argv[1])
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource
blob, mode = sys.argv[2], sys.argv[3]
if mode == "trace":
    tracemalloc.start()
start = time.perf_counter()
r = StargzReader(FileSource(blob))
seconds = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1] if mode == "trace" else None
paths = sum(1 for _ in r.toc.walk())
print(json.dumps({"seconds": seconds, "paths": paths, "tracemallocPeak": peak,
                  "maxRssKiB": vmhwm()}))
"""

BASELINE = VMHWM + r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import stargz_overlay.reader
print(json.dumps({"maxRssKiB": vmhwm()}))
"""


def py_json(code, *args):
    out = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "plugin"), *args],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"measuring process failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout)


def open_ours(blob, repeat):
    runs = [py_json(OPEN_OURS, blob, "time") for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    traced = py_json(OPEN_OURS, blob, "trace")
    base = py_json(BASELINE)["maxRssKiB"]
    return {"seconds": best["seconds"], "paths": best["paths"],
            "maxRssMB": best["maxRssKiB"] / 1024, "baselineRssMB": base / 1024,
            "tracemallocPeakMB": traced["tracemallocPeak"] / 2**20}


def open_go(tool, blob, repeat):
    runs = [tool.open(blob) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["seconds"])
    return {"seconds": best["seconds"], "paths": best["paths"],
            "maxRssMB": max(r["vmHWMKiB"] for r in runs) / 1024}


def toc_entries(blob):
    from stargz_overlay.reader import StargzReader
    from stargz_overlay.source import FileSource
    with FileSource(blob) as src:
        return len(json.loads(StargzReader(src).toc_json)["entries"])


# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=200, help="conversion input size")
    ap.add_argument("--entries", type=int, default=100_000, help="TOC entries for (b)")
    ap.add_argument("--levels", default="9", help="gzip levels to compare, e.g. 9,6,1")
    ap.add_argument("--repeat", type=int, default=3, help="TOC open repetitions (best kept)")
    ap.add_argument("--workdir", help="scratch directory (default: a temp dir)")
    ap.add_argument("--no-go", action="store_true", help="skip the Go reference")
    ap.add_argument("--results", default=os.path.join(HERE, "results"),
                    help="directory for the JSON result")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        tool = None
        if not args.no_go:
            try:
                tool = refgo.RefTool(refgo.build_tool(os.path.join(work, "go")))
            except refgo.Unavailable as exc:
                print(f"Go reference unavailable, measuring ours only: {exc}")
        result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                              "platform": platform.platform()},
                  "targets": {"conversion": "ours >= reference MB/s at the same level",
                              "toc_seconds": TARGET_TOC_SECONDS, "toc_mb": TARGET_TOC_MB}}

        # (a) conversion throughput
        tar_path = os.path.join(work, "input.tar")
        t0 = time.perf_counter()
        content, files = generate_tar(tar_path, args.size_mb)
        tar_size = os.path.getsize(tar_path)
        print(f"generated {tar_size / MB:.1f} MB tar ({files} files) in "
              f"{time.perf_counter() - t0:.1f} s")
        conv = []
        for level in levels:
            row = {"level": level, "inputMB": tar_size / MB}
            out = os.path.join(work, f"ours-{level}.esgz")
            secs, _ = convert_ours(tar_path, out, level)
            row["ours"] = {"seconds": secs, "MBps": tar_size / MB / secs,
                           "outputMB": os.path.getsize(out) / MB}
            os.unlink(out)
            if tool:
                out = os.path.join(work, f"go-{level}.esgz")
                built = tool.build(tar_path, out, level=level)
                row["go"] = {"seconds": built["seconds"],
                             "MBps": tar_size / MB / built["seconds"],
                             "outputMB": built["compressedSize"] / MB,
                             "workers": os.cpu_count()}
                os.unlink(out)
                row["oursOverGo"] = row["ours"]["MBps"] / row["go"]["MBps"]
            conv.append(row)
        os.unlink(tar_path)
        result["conversion"] = conv

        # (b) TOC open time and memory
        many = os.path.join(work, "many.tar")
        t0 = time.perf_counter()
        generate_many_entries_tar(many, args.entries)
        print(f"generated {args.entries}-entry tar in {time.perf_counter() - t0:.1f} s")
        blobs = {}
        ours_blob = os.path.join(work, "many-ours.esgz")
        t0 = time.perf_counter()
        convert_ours(many, ours_blob, 6)
        print(f"converted it (ours, level 6) in {time.perf_counter() - t0:.1f} s")
        blobs["ours-built"] = ours_blob
        if tool:
            go_blob = os.path.join(work, "many-go.esgz")
            tool.build(many, go_blob, level=6)
            blobs["go-built"] = go_blob
        toc = []
        for label, blob in blobs.items():
            row = {"blob": label, "tocEntries": toc_entries(blob),
                   "ours": open_ours(blob, args.repeat)}
            if tool:
                row["go"] = open_go(tool, blob, args.repeat)
            toc.append(row)
        result["tocOpen"] = toc

    report(result)
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, time.strftime("format_bench-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {path}")
    return 0


def report(result):
    print("\n(a) conversion throughput, MB/s of uncompressed tar input")
    print(f"{'level':>5} {'input MB':>9} {'ours MB/s':>10} {'ref MB/s':>9} {'ours/ref':>9} "
          f"{'ours out MB':>12} {'ref out MB':>11}")
    for row in result["conversion"]:
        go = row.get("go")
        print(f"{row['level']:>5} {row['inputMB']:>9.1f} {row['ours']['MBps']:>10.1f} "
              f"{go['MBps'] if go else float('nan'):>9.1f} "
              f"{row.get('oursOverGo', float('nan')):>9.2f} "
              f"{row['ours']['outputMB']:>12.1f} "
              f"{go['outputMB'] if go else float('nan'):>11.1f}")
    print("\n(b) opening a blob (footer + TOC + tree)")
    print(f"{'blob':>10} {'entries':>8} {'ours s':>7} {'ours RSS MB':>12} {'ours heap MB':>13} "
          f"{'ref s':>7} {'ref RSS MB':>11}")
    for row in result["tocOpen"]:
        o, g = row["ours"], row.get("go") or {}
        print(f"{row['blob']:>10} {row['tocEntries']:>8} {o['seconds']:>7.3f} "
              f"{o['maxRssMB']:>12.1f} {o['tracemallocPeakMB']:>13.1f} "
              f"{g.get('seconds', float('nan')):>7.3f} {g.get('maxRssMB', float('nan')):>11.1f}")
    print(f"\nours RSS includes the interpreter (~{result['tocOpen'][0]['ours']['baselineRssMB']:.0f}"
          f" MB with the package imported); heap = tracemalloc peak during the open.")
    checks = []
    for row in result["conversion"]:
        if "oursOverGo" in row:
            checks.append((f"conversion level {row['level']} >= reference",
                           row["oursOverGo"] >= 1.0))
    for row in result["tocOpen"]:
        o = row["ours"]
        checks.append((f"{row['blob']} TOC opens in < {TARGET_TOC_SECONDS:g} s",
                       o["seconds"] < TARGET_TOC_SECONDS))
        checks.append((f"{row['blob']} TOC open peak RSS < {TARGET_TOC_MB} MB",
                       o["maxRssMB"] < TARGET_TOC_MB))
        checks.append((f"{row['blob']} TOC open peak Python heap < {TARGET_TOC_MB} MB",
                       o["tracemallocPeakMB"] < TARGET_TOC_MB))
    result["checks"] = {name: ok for name, ok in checks}
    print("\ntargets:")
    for name, ok in checks:
        print(f"  {'PASS' if ok else 'MISS'}  {name}")


if __name__ == "__main__":
    sys.exit(main())
