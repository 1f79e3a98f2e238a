#!/usr/bin/env python3
"""Start time of the demo python image by optimization: legacy gzip (podman pull +
run), eStargz unoptimized, ``convert --analyze`` (inferred startup files) and
``convert --optimize`` (recorded startup files), in the same run over the same
shaped link.

The image is the demo's, contrib/images.py's ``python-full`` (``--image python``:
the minimal root without the unread gcc toolchain layer).  It is pushed as gzip with skopeo and
converted three times by ``stargz-overlay convert``.  Lazy starts are
``stargz-overlay mount --image`` (prefetch on, fresh cache each run) +
``chroot MNT python3 -c "print('hello')"``; the legacy start is ``podman pull``
+ ``podman run`` with a fresh private storage.  Everything timed goes through
contrib/bench/netshape.py (default 20 ms RTT, 100 Mbit/s).  The median of
``--repeat`` runs is reported; the target is ``analyze`` within 1.2x of
``recorded``.

    sudo .venv/bin/python contrib/bench/optimize_bench.py [--rtt-ms 20] [--mbit 100] \\
        [--image python-full|python] [--repeat 3]

Prints a table and writes JSON to contrib/bench/results/ (``--out DIR`` elsewhere).
Needs root, /dev/fuse, fuse-overlayfs 1.x, docker-registry, skopeo, podman and runc.
The set-up is contrib/bench/benchenv.py's.
"""

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchenv import (CLI, Bench, Lazy, Podman, median_row, one_image_args,  # noqa: E402
                      run)

VARIANTS = (("plain", []), ("analyze", ["--analyze"]), ("recorded", ["--optimize"]))
TARGET = 1.2


def convert(oci, dest, flags, env):
    """Convert; returns the number of startup files the converter prioritized."""
    res = run(CLI + ["convert", *flags, oci, dest], env=env)
    counts = [int(n) for n in re.findall(r"(\d+) (?:startup files|files read)", res.stderr)]
    return sum(counts)


def main():
    args = one_image_args(__doc__).parse_args()
    with Bench(args, "optimize-bench-") as bench:
        oci = bench.push_one_image()
        files, convert_s = {}, {}
        for tag, flags in VARIANTS:
            print(f"converting: {tag} ...", flush=True)
            started = time.monotonic()
            files[tag] = convert(oci, f"docker://{bench.direct}/bench/python:{tag}", flags,
                                 bench.conv_env)
            convert_s[tag] = time.monotonic() - started
        results = bench.results
        results.update(startup_files=files, convert_s=convert_s)

        bench.shape("python")
        shaped = bench.shaped
        for n in range(args.repeat):
            for tag, _ in VARIANTS:
                bench.timed(tag, Lazy(bench.tmp, f"{tag}.{n}", shaped),
                            f"{shaped}/bench/python:{tag}", width=10)
            if not args.no_legacy:
                bench.timed("legacy", Podman(bench.tmp, f"legacy.{n}", shaped),
                            f"{shaped}/bench/python:legacy", width=10)
        rows = {name: median_row(r) for name, r in bench.runs.items()}
        results["rows"] = rows
        recorded = rows["recorded"]["total_s"]
        legacy_s = rows.get("legacy", {}).get("total_s")
        print()
        print(f"startup files: analyze {files['analyze']}, recorded {files['recorded']}")
        print(f"{'start':10} {'median s':>8} {'x recorded':>10} {'x legacy':>9} "
              f"{'MB fetched':>11}  runs")
        for name in ("legacy", "plain", "analyze", "recorded"):
            if name not in rows:
                continue
            row = rows[name]
            row["x_recorded"] = row["total_s"] / recorded
            ratio = f"{row['total_s'] / legacy_s:9.3f}" if legacy_s else f"{'-':>9}"
            print(f"{name:10} {row['total_s']:8.2f} {row['x_recorded']:10.2f} {ratio} "
                  f"{row.get('link_bytes', 0) / 1e6:11.2f}  "
                  f"{' '.join(f'{t:.2f}' for t in row['all_s'])}")
        verdict = rows["analyze"]["x_recorded"] <= TARGET
        results["target_met"] = verdict
        print(f"\ntarget: analyze within {TARGET}x of recorded: "
              f"{'met' if verdict else 'NOT met'} ({rows['analyze']['x_recorded']:.2f}x)")
        bench.write("optimize_bench")
        return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
