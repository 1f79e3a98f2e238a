"""The set-up every image benchmark here shares, written once.

``Bench`` is one run (a context manager): the root check, a temporary tree, a
local docker-registry (``direct``) with contrib/images.py's images pushed to it
as gzip, netshape's shaped link in front of it (``shaped``), the results JSON,
and a clean-up that leaves no server, mount or directory behind.  The ways to
start an image, each with state of its own under that tree:

  Lazy         ``stargz-overlay mount --image`` + ``chroot MNT python3 -c ...``
  Podman       podman with a private storage, containers.conf and registries.conf
  PodmanLazy   the same through ``stargz-overlay store`` (Additional Layer Store)
               and the mount program

``bench_args`` holds the options every benchmark takes, ``one_image_args`` adds
those of the benchmarks of one python image (prefetch_bench, optimize_bench).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _path in (os.path.join(ROOT, "plugin"), os.path.join(ROOT, "contrib"), ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)          # (the source tree's package, images.py, tests)

import images  # noqa: E402
from netshape import Shaper, verify  # noqa: E402
from stargz_overlay.metrics import read_snapshots  # noqa: E402
from stargz_overlay.store import index_path  # noqa: E402
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
    """A registries.conf marking ``hosts`` insecure (plain HTTP)."""
    with open(path, "w") as f:
        for host in hosts:
            f.write(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    return path


def mounts_under(directory):
    """Mount points below ``directory``, as /proc/mounts lists them."""
    prefix = os.path.join(directory, "")
    with open("/proc/mounts", encoding="utf-8") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    return [p for p in points if p.startswith(prefix)]


def unmount_all(directory):
    """Detach every mount below ``directory`` (deepest first; their FUSE daemons then
    exit) and warn about any that stays."""
    for point in sorted(mounts_under(directory), reverse=True):
        subprocess.run(["fusermount3", "-uz", point], capture_output=True)
        subprocess.run(["umount", "-l", point], capture_output=True)
    still = mounts_under(directory)
    if still:
        print(f"warning: mounts left under {directory}: {still}", file=sys.stderr)


def unmount_store(als):
    """Stop ``stargz-overlay store`` at ``als`` and remove its record (kept outside)."""
    run(CLI + ["store", "--unmount", als], check=False, timeout=60)
    if os.path.ismount(als):
        subprocess.run(["fusermount3", "-uz", als], capture_output=True)
    try:
        os.unlink(index_path(als))
    except OSError:
        pass


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
    """podman with a private graph root, run root and engine tmp_dir (the host's store
    and every other podman on the machine are never touched: ``system reset``, the
    clean-up, removes the tmp_dir, by default the shared /run/libpod, and all networks).
    ``storage`` adds lines to storage.conf."""

    def __init__(self, tmp, name, host, storage=""):
        self.dir = os.path.join(tmp, name)
        os.makedirs(self.dir)
        # short: conmon waits 20 s when the sockets' paths below it are too long
        self.runroot = tempfile.mkdtemp(prefix="szb-", dir="/tmp")
        conf = os.path.join(self.dir, "storage.conf")
        with open(conf, "w") as f:
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{self.dir}/graph"\n'
                    f'runroot = "{self.runroot}/run"\n{storage}')
        engine = os.path.join(self.dir, "containers.conf")
        with open(engine, "w") as f:
            f.write(f'[engine]\ntmp_dir = "{self.runroot}/tmp"\n'
                    f'[network]\nnetwork_config_dir = "{self.dir}/networks"\n')
        self.env = dict(os.environ, CONTAINERS_STORAGE_CONF=conf, CONTAINERS_CONF=engine,
                        CONTAINERS_REGISTRIES_CONF=registries_conf(
                            os.path.join(self.dir, "registries.conf"), [host]))

    def argv(self, *args):
        return ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                "--events-backend", "none", *args]

    def __call__(self, *args, timeout=600):
        return run(self.argv(*args), env=self.env, timeout=timeout)

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
        for args in (("rm", "-af", "-t", "0"), ("rmi", "-af"), ("system", "reset", "-f")):
            subprocess.run(self.argv(*args), env=self.env, capture_output=True, timeout=120)
        subprocess.run(["umount", "-R", os.path.join(self.dir, "graph", "overlay")],
                       capture_output=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


class PodmanLazy(Podman):
    """podman with ``stargz-overlay store`` as its Additional Layer Store and the mount
    program: ``podman pull`` + ``run`` of an eStargz image fetch only what runs."""

    def __init__(self, tmp, name, host):
        als = os.path.join(tmp, name, "als")
        wrapper = os.path.join(tmp, name, "stargz-overlay-mount")
        super().__init__(tmp, name, host, storage=(
            f'[storage.options]\nadditionallayerstores = ["{als}/store:ref"]\n'
            f'[storage.options.overlay]\nmount_program = "{wrapper}"\n'))
        self.als = als
        self.lazy = Lazy(self.dir, "plugin", host)
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nPYTHONPATH={os.path.join(ROOT, 'plugin')} exec "
                    f"{sys.executable} -m stargz_overlay.mount_program \"$@\"\n")
        os.chmod(wrapper, 0o755)
        run(CLI + ["store", self.als, "--state-dir", os.path.join(self.dir, "state"),
                   "--config", self.lazy.config], env=self.lazy.env)

    def cleanup(self):
        super().cleanup()
        unmount_store(self.als)


def median_row(rows):
    """The run with the median total time (its other figures with it)."""
    ordered = sorted(rows, key=lambda r: r["total_s"])
    row = dict(ordered[len(ordered) // 2])
    row["all_s"] = [round(r["total_s"], 3) for r in rows]
    return row


def bench_args(doc):
    """The options every benchmark takes (add its own to the parser returned)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="link round trip (ms)")
    parser.add_argument("--mbit", type=float, default=100.0, help="link bandwidth (Mbit/s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="directory for the results (default contrib/bench/results)")
    return parser


def one_image_args(doc):
    """``bench_args`` and the options of a benchmark of one python image."""
    parser = bench_args(doc)
    parser.add_argument("--image", choices=("python-full", "python"), default="python-full")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each start (median)")
    parser.add_argument("--no-legacy", action="store_true", help="skip podman pull + run")
    return parser


class Bench:
    """One run of a benchmark: everything is stopped, unmounted and (unless
    ``--keep``) removed on exit.

    ``start_registry()`` starts a local docker-registry (``direct``; ``conv_env``
    converts into it with ``registries_conf``); ``push(kind, repo)`` builds
    contrib/images.py's image ``kind`` offline and pushes it there as gzip
    (``bench/REPO:legacy``; ``push_one_image()`` for ``one_image_args``'s
    ``--image``); ``manifest(repo, tag)`` reads one back.  ``shape(repo)``
    puts netshape's shaped link (``shaped``) in front of the registry and measures
    it with repo's largest layer.  ``timed(name, runner, ref)`` times one start
    through the link into ``runs``; ``write(prefix)`` saves ``results`` as JSON in
    ``--out`` (``output(prefix)``: the timestamped path without extension).
    """

    def __init__(self, args, prefix):
        if os.geteuid() != 0:
            raise SystemExit("run as root (FUSE mounts, chroot, podman, drop_caches)")
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix=prefix)
        self.reg = self.shaper = None
        self.results = {"rtt_ms": args.rtt_ms, "mbit": args.mbit}
        self.runs = {}

    def __enter__(self):
        return self

    def start_registry(self):
        self.reg = Registry(self.tmp)
        self.direct = self.reg.host
        self.registries_conf = registries_conf(os.path.join(self.tmp, "registries.conf"),
                                               [self.direct])
        self.conv_env = dict(ENV, CONTAINERS_REGISTRIES_CONF=self.registries_conf)

    def push(self, kind, repo=None):
        """Build image ``kind`` and push it as ``bench/REPO:legacy`` (REPO: ``kind``);
        returns its ``oci:`` reference (for ``stargz-overlay convert``)."""
        oci = images.build(kind, os.path.join(self.tmp, "oci", kind))
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", oci,
             f"docker://{self.direct}/bench/{repo or kind}:legacy"])
        return oci

    def push_one_image(self):
        """The start of a benchmark of one python image (``one_image_args``): the
        registry, ``--image`` pushed as ``bench/python:legacy``; returns its ``oci:``
        reference."""
        self.results.update(workload=WORKLOAD, image=self.args.image, repeat=self.args.repeat)
        print(f"building the {self.args.image} image ...", flush=True)
        self.start_registry()
        return self.push(self.args.image, repo="python")

    def manifest(self, repo, tag):
        return json.loads(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                               f"docker://{self.direct}/bench/{repo}:{tag}"]).stdout)

    def image_bytes(self, repo, tag):
        """The compressed size of an image's layers."""
        return sum(layer["size"] for layer in self.manifest(repo, tag)["layers"])

    def shape(self, repo, shaper=Shaper):
        host, port = self.direct.rsplit(":", 1)
        self.shaper = shaper((host, int(port)), rtt_ms=self.args.rtt_ms, mbit=self.args.mbit)
        self.shaped = self.shaper.start()
        layers = self.manifest(repo, "legacy")["layers"]
        big = max(layers, key=lambda x: x["size"])["digest"]
        shost, sport = self.shaped.rsplit(":", 1)
        self.results["link"] = link = verify(shost, int(sport), "/v2/",
                                             f"/v2/bench/{repo}/blobs/{big}")
        print(f"shaped link {self.shaped} (netshape proxy): configured "
              f"{self.args.rtt_ms:g} ms RTT, {self.args.mbit:g} Mbit/s; measured "
              f"{link['rtt_ms']} ms RTT, {link['mbit']} Mbit/s", flush=True)

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

    def output(self, prefix):
        os.makedirs(self.args.out, exist_ok=True)
        return os.path.join(self.args.out, f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")

    def write(self, prefix):
        out = self.output(prefix) + ".json"
        with open(out, "w") as f:
            json.dump(self.results, f, indent=2)
        print(f"written to {os.path.relpath(out, ROOT) if out.startswith(ROOT) else out}")

    def __exit__(self, *exc):
        if self.shaper is not None:
            self.shaper.stop()
        if self.reg is not None:
            self.reg.stop()
        unmount_all(self.tmp)
        if self.args.keep:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
