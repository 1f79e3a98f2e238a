#!/usr/bin/env python3
"""Start time of the demo python image by optimization: legacy gzip (podman pull +
run), eStargz unoptimized, ``convert --analyze`` (inferred startup files) and
``convert --optimize`` (recorded startup files), in the same run over the same
shaped link.

The image is contrib/images.py's Debian python image (``--image python-gcc``
adds the unread gcc toolchain layer).  It is pushed as gzip with skopeo and
converted three times by ``stargz-overlay convert``.  Lazy starts are
``stargz-overlay mount --image`` (prefetch on, fresh cache each run) +
``chroot MNT python3 -c "print('hello')"``; the legacy start is ``podman pull``
+ ``podman run`` with a fresh private storage.  Everything timed goes through
contrib/bench/netshape.py (default 20 ms RTT, 100 Mbit/s).  The median of
``--repeat`` runs is reported; the target is ``analyze`` within 1.2x of
``recorded``.

    sudo .venv/bin/python contrib/bench/optimize_bench.py [--rtt-ms 20] [--mbit 100] \\
        [--image python|python-gcc] [--repeat 3]

Prints a table and writes JSON to contrib/bench/results/.  Needs root, /dev/fuse,
fuse-overlayfs 1.x, docker-registry, skopeo, podman and runc.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefetch_bench import (CLI, ENV, HERE, ROOT, WORKLOAD, Lazy, Podman,  # noqa: E402
                            build_image, median_row, registries_conf, run)
from netshape import Shaper, verify  # noqa: E402
from tests.registryfixture import Registry  # noqa: E402

VARIANTS = (("plain", []), ("analyze", ["--analyze"]), ("recorded", ["--optimize"]))
TARGET = 1.2


def convert(oci, dest, flags, env):
    """Convert; returns the number of startup files the converter prioritized."""
    res = run(CLI + ["convert", *flags, oci, dest], env=env)
    counts = [int(n) for n in re.findall(r"(\d+) (?:startup files|files read)", res.stderr)]
    return sum(counts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--image", choices=("python", "python-gcc"), default="python")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each start (median)")
    parser.add_argument("--no-legacy", action="store_true", help="skip podman pull + run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts, chroot, podman)")
    tmp = tempfile.mkdtemp(prefix="optimize-bench-")
    reg = shaper = None
    results = {"rtt_ms": args.rtt_ms, "mbit": args.mbit, "workload": WORKLOAD,
               "image": args.image, "repeat": args.repeat}
    try:
        print(f"building the {args.image} image ...", flush=True)
        oci = build_image(args.image, os.path.join(tmp, "oci"))
        reg = Registry(tmp)
        direct = reg.host
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", oci,
             f"docker://{direct}/bench/python:legacy"])
        env = dict(ENV, CONTAINERS_REGISTRIES_CONF=registries_conf(
            os.path.join(tmp, "registries.conf"), [direct]))
        files, convert_s = {}, {}
        for tag, flags in VARIANTS:
            print(f"converting: {tag} ...", flush=True)
            started = time.monotonic()
            files[tag] = convert(oci, f"docker://{direct}/bench/python:{tag}", flags, env)
            convert_s[tag] = time.monotonic() - started
        results.update(startup_files=files, convert_s=convert_s)

        host, port = direct.rsplit(":", 1)
        shaper = Shaper((host, int(port)), rtt_ms=args.rtt_ms, mbit=args.mbit)
        shaped = shaper.start()
        legacy = json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                 f"docker://{direct}/bench/python:legacy"]).stdout)
        big = max(legacy["layers"], key=lambda x: x["size"])["digest"]
        shost, sport = shaped.rsplit(":", 1)
        results["link"] = link = verify(shost, int(sport), "/v2/",
                                        f"/v2/bench/python/blobs/{big}")
        print(f"shaped link {shaped}: measured {link['rtt_ms']} ms RTT, {link['mbit']} Mbit/s",
              flush=True)

        runs = {}
        for n in range(args.repeat):
            for tag, _ in VARIANTS:
                lazy = Lazy(tmp, f"{tag}.{n}", shaped)
                before = shaper.bytes_down
                try:
                    row = lazy.timed_start(f"{shaped}/bench/python:{tag}")
                finally:
                    lazy.unmount()
                row["link_bytes"] = shaper.bytes_down - before
                runs.setdefault(tag, []).append(row)
                print(f"{tag:10} {row['total_s']:6.2f} s", flush=True)
            if not args.no_legacy:
                podman = Podman(tmp, f"legacy.{n}", shaped)
                before = shaper.bytes_down
                try:
                    row = podman.timed_start(f"{shaped}/bench/python:legacy")
                finally:
                    podman.cleanup()
                row["link_bytes"] = shaper.bytes_down - before
                runs.setdefault("legacy", []).append(row)
                print(f"{'legacy':10} {row['total_s']:6.2f} s", flush=True)
        rows = {name: median_row(r) for name, r in runs.items()}
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
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        out = os.path.join(HERE, "results",
                           f"optimize_bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"written to {os.path.relpath(out, ROOT)}")
        return 0 if verdict else 1
    finally:
        if shaper is not None:
            shaper.stop()
        if reg is not None:
            reg.stop()
        if not args.keep:
            for sub in os.listdir(tmp):
                mnt = os.path.join(tmp, sub, "mnt")
                if os.path.ismount(mnt):
                    subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
