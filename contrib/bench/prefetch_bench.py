#!/usr/bin/env python3
"""Cold start of the demo python image over a shaped link: lazy with prefetch, lazy
without prefetch, and the legacy pull + run, in the same run.

The image is the demo's, from contrib/images.py (built offline): ``python-full``,
python3 on the gcc toolchain layer as in the official non-slim python images (the
workload reads none of the toolchain; a legacy pull downloads it all);
``--image python`` is the minimal root with python3 only.  It is pushed to a local
docker-registry as the legacy gzip image (skopeo) and converted to eStargz twice by
``stargz-overlay convert``: plain (no prioritized files) and optimized, with the files the
workload reads at start-up, traced once through the plugin (``log_calls``),
placed before ``.prefetch.landmark``.  All timed traffic goes through
contrib/bench/netshape.py (default 20 ms RTT, 100 Mbit/s), checked with its
``verify()``.

Timed, each from a cold cache (and a fresh podman storage for the legacy run):

  lazy+prefetch   stargz-overlay mount --image (optimized) + chroot MNT python3 -c ...
  lazy            the same with noprefetch = true (file-at-a-time fetching)
  lazy-plain      the plain eStargz image (no landmark region; prefetch has nothing to do)
  podman-lazy     podman pull + podman run of the optimized image through the
                  Additional Layer Store (stargz-overlay store) and the mount program
  legacy          podman pull (gzip image) + podman run python3 -c ...

and two references: ``local`` (the lazy+prefetch start with a warm cache and an
unshaped registry: the work that is not network) and the physical floor,
``floor = 4 RTT (connect, manifest, TOCs, data) + bytes needed / bandwidth +
local``, where the bytes needed are the layers' footers and TOCs plus the
compressed bytes of the files the workload reads.

    sudo .venv/bin/python contrib/bench/prefetch_bench.py [--rtt-ms 20] [--mbit 100] \
        [--image python-full|python] [--repeat 3]

Each start is repeated (fresh cache, fresh podman storage) and the median is
reported.

Prints a table and writes JSON to contrib/bench/results/ (``--out DIR`` elsewhere).
Needs root, /dev/fuse, fuse-overlayfs 1.x, docker-registry, skopeo, podman and runc.

The set-up (registry, image, shaped link, the ways to start the image, clean-up)
is contrib/bench/benchenv.py's, shared with optimize_bench.py and suite.py.
"""

import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchenv import (CLI, Bench, Lazy, Podman, PodmanLazy, median_row,  # noqa: E402
                      one_image_args, run)


def trace_reads(tmp, reg_host, ref):
    """Files the workload opens, in order of first open (from the plugin's call log)."""
    lazy = Lazy(tmp, "trace", reg_host, log_calls=True, noprefetch=True,
                no_background_fetch=True)
    lazy.mount(ref)
    try:
        lazy.start()
        with open(os.path.join(lazy.dir, "plugin.log"), encoding="utf-8") as f:
            log = f.read()
        seen, order = set(), []
        for m in re.finditer(r"call openat\(ptr, b'([^']*)'", log):
            path = m.group(1).lstrip("./")
            if path and path not in seen:
                seen.add(path)
                full = os.path.join(lazy.mnt, path)
                if os.path.isfile(full) and not os.path.islink(full):
                    order.append(path)
        return order
    finally:
        lazy.unmount()


