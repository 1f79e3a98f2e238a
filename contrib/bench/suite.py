#!/usr/bin/env python3
"""HelloBench-style cold starts through real podman: legacy pull vs lazy eStargz, one command.

Builds contrib/images.py's offline Debian images (``python`` prints hello from a
minimal root, ``python-full`` prints it from python on a build toolchain like the
official python image that HelloBench pulls, ``gcc`` compiles and runs hello
world, ``bigdata`` is python reading 256 MiB of incompressible data), pushes
each to a local docker-registry as plain gzip (skopeo), as eStargz
(``stargz-overlay convert``) and as optimised eStargz (``convert --analyze``),
and puts the registry behind contrib/bench/netshape.py
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
floor (4 RTT + bytes needed / bandwidth) and each lazy mode as a ratio of the
legacy median of the same run.  Bytes needed are each layer's TOC member and
footer plus the compressed members of the files the workload opens, taken
from one extra, untimed ``lazy`` start per image whose mounts write the
plugin's access record (``record_file``).  A global deadline (default 30 min) skips the
remaining samples with a message.

    sudo contrib/bench/run [--samples 5 | --quick] [--rtt-ms 20] [--mbit 100] \\
        [--images python,python-full,gcc,bigdata] [--deadline-min 30]

Writes a text table, JSON and (when matplotlib imports) a PNG to
contrib/bench/results/ (``--out DIR`` elsewhere).  Needs root, /dev/fuse, fuse-overlayfs 1.x,
docker-registry, skopeo, podman and runc.  The set-up (registry, shaped link, podman
storages, clean-up) is contrib/bench/benchenv.py's, shared with the other benchmarks.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchenv import CLI, Bench, Podman, PodmanLazy, bench_args, run  # noqa: E402
from netshape import Shaper  # noqa: E402
from stargz_overlay.access_log import read_accesses  # noqa: E402
from stargz_overlay.errors import StargzError  # noqa: E402

IMAGES = ("python", "python-full", "gcc", "bigdata")
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


def record_config(podman, record):
    """Make ``podman``'s later mounts append every access to ``record`` (the store is
    already running; the mount program reads the configuration at each mount)."""
    with open(podman.lazy.config, encoding="utf-8") as f:
        text = f.read()
    with open(podman.lazy.config, "w", encoding="utf-8") as f:
        f.write(f"record_file = {json.dumps(record)}\n" + text)


def needed_bytes(direct, conf_path, kind, record):
    """Bytes a lazy start cannot avoid: each layer's TOC member and footer, plus the
    compressed members (chunks) of every file the workload opened, once each."""
    from stargz_overlay.reader import StargzReader
    from stargz_overlay.registry import RegistryClient
    from stargz_overlay.registries_conf import RegistriesConf
    client = RegistryClient(registries_conf=RegistriesConf.load(conf_path))
    ref = f"{direct}/bench/{kind}:esgz"
    opened = {}
    for access in read_accesses(record):
        if access.op == "open":
            opened.setdefault(access.layer, set()).add(access.content)
    total = files = 0
    for layer in client.resolve(ref).layers:
        reader = StargzReader(client.blob_source(ref, layer.digest, layer.size))
        total += layer.size - reader.toc_offset
        members = set()
        for name in opened.get(layer.digest, ()):
            entry = reader.toc.lookup(name)
            if entry is not None and entry.type == "reg":
                files += 1
                members.update((c.offset, c.end) for c in entry.chunks)
        total += sum(end - start for start, end in members)
    return total, files


def drop_caches():
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def percentile(values, q):
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def prepare(bench, kind):
    """Image ``kind`` as ``bench/KIND:legacy`` (gzip), ``:esgz`` and ``:opt``
    (``convert --analyze``); returns the compressed size of each."""
    oci = bench.push(kind)
    target = f"docker://{bench.direct}/bench/{kind}"
    run(CLI + ["convert", oci, f"{target}:esgz"], env=bench.conv_env, timeout=1200)
    run(CLI + ["convert", "--analyze", oci, f"{target}:opt"], env=bench.conv_env, timeout=1200)
    return {tag: bench.image_bytes(kind, tag) for tag in ("legacy", "esgz", "opt")}


def sample(bench, kind, mode, tag, n, timeout, record=None):
    """One cold start with fresh storage and plugin cache; with ``record``, the
    mounts also write their access record there (an untimed sample)."""
    cls = Podman if mode == "legacy" else PodmanLazy
    tmp, shaper, shaped = bench.tmp, bench.shaper, bench.shaped
    cached = drop_caches()
    podman = cls(tmp, f"{kind}.{mode}.{n}", shaped)      # fresh storage and plugin cache
    if record is not None:
        record_config(podman, record)
    bytes0, req0 = shaper.bytes_down, shaper.requests
    try:
        row = podman.timed_start(f"{shaped}/bench/{kind}:{tag}", command=(), timeout=timeout)
        row["link_bytes"] = shaper.bytes_down - bytes0
        row["requests"] = shaper.requests - req0
        row["page_cache_dropped"] = cached
    finally:
        podman.cleanup()
        shutil.rmtree(podman.dir, ignore_errors=True)
    return row


def summarise(results, args):
    """Median/p95 per case, ratios against legacy, floor and target verdicts."""
    bandwidth = args.mbit * 1e6 / 8
    table = {}
    for kind in results["images"]:
        runs = results["samples"].get(kind, {})
        needed = results["needed"].get(kind, {}).get("bytes")
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
    for kind in ("python", "python-full"):
        py = table.get(kind, {})
        best = [py[m]["x_legacy"] for m in ("lazy", "lazy-opt")
                if m in py and py[m]["x_legacy"] is not None]
        if best:
            targets[f"{kind} hello <= 0.15x legacy"] = (min(best), min(best)
                                                        <= TARGETS["python_x_legacy"])
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
    head = (f"{'image':11} {'mode':9} {'n':>2} {'median s':>8} {'p95 s':>7} {'x legacy':>8} "
            f"{'x floor':>7} {'MB link':>8} {'reqs':>5} {'x need':>6}")
    lines += [head, "-" * len(head)]
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for kind, modes in table.items():
        meta = modes["_"]
        for mode, _ in MODES:
            if mode not in modes:
                lines.append(f"{kind:11} {mode:9}  (skipped)")
                continue
            e = modes[mode]
            lines.append(f"{kind:11} {mode:9} {e['n']:2d} {e['median_s']:8.2f} {e['p95_s']:7.2f} "
                         f"{fmt(e['x_legacy'], '8.3f'):>8} {fmt(e['x_floor'], '7.2f'):>7} "
                         f"{e['link_bytes'] / 1e6:8.2f} {e['requests']:5d} "
                         f"{fmt(e['bytes_x_needed'], '6.2f'):>6}")
        if meta["floor_s"]:
            lines.append(f"{kind:11} {'floor':9}    {meta['floor_s']:8.2f}   (4 RTT + "
                         f"{meta['needed_bytes'] / 1e6:.2f} MB needed / bandwidth)")
        sizes = results["image_bytes"].get(kind)
        if sizes:
            lines.append(f"{kind:11} sizes: gzip {sizes['legacy'] / 1e6:.1f} MB, eStargz "
                         f"{sizes['esgz'] / 1e6:.1f} MB, optimised {sizes['opt'] / 1e6:.1f} MB")
    lines.append("")
    for name, (value, ok) in targets.items():
        lines.append(f"target {name}: {value:.3f} -> {'met' if ok else 'NOT met'}")
    for note in results["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def plot(results, table, path):
    """Median pull + run per image and mode, each bar labelled with its ratio to legacy."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib for one)"
    kinds = list(table)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        modes = [m for m, _ in MODES if m in table[kind]]
        meds = [table[kind][m]["median_s"] for m in modes]
        p95s = [table[kind][m]["p95_s"] - table[kind][m]["median_s"] for m in modes]
        bars = ax.bar(modes, meds, yerr=[[0] * len(modes), p95s], capsize=3,
                      color=["#888888", "#4878cf", "#6acc65"][:len(modes)])
        for bar, mode, extra in zip(bars, modes, p95s):
            ratio = table[kind][mode]["x_legacy"]
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2,
                                               bar.get_height() + extra),
                            xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(m + p for m, p in zip(meds, p95s)) * 1.25)
        floor = table[kind]["_"]["floor_s"]
        if floor:
            ax.axhline(floor, color="black", linestyle=":", linewidth=1, label="network floor")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_title(kind)
    axes[0][0].set_ylabel("pull + create + run, s (median; bar to p95)")
    fig.suptitle(f"cold start through podman, {results['rtt_ms']:g} ms RTT / "
                 f"{results['mbit']:g} Mbit/s, {results['samples_per_case']} samples",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


def main():
    parser = bench_args(__doc__)
    parser.add_argument("--samples", type=int, default=5, help="samples per case (>= 1)")
    parser.add_argument("--quick", action="store_true", help="2 samples per case")
    parser.add_argument("--images", default=",".join(IMAGES),
                        help="comma-separated subset of " + ",".join(IMAGES))
    parser.add_argument("--deadline-min", type=float, default=30.0,
                        help="stop (skipping what is left) this many minutes after start")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    kinds = [k for k in args.images.split(",") if k]
    if not kinds or any(k not in IMAGES for k in kinds):
        raise SystemExit(f"--images: choose from {','.join(IMAGES)}")
    samples = 2 if args.quick else max(1, args.samples)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    deadline = time.monotonic() + args.deadline_min * 60
    left = lambda: deadline - time.monotonic()  # noqa: E731
    with Bench(args, "bench-suite-") as bench:
        results = bench.results
        results.update(machine=f"{os.uname().sysname} {os.uname().release} "
                               f"{os.uname().machine}, {os.cpu_count()} cpus",
                       samples_per_case=samples, seed=seed, images=[], image_bytes={},
                       samples={}, needed={}, notes=[], page_cache_dropped=None,
                       targets_set=TARGETS)
        bench.start_registry()
        for kind in kinds:
            if left() < 300:
                results["notes"].append(f"deadline: {kind} image not built, skipped")
                print(results["notes"][-1], flush=True)
                continue
            print(f"building and pushing {kind} (gzip, eStargz, eStargz --analyze) ...",
                  flush=True)
            started = time.monotonic()
            results["image_bytes"][kind] = prepare(bench, kind)
            results["images"].append(kind)
            print(f"  {time.monotonic() - started:.0f} s", flush=True)
        if not results["images"]:
            raise SystemExit("no image was built before the deadline")
        bench.shape("python" if "python" in results["images"] else results["images"][0],
                    shaper=CountingShaper)

        for kind in results["images"]:         # untimed: which files the workload opens
            record = os.path.join(bench.tmp, f"{kind}.record")
            try:
                sample(bench, kind, "lazy", "esgz", "record", timeout=max(30, int(left())),
                       record=record)
                need, files = needed_bytes(bench.direct, bench.registries_conf, kind, record)
            except (subprocess.TimeoutExpired, SystemExit, StargzError) as exc:
                results["notes"].append(f"{kind}: recording the files opened failed: "
                                        f"{str(exc).strip()[-300:]}")
                print(results["notes"][-1], flush=True)
                continue
            results["needed"][kind] = {"bytes": need, "files_opened": files}
            print(f"{kind}: the workload opens {files} files; TOCs + their members "
                  f"{need / 1e6:.2f} MB", flush=True)

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
                row = sample(bench, kind, mode, tag, n, timeout=max(30, int(left())))
            except (subprocess.TimeoutExpired, SystemExit) as exc:
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
            print(f"[{i + 1}/{len(plan)}] {kind:11} {mode:9} {row['total_s']:7.2f} s "
                  f"{row['link_bytes'] / 1e6:8.2f} MB {row['requests']:4d} requests",
                  flush=True)
        results["page_cache_dropped"] = all(dropped) if dropped else None

        table, targets = summarise(results, args)
        results["table"] = table
        results["targets"] = {k: {"value": v, "met": ok} for k, (v, ok) in targets.items()}
        base = bench.output("suite")
        results["plot"] = plot(results, table, base + ".png")
        text = render(results, table, targets)
        print("\n" + text + results["plot"])
        with open(base + ".txt", "w") as f:
            f.write(text)
        with open(base + ".json", "w") as f:
            json.dump(results, f, indent=2)
        print(f"written to {base}.txt/.json")
        return 0


if __name__ == "__main__":
    sys.exit(main())
