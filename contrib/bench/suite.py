#!/usr/bin/env python3
"""HelloBench-style cold starts through real podman: legacy pull vs lazy eStargz, one command.

Builds contrib/images.py's offline Debian images (``python`` prints hello, ``gcc``
compiles and runs hello world, ``bigdata`` is python reading 256 MiB of
incompressible data), pushes each to a local docker-registry as plain gzip
(skopeo), as eStargz (``stargz-overlay convert``) and as optimised eStargz
(``convert --analyze``), and puts the registry behind contrib/bench/netshape.py
(a TCP proxy adding latency and a bandwidth cap; this kernel has no netem),
measured with its ``verify()`` and printed.

Modes (each sample: fresh podman storage and plugin cache, page cache dropped):

  legacy       podman pull (gzip) + podman run
  lazy         podman pull + run of the eStargz image through the layer store
               (``stargz-overlay store``) and the mount program
  lazy-opt     the same with the ``--analyze`` optimised image (prefetch)

The image's own Cmd is run; the time is pull + create + run until the container
printed its ``hello`` and exited.  Samples run in shuffled order; median and p95
are reported, with bytes and HTTP requests counted at the proxy, the network
floor (4 RTT + bytes needed / bandwidth, bytes needed = TOCs + files read, from
the plugin's metrics of the ``lazy`` mode) and each lazy mode as a ratio of the
legacy median of the same run.  A global deadline (default 30 min) skips the
remaining samples with a message.

    sudo contrib/bench/run [--samples 5 | --quick] [--rtt-ms 20] [--mbit 100] \\
        [--images python,gcc,bigdata] [--deadline-min 30]

Writes a text table, JSON and (when matplotlib imports) a PNG to
contrib/bench/results/.  Needs root, /dev/fuse, fuse-overlayfs 1.x,
docker-registry, skopeo, podman and runc.
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prefetch_bench import (CLI, ENV, HERE, ROOT, Podman, PodmanLazy,  # noqa: E402
                            registries_conf, run)
from netshape import Shaper, verify  # noqa: E402
from stargz_overlay.metrics import read_snapshots  # noqa: E402
import images  # noqa: E402  (contrib/ is on the path via prefetch_bench)
from tests.registryfixture import Registry  # noqa: E402

IMAGES = ("python", "gcc", "bigdata")
MODES = (("legacy", "legacy"), ("lazy", "esgz"), ("lazy-opt", "opt"))
TARGETS = {"python_x_legacy": 0.15, "bytes_x_needed": 1.3, "bigdata_x_legacy": 1.2}
REQUEST_LINE = re.compile(rb"(?:GET|HEAD|POST|PUT|PATCH|DELETE) /\S* HTTP/1\.[01]\r\n")


class _CountingReader:
    """Wraps the client->registry stream and counts HTTP request lines."""

    def __init__(self, reader, shaper):
        self.reader, self.shaper, self.tail = reader, shaper, b""

    async def read(self, n):
        data = await self.reader.read(n)
        text = self.tail + data
        self.shaper.requests += len(REQUEST_LINE.findall(text))
        cut = text.rfind(b"\r\n")       # keep an unfinished line for the next read
        self.tail = text[cut + 2:][-512:] if cut >= 0 else text[-512:]
        return data


class CountingShaper(Shaper):
    """netshape's link, also counting the HTTP requests that cross it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.requests = 0

    async def _pump(self, reader, writer, direction, counter):
        if counter == "bytes_up":
            reader = _CountingReader(reader, self)
        return await super()._pump(reader, writer, direction, counter)


class MetricsWatcher(threading.Thread):
    """Keeps the last snapshot of every plugin daemon in ``directory`` (each daemon
    removes its file when it exits, e.g. when ``podman run --rm`` unmounts)."""

    def __init__(self, directory):
        super().__init__(daemon=True)
        self.directory, self.last, self.halt = directory, {}, threading.Event()

    def run(self):
        while not self.halt.wait(0.2):
            for snap in read_snapshots(self.directory):
                self.last[snap.get("pid")] = snap

    def fetched(self):
        self.halt.set()
        self.join(5)
        out = {}
        for snap in self.last.values():
            for layer in snap.get("layers", ()):
                for kind, n in layer.get("fetched", {}).items():
                    out[kind] = out.get(kind, 0) + n
        return out