def main():
    parser = one_image_args(__doc__)
    parser.add_argument("--no-podman-lazy", action="store_true",
                        help="skip podman through the layer store and mount program")
    args = parser.parse_args()
    with Bench(args, "prefetch-bench-") as bench:
        oci = bench.push_one_image()
        tmp, direct, results = bench.tmp, bench.direct, bench.results
        run(CLI + ["convert", oci, f"docker://{direct}/bench/python:plain"], env=bench.conv_env)
        print("tracing the workload's reads ...", flush=True)
        reads = trace_reads(tmp, direct, f"{direct}/bench/python:plain")
        listing = os.path.join(tmp, "prioritized.txt")
        with open(listing, "w") as f:
            f.write("\n".join(reads) + "\n")
        run(CLI + ["convert", "--prioritized-files", listing, oci,
                   f"docker://{direct}/bench/python:esgz"], env=bench.conv_env)
        sizes = {tag: bench.image_bytes("python", tag) for tag in ("legacy", "esgz")}
        results.update(files_read=len(reads), image_bytes=sizes)

        bench.shape("python")
        shaped = bench.shaped
        runs = bench.runs
        for n in range(args.repeat):
            for name, tag, config in (("lazy+prefetch", "esgz", {}),
                                      ("lazy", "esgz", {"noprefetch": True}),
                                      ("lazy-plain", "plain", {})):
                lazy = Lazy(tmp, f"{name}.{n}", shaped, **config)
                bench.timed(name, lazy, f"{shaped}/bench/python:{tag}")
                if name == "lazy+prefetch":
                    warm = Lazy(tmp, f"local.{n}", direct)
                    shutil.copytree(os.path.join(lazy.dir, "cache"),
                                    os.path.join(warm.dir, "cache"))
                    try:
                        row = warm.timed_start(f"{direct}/bench/python:{tag}")
                    finally:
                        warm.unmount()
                    runs.setdefault("local", []).append(row)
                    print(f"{'local':14} {row['total_s']:6.2f} s (warm cache, no shaping)",
                          flush=True)
            if not args.no_podman_lazy:
                bench.timed("podman-lazy", PodmanLazy(tmp, f"podman-lazy.{n}", shaped),
                            f"{shaped}/bench/python:esgz")
            if not args.no_legacy:
                bench.timed("legacy", Podman(tmp, f"podman.{n}", shaped),
                            f"{shaped}/bench/python:legacy")
        rows = {name: median_row(r) for name, r in runs.items()}

        pre = rows["lazy+prefetch"]["fetched"]
        needed = pre.get("metadata", 0) + pre.get("prefetch", 0) + pre.get("on_demand", 0)
        bandwidth = args.mbit * 1e6 / 8
        floor_net = 4 * args.rtt_ms / 1000 + needed / bandwidth
        floor = floor_net + rows["local"]["total_s"]
        results.update(rows=rows, bytes_needed=needed, floor_network_s=floor_net, floor_s=floor)
        print()
        print(f"image: {sizes['legacy'] / 1e6:.1f} MB gzip, {sizes['esgz'] / 1e6:.1f} MB eStargz; "
              f"the workload reads {len(reads)} files, {needed / 1e6:.2f} MB of blob "
              f"(with the TOCs)")
        print(f"floor = 4 x {args.rtt_ms:g} ms + {needed / 1e6:.2f} MB / {args.mbit:g} Mbit/s "
              f"({floor_net:.2f} s) + local work {rows['local']['total_s']:.2f} s = "
              f"{floor:.2f} s")
        print(f"{'start':14} {'median s':>8} {'x floor':>8} {'x legacy':>9} {'MB fetched':>11}"
              f"  runs")
        legacy = rows.get("legacy", {}).get("total_s")
        for name in ("lazy+prefetch", "lazy", "lazy-plain", "podman-lazy", "legacy"):
            if name not in rows:
                continue
            row = rows[name]
            moved = row.get("link_bytes", 0) / 1e6
            ratio = f"{row['total_s'] / legacy:9.3f}" if legacy else f"{'-':>9}"
            print(f"{name:14} {row['total_s']:8.2f} {row['total_s'] / floor:8.2f} {ratio} "
                  f"{moved:11.2f}  {' '.join(f'{t:.2f}' for t in row['all_s'])}")
            row["x_floor"] = row["total_s"] / floor
            if legacy:
                row["x_legacy"] = row["total_s"] / legacy
        print()
        bench.write("prefetch_bench")


if __name__ == "__main__":
    main()
