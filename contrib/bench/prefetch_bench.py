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

Prints a table and writes JSON to contrib/bench/results/.  Needs root,
/dev/fuse, fuse-overlayfs 1.x, docker-registry, skopeo, podman and runc.

The set-up shared with optimize_bench.py and suite.py lives here too: ``Lazy``,
``Podman``, ``PodmanLazy`` (the ways to start the image), ``bench_args`` (the
common options) and ``Bench`` (image, registry, shaped link, timed runs, JSON).
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "plugin"))
sys.path.insert(0, os.path.join(ROOT, "contrib"))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import images  # noqa: E402
from netshape import Shaper, verify  # noqa: E402
from stargz_overlay.metrics import read_snapshots  # noqa: E402
from tests.registryfixture import Registry  # noqa: E402

WORKLOAD = ["/usr/bin/python3", "-c", "print('hello')"]
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "plugin"))
CLI = [sys.executable, "-m", "stargz_overlay"]


def run(cmd, env=None, timeout=600, check=True, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         env=env or ENV, **kw)
    if check and res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def registries_conf(path, hosts):
    with open(path, "w") as f:
        for host in hosts:
            f.write(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    return path


class Lazy:
    """Mounts of an image through ``stargz-overlay mount --image``."""

    def __init__(self, tmp, name, host, **config):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        conf = registries_conf(os.path.join(self.dir, "registries.conf"), [host])
        with open(os.path.join(self.dir, "auth.json"), "w") as f:
            f.write("{}")
        keys = {"cache_dir": os.path.join(self.dir, "cache"),
                "log_file": os.path.join(self.dir, "plugin.log"),
                "metrics_dir": os.path.join(self.dir, "metrics"), "metrics_period_sec": 0.5,
                "log_level": "debug" if config.get("log_calls") else "info", **config}
        lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
        lines += ["[registry]", f"insecure = [{json.dumps(host)}]",
                  f"registries_conf = {json.dumps(conf)}",
                  f"auth_file = {json.dumps(os.path.join(self.dir, 'auth.json'))}"]
        self.config = os.path.join(self.dir, "config.toml")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.env = dict(ENV, CONTAINERS_REGISTRIES_CONF=conf)
        self.mnt = None

    def mount(self, ref, name="mnt"):
        self.mnt = os.path.join(self.dir, name)
        os.makedirs(self.mnt, exist_ok=True)
        run(CLI + ["mount", "--config", self.config, "--state-dir",
                   os.path.join(self.dir, "state"), "--image", f"docker://{ref}", self.mnt],
            env=self.env)

    def start(self):
        out = run(["chroot", self.mnt, *WORKLOAD])
        if out.stdout.strip() != "hello":
            raise SystemExit(f"the workload printed {out.stdout!r}")

    def unmount(self):
        if self.mnt and os.path.ismount(self.mnt):
            run(["fusermount3", "-u", self.mnt], check=False)
            deadline = time.monotonic() + 10
            while os.path.ismount(self.mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.mnt = None

    cleanup = unmount

    def metrics(self):
        snaps = read_snapshots(os.path.join(self.dir, "metrics"))
        fetched = {}
        for snap in snaps:
            for layer in snap["layers"]:
                for kind, n in layer["fetched"].items():
                    fetched[kind] = fetched.get(kind, 0) + n
        return fetched

    def timed_start(self, ref):
        started = time.monotonic()
        self.mount(ref)
        mounted = time.monotonic()
        self.start()
        done = time.monotonic()
        time.sleep(0.8)                       # one more metrics write
        return {"total_s": done - started, "mount_s": mounted - started,
                "run_s": done - mounted, "fetched": self.metrics()}


class Podman:
    """podman with a private graph root (the host's store is never touched)."""

    def __init__(self, tmp, name, host):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        conf = os.path.join(self.dir, "storage.conf")
        with open(conf, "w") as f:
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{self.dir}/graph"\n'
                    f'runroot = "{self.dir}/run"\n')
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=conf,
                        CONTAINERS_REGISTRIES_CONF=registries_conf(
                            os.path.join(self.dir, "registries.conf"), [host]))

    def __call__(self, *args, timeout=600):
        return run(["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                    "--events-backend", "none", *args], env=self.env, timeout=timeout)

    def timed_start(self, ref, command=WORKLOAD, timeout=600):
        """pull + run of ``command`` (``()``: the image's own Cmd) -> timings; the
        output must be ``hello``.  The container is named and removed by ``cleanup``,
        not ``--rm``: podman 4.3 can lose the exit code of a --rm container under load."""
        started = time.monotonic()
        self("pull", "-q", ref, timeout=timeout)
        pulled = time.monotonic()
        out = self("run", "--name", "bench", "--network", "none", "--ulimit",
                   "nofile=1024:1024", "--ulimit", "nproc=1024:1024", ref, *command,
                   timeout=timeout)
        done = time.monotonic()
        if out.stdout.strip() != "hello":
            raise SystemExit(f"the workload printed {out.stdout[-200:]!r}")
        return {"total_s": done - started, "pull_s": pulled - started, "run_s": done - pulled}

    def cleanup(self):
        subprocess.run(["podman", "--runtime", "runc", "rm", "-af"], env=self.env,
                       capture_output=True)
        subprocess.run(["podman", "rmi", "-af"], env=self.env, capture_output=True)
        subprocess.run(["podman", "system", "reset", "-f"], env=self.env, capture_output=True,
                       timeout=120)


class PodmanLazy(Podman):
    """podman with ``stargz-overlay store`` as its Additional Layer Store and the mount
    program: ``podman pull`` + ``run`` of an eStargz image fetch only what runs."""

    def __init__(self, tmp, name, host):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        self.lazy = Lazy(self.dir, "plugin", host)
        self.als = os.path.join(self.dir, "als")
        wrapper = os.path.join(self.dir, "stargz-overlay-mount")
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nPYTHONPATH={os.path.join(ROOT, 'plugin')} exec "
                    f"{sys.executable} -m stargz_overlay.mount_program \"$@\"\n")
        os.chmod(wrapper, 0o755)
        conf = os.path.join(self.dir, "storage.conf")
        # (a short run root: conmon waits 20 s for long ones)
        self.runroot = tempfile.mkdtemp(prefix="szb-", dir="/tmp")
        with open(conf, "w") as f:
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{self.dir}/graph"\n'
                    f'runroot = "{self.runroot}"\n[storage.options]\n'
                    f'additionallayerstores = ["{self.als}/store:ref"]\n'
                    f'[storage.options.overlay]\nmount_program = "{wrapper}"\n')
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=conf,
                        CONTAINERS_REGISTRIES_CONF=registries_conf(
                            os.path.join(self.dir, "registries.conf"), [host]))
        run(CLI + ["store", self.als, "--state-dir", os.path.join(self.dir, "state"),
                   "--config", self.lazy.config], env=self.lazy.env)

    def cleanup(self):
        super().cleanup()
        run(CLI + ["store", "--unmount", self.als], check=False)
        if os.path.ismount(self.als):
            subprocess.run(["fusermount3", "-uz", self.als], capture_output=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


def median_row(rows):
    """The run with the median total time (its other figures with it)."""
    ordered = sorted(rows, key=lambda r: r["total_s"])
    row = dict(ordered[len(ordered) // 2])
    row["all_s"] = [round(r["total_s"], 3) for r in rows]
    return row


def bench_args(doc):
    """The options every benchmark of the python image takes (add its own to it)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--image", choices=("python-full", "python"), default="python-full")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each start (median)")
    parser.add_argument("--no-legacy", action="store_true", help="skip podman pull + run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


class Bench:
    """One run of a benchmark (a context manager: everything is stopped and removed
    on exit unless ``--keep``).

    ``push_legacy()`` builds ``args.image`` offline (``oci``), starts a local
    docker-registry (``direct``) and pushes the image there as gzip
    (``bench/python:legacy``); ``conv_env`` converts into that registry.
    ``shape()`` puts netshape's shaped link (``shaped``) in front of it and
    measures it.  ``timed(name, runner, ref)`` times one start through the link
    into ``runs``; ``write(prefix)`` saves ``results`` as JSON.
    """

    def __init__(self, args, prefix):
        if os.geteuid() != 0:
            raise SystemExit("run as root (FUSE mounts, chroot, podman)")
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.reg = self.shaper = None
        self.results = {"rtt_ms": args.rtt_ms, "mbit": args.mbit, "workload": WORKLOAD,
                        "image": args.image, "repeat": args.repeat}
        self.runs = {}

    def __enter__(self):
        return self

    def push_legacy(self):
        print(f"building the {self.args.image} image ...", flush=True)
        self.oci = images.build(self.args.image, os.path.join(self.tmp, "oci"))
        self.reg = Registry(self.tmp)
        self.direct = self.reg.host
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", self.oci,
             f"docker://{self.direct}/bench/python:legacy"])
        self.conv_env = dict(ENV, CONTAINERS_REGISTRIES_CONF=registries_conf(
            os.path.join(self.tmp, "registries.conf"), [self.direct]))

    def shape(self):
        host, port = self.direct.rsplit(":", 1)
        self.shaper = Shaper((host, int(port)), rtt_ms=self.args.rtt_ms, mbit=self.args.mbit)
        self.shaped = self.shaper.start()
        legacy = json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                 f"docker://{self.direct}/bench/python:legacy"]).stdout)
        big = max(legacy["layers"], key=lambda x: x["size"])["digest"]
        shost, sport = self.shaped.rsplit(":", 1)
        self.results["link"] = link = verify(shost, int(sport), "/v2/",
                                             f"/v2/bench/python/blobs/{big}")
        print(f"shaped link {self.shaped}: measured {link['rtt_ms']} ms RTT, "
              f"{link['mbit']} Mbit/s", flush=True)

    def timed(self, name, runner, ref, width=14):
        """``runner.timed_start(ref)`` (then its clean-up) with the bytes it moved over
        the shaped link; the row is added to ``runs[name]`` and printed."""
        before = self.shaper.bytes_down
        try:
            row = runner.timed_start(ref)
        finally:
            runner.cleanup()
        row["link_bytes"] = self.shaper.bytes_down - before
        self.runs.setdefault(name, []).append(row)
        print(f"{name:{width}} {row['total_s']:6.2f} s", flush=True)
        return row

    def write(self, prefix):
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        out = os.path.join(HERE, "results", f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(out, "w") as f:
            json.dump(self.results, f, indent=2)
        print(f"written to {os.path.relpath(out, ROOT)}")

    def __exit__(self, *exc):
        if self.shaper is not None:
            self.shaper.stop()
        if self.reg is not None:
            self.reg.stop()
        if not self.args.keep:
            for sub in os.listdir(self.tmp):
                mnt = os.path.join(self.tmp, sub, "mnt")
                if os.path.ismount(mnt):
                    subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"kept {self.tmp}")


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
    parser = bench_args(__doc__)
    parser.add_argument("--no-podman-lazy", action="store_true",
                        help="skip podman through the layer store and mount program")
    args = parser.parse_args()
    with Bench(args, "prefetch-bench-") as bench:
        bench.push_legacy()
        tmp, oci, direct, results = bench.tmp, bench.oci, bench.direct, bench.results
        run(CLI + ["convert", oci, f"docker://{direct}/bench/python:plain"], env=bench.conv_env)
        print("tracing the workload's reads ...", flush=True)
        reads = trace_reads(tmp, direct, f"{direct}/bench/python:plain")
        listing = os.path.join(tmp, "prioritized.txt")
        with open(listing, "w") as f:
            f.write("\n".join(reads) + "\n")
        run(CLI + ["convert", "--prioritized-files", listing, oci,
                   f"docker://{direct}/bench/python:esgz"], env=bench.conv_env)
        sizes = {tag: sum(layer["size"] for layer in json.loads(run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false",
             f"docker://{direct}/bench/python:{tag}"]).stdout)["layers"])
            for tag in ("legacy", "esgz")}
        results.update(files_read=len(reads), image_bytes=sizes)

        bench.shape()
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