def drop_caches():
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def podman_start(podman, ref, timeout):
    """pull + run (the image's Cmd) -> timings; checks the output line."""
    started = time.monotonic()
    podman("pull", "-q", ref, timeout=timeout)
    pulled = time.monotonic()
    out = podman("run", "--rm", "--network", "none", "--ulimit", "nofile=1024:1024",
                 "--ulimit", "nproc=1024:1024", ref, timeout=timeout)
    done = time.monotonic()
    if out.stdout.strip().splitlines()[-1:] != ["hello"]:
        raise RuntimeError(f"the workload printed {out.stdout[-200:]!r}")
    return {"total_s": done - started, "pull_s": pulled - started, "run_s": done - pulled}


def percentile(values, q):
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def leftover_mounts(prefix):
    with open("/proc/mounts", encoding="utf-8") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def prepare(kind, tmp, direct, env):
    oci = images.build(kind, os.path.join(tmp, "oci", kind))
    run(["skopeo", "copy", "-q", "--dest-tls-verify=false", oci,
         f"docker://{direct}/bench/{kind}:legacy"])
    run(CLI + ["convert", oci, f"docker://{direct}/bench/{kind}:esgz"], env=env, timeout=1200)
    run(CLI + ["convert", "--analyze", oci, f"docker://{direct}/bench/{kind}:opt"], env=env,
        timeout=1200)
    sizes = {}
    for tag in ("legacy", "esgz", "opt"):
        manifest = json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                   f"docker://{direct}/bench/{kind}:{tag}"]).stdout)
        sizes[tag] = sum(layer["size"] for layer in manifest["layers"])
        if tag == "legacy":
            big = max(manifest["layers"], key=lambda x: x["size"])["digest"]
    return sizes, big


def sample(kind, mode, tag, n, tmp, shaper, shaped, timeout):
    cls = Podman if mode == "legacy" else PodmanLazy
    cached = drop_caches()
    podman = cls(tmp, f"{kind}.{mode}.{n}", shaped)      # fresh storage and plugin cache
    bytes0, req0 = shaper.bytes_down, shaper.requests
    watcher = None
    if mode != "legacy":
        watcher = MetricsWatcher(os.path.join(podman.lazy.dir, "metrics"))
        watcher.start()
    try:
        row = podman_start(podman, f"{shaped}/bench/{kind}:{tag}", timeout)
        row["link_bytes"] = shaper.bytes_down - bytes0
        row["requests"] = shaper.requests - req0
        row["page_cache_dropped"] = cached
        if watcher is not None:
            time.sleep(0.6)                              # one more metrics write
            row["fetched"] = watcher.fetched()
    finally:
        if watcher is not None:
            watcher.halt.set()
        podman.cleanup()
        shutil.rmtree(podman.dir, ignore_errors=True)
    return row


def summarise(results, args):
    """Median/p95 per case, ratios against legacy, floor and target verdicts."""
    bandwidth = args.mbit * 1e6 / 8
    table = {}
    for kind in results["images"]:
        runs = results["samples"].get(kind, {})
        lazy_rows = runs.get("lazy", [])
        needed = None
        if lazy_rows:
            per = [r["fetched"].get("metadata", 0) + r["fetched"].get("on_demand", 0)
                   + r["fetched"].get("prefetch", 0) for r in lazy_rows]
            needed = sorted(per)[len(per) // 2]
        floor = 4 * args.rtt_ms / 1000 + needed / bandwidth if needed else None
        legacy = runs.get("legacy")
        legacy_med = percentile([r["total_s"] for r in legacy], 0.5) if legacy else None
        for mode, _ in MODES:
            rows = runs.get(mode)
            if not rows:
                continue
            totals = [r["total_s"] for r in rows]
            med = percentile(totals, 0.5)
            link = sorted(r["link_bytes"] for r in rows)[len(rows) // 2]
            entry = {"n": len(rows), "median_s": med, "p95_s": percentile(totals, 0.95),
                     "all_s": [round(t, 3) for t in totals],
                     "pull_median_s": percentile([r["pull_s"] for r in rows], 0.5),
                     "link_bytes": link,
                     "requests": sorted(r["requests"] for r in rows)[len(rows) // 2],
                     "x_legacy": med / legacy_med if legacy_med else None,
                     "x_floor": med / floor if floor else None,
                     "bytes_x_needed": link / needed if needed and mode != "legacy" else None}
            table.setdefault(kind, {})[mode] = entry
        table.setdefault(kind, {})["_"] = {"needed_bytes": needed, "floor_s": floor}
    targets = {}
    py = table.get("python", {})
    if "lazy-opt" in py and py["lazy-opt"]["x_legacy"] is not None:
        best = min(py[m]["x_legacy"] for m in ("lazy", "lazy-opt") if m in py)
        targets["python hello <= 0.15x legacy"] = (best, best <= TARGETS["python_x_legacy"])
    ratios = [table[k]["lazy"]["bytes_x_needed"] for k in table
              if "lazy" in table[k] and table[k]["lazy"]["bytes_x_needed"]]
    if ratios:
        worst = max(ratios)
        targets["lazy bytes <= 1.3x (files read + TOCs)"] = (worst,
                                                              worst <= TARGETS["bytes_x_needed"])
    big = table.get("bigdata", {})
    mine = [big[m]["x_legacy"] for m in ("lazy", "lazy-opt")
            if m in big and big[m]["x_legacy"] is not None]
    if mine:
        targets["bigdata no worse than 1.2x legacy"] = (max(mine),
                                                        max(mine) <= TARGETS["bigdata_x_legacy"])
    return table, targets


def render(results, table, targets):
    link = results.get("link", {})
    lines = [f"machine: {results['machine']}",
             f"link: netshape proxy, configured {results['rtt_ms']:g} ms RTT / "
             f"{results['mbit']:g} Mbit/s; measured {link.get('rtt_ms')} ms RTT, "
             f"{link.get('mbit')} Mbit/s",
             f"samples per case: {results['samples_per_case']} (shuffled, seed "
             f"{results['seed']}); page cache dropped: {results['page_cache_dropped']}", ""]
    head = (f"{'image':8} {'mode':9} {'n':>2} {'median s':>8} {'p95 s':>7} {'x legacy':>8} "
            f"{'x floor':>7} {'MB link':>8} {'reqs':>5} {'x need':>6}")
    lines += [head, "-" * len(head)]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for kind, modes in table.items():
        meta = modes["_"]
        for mode, _ in MODES:
            if mode not in modes:
                lines.append(f"{kind:8} {mode:9}  (skipped)")
                continue
            e = modes[mode]
            lines.append(f"{kind:8} {mode:9} {e['n']:2d} {e['median_s']:8.2f} {e['p95_s']:7.2f} "
                         f"{fmt(e['x_legacy'], '8.3f'):>8} {fmt(e['x_floor'], '7.2f'):>7} "
                         f"{e['link_bytes'] / 1e6:8.2f} {e['requests']:5d} "
                         f"{fmt(e['bytes_x_needed'], '6.2f'):>6}")
        if meta["floor_s"]:
            lines.append(f"{kind:8} {'floor':9}    {meta['floor_s']:8.2f}   (4 RTT + "
                         f"{meta['needed_bytes'] / 1e6:.2f} MB needed / bandwidth)")
        sizes = results["image_bytes"].get(kind)
        if sizes:
            lines.append(f"{kind:8} sizes: gzip {sizes['legacy'] / 1e6:.1f} MB, eStargz "
                         f"{sizes['esgz'] / 1e6:.1f} MB, optimised {sizes['opt'] / 1e6:.1f} MB")
    lines.append("")
    for name, (value, ok) in targets.items():
        lines.append(f"target {name}: {value:.3f} -> {'met' if ok else 'NOT met'}")
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def plot(table, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib for one)"
    kinds = list(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, (mode, _) in enumerate(MODES):
        vals = [table[k].get(mode, {}).get("median_s", 0) for k in kinds]
        ax.bar([x + i * width for x in range(len(kinds))], vals, width, label=mode)
    ax.set_xticks([x + width for x in range(len(kinds))], kinds)
    ax.set_ylabel("pull + create + run, median s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return f"plot written to {os.path.relpath(path, ROOT)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5, help="samples per case (>= 1)")
    parser.add_argument("--quick", action="store_true", help="2 samples per case")
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--images", default=",".join(IMAGES),
                        help="comma-separated subset of " + ",".join(IMAGES))
    parser.add_argument("--deadline-min", type=float, default=30.0,
                        help="stop (skipping what is left) this many minutes after start")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (FUSE mounts, podman, drop_caches)")
    kinds = [k for k in args.images.split(",") if k]
    if not kinds or any(k not in IMAGES for k in kinds):
        raise SystemExit(f"--images: choose from {','.join(IMAGES)}")
    samples = 2 if args.quick else max(1, args.samples)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    deadline = time.monotonic() + args.deadline_min * 60
    left = lambda: deadline - time.monotonic()  # noqa: E731
    tmp = tempfile.mkdtemp(prefix="bench-suite-")
    reg = shaper = None
    results = {"machine": f"{os.uname().sysname} {os.uname().release} {os.uname().machine}, "
                          f"{os.cpu_count()} cpus",
               "rtt_ms": args.rtt_ms, "mbit": args.mbit, "samples_per_case": samples,
               "seed": seed, "images": [], "image_bytes": {}, "samples": {}, "notes": [],
               "page_cache_dropped": None, "targets_set": TARGETS}
    try:
        reg = Registry(tmp)
        direct = reg.host
        env = dict(ENV, CONTAINERS_REGISTRIES_CONF=registries_conf(
            os.path.join(tmp, "registries.conf"), [direct]))
        big_blob = None
        for kind in kinds:
            if left() < 300:
                results["notes"].append(f"deadline: {kind} image not built, skipped")
                print(results["notes"][-1], flush=True)
                continue
            print(f"building and pushing {kind} (gzip, eStargz, eStargz --analyze) ...",
                  flush=True)
            started = time.monotonic()
            results["image_bytes"][kind], blob = prepare(kind, tmp, direct, env)
            results["images"].append(kind)
            print(f"  {time.monotonic() - started:.0f} s", flush=True)
            if kind == "python":
                big_blob = blob
            big_blob = big_blob or blob

        host, port = direct.rsplit(":", 1)
        shaper = CountingShaper((host, int(port)), rtt_ms=args.rtt_ms, mbit=args.mbit)
        shaped = shaper.start()
        shost, sport = shaped.rsplit(":", 1)
        probe = results["images"][0] if results["images"] else None
        if probe is None:
            raise SystemExit("no image was built before the deadline")
        results["link"] = link = verify(shost, int(sport), "/v2/",
                                        f"/v2/bench/{probe}/blobs/{big_blob}")
        print(f"shaped link {shaped} (netshape proxy): configured {args.rtt_ms:g} ms RTT, "
              f"{args.mbit:g} Mbit/s; measured {link['rtt_ms']} ms RTT, {link['mbit']} Mbit/s",
              flush=True)

        plan = [(k, m, t, n) for k in results["images"] for m, t in MODES
                for n in range(samples)]
        random.Random(seed).shuffle(plan)
        dropped, retried = [], set()
        for i, (kind, mode, tag, n) in enumerate(plan):
            if left() < 60:
                rest = len(plan) - i
                results["notes"].append(f"deadline: {rest} remaining samples skipped")
                print(results["notes"][-1], flush=True)
                break
            try:
                row = sample(kind, mode, tag, n, tmp, shaper, shaped,
                             timeout=max(30, int(left())))
            except (RuntimeError, subprocess.TimeoutExpired, SystemExit) as exc:
                msg = f"{kind}/{mode} sample {n} failed: {str(exc).strip()[-300:]}"
                if (kind, mode, n) not in retried:
                    retried.add((kind, mode, n))
                    plan.append((kind, mode, tag, n))
                    msg += " (retried once at the end)"
                results["notes"].append(msg)
                print(msg, flush=True)
                continue
            dropped.append(row["page_cache_dropped"])
            results["samples"].setdefault(kind, {}).setdefault(mode, []).append(row)
            print(f"[{i + 1}/{len(plan)}] {kind:8} {mode:9} {row['total_s']:7.2f} s "
                  f"{row['link_bytes'] / 1e6:8.2f} MB {row['requests']:4d} requests",
                  flush=True)
        results["page_cache_dropped"] = all(dropped) if dropped else None

        table, targets = summarise(results, args)
        results["table"] = table
        results["targets"] = {k: {"value": v, "met": ok} for k, (v, ok) in targets.items()}
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = os.path.join(HERE, "results", f"suite-{stamp}")
        results["plot"] = plot(table, base + ".png")
        text = render(results, table, targets)
        print("\n" + text + results["plot"])
        with open(base + ".txt", "w") as f:
            f.write(text)
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=2)
        print(f"written to {os.path.relpath(base, ROOT)}.txt/.json")
        return 0
    finally:
        if shaper is not None:
            shaper.stop()
        if reg is not None:
            reg.stop()
        for point in sorted(leftover_mounts(tmp), reverse=True):
            subprocess.run(["fusermount3", "-uz", point], capture_output=True)
            subprocess.run(["umount", "-l", point], capture_output=True)
        still = leftover_mounts(tmp)
        if still:
            print(f"warning: mounts left under {tmp}: {still}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
