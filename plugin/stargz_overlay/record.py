"""``convert --optimize``: run the image's workload once and record what it reads.

For each platform that can run on this machine, the source image is first
converted to a plain eStargz image in a temporary OCI layout (layers that
already are eStargz are kept), its layers are mounted with fuse-overlayfs and
our plugin (writable upper directory, no prefetch), with ``record_file`` set,
and the workload (the image's Entrypoint + Cmd, or ``--entrypoint``/``--args``,
with its Env, WorkingDir and User) runs on that mount: through ``podman run
--rootfs`` (private storage, runc, no network) or, without podman, in a
chroot.  It stops at the first stdout line containing ``--wait-for`` or after
``--period``, whichever comes first (or when it exits).

The plugin's record (see ``access_log``) gives, per layer and in order, the
files whose content was opened (hardlinks mapped to the entry that holds the
content) and the symlinks followed to them; those become each source layer's
prioritized files.  Stats are recorded but not prioritized: metadata is in
the TOC and costs nothing to fetch.
"""

import argparse
import json
import os
import platform as host_platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from .access_log import read_accesses
from .analyze import command_line, parse_env
from .errors import StargzError
from .image_convert import ConvertOptions, ImageConverter, LayoutEndpoint, open_endpoint
from .layer_spec import LayerSpec, encode
from .registry import INDEX_TYPES, OCI_MANIFEST, TOC_DIGEST_ANNOTATION, RegistryClient

DEFAULT_PERIOD = 10.0
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
         "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass
class Recording:
    """What one platform's workload read, per source layer."""
    platform: str
    argv: list = field(default_factory=list)
    by_layer: dict = field(default_factory=dict)   # source layer digest -> ordered paths
    accesses: list = field(default_factory=list)   # every Access, in order
    exit_status: object = None                     # int, or "stopped" (period / --wait-for)
    skipped: str = ""                              # why this platform was not run


def parse_period(text):
    """``10s``, ``500ms``, ``2m`` or a number of seconds -> seconds (float)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise StargzError(f"--period {text!r}: want a duration such as 10s, 500ms or 2m")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "min": 60}[m.group(2)]


def _period_argument(text):
    try:
        return parse_period(text)
    except StargzError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--period {text!r}: ")) from None


def add_record_options(parser):
    """``--optimize``, ``--period`` and ``--wait-for`` (``--entrypoint/--args/--env`` are
    the analysis' workload options, shared)."""
    parser.add_argument("--optimize", action="store_true",
                        help="images: run the workload once on a lazy mount, record the files "
                             "it reads and put them first in each layer (needs root, "
                             "fuse-overlayfs; podman or chroot)")
    parser.add_argument("--period", type=_period_argument, default=DEFAULT_PERIOD, metavar="TIME",
                        help="--optimize: stop the workload after this long (default 10s)")
    parser.add_argument("--wait-for", metavar="TEXT",
                        help="--optimize: stop once a stdout line contains TEXT")


def host_arch():
    machine = host_platform.machine()
    return _ARCH.get(machine, machine)


def runnable(os_name, arch):
    """'' if a linux/ARCH image can run here, else why not."""
    if os_name and os_name != "linux":
        return f"{os_name} images cannot run on this Linux machine"
    if arch and arch != host_arch():
        return f"{arch} images cannot run on this {host_arch()} machine"
    return ""


class _OnePlatform:
    """A source endpoint whose root manifest is one platform's manifest."""

    def __init__(self, src, body):
        self._src = src
        self._body = body

    def root_manifest(self):
        return self._body, OCI_MANIFEST

    def __getattr__(self, name):
        return getattr(self._src, name)

    def __str__(self):
        return str(self._src)


def _platforms(src):
    """[(platform text, os, arch, manifest body)] of every image in ``src``."""
    body, media_type = src.root_manifest()
    if media_type not in INDEX_TYPES:
        doc = json.loads(body)
        config = json.loads(src.small_blob(doc["config"]["digest"]))
        os_name, arch = config.get("os", ""), config.get("architecture", "")
        return [("/".join(x for x in (os_name, arch, config.get("variant")) if x),
                 os_name, arch, body)]
    out = []
    for desc in json.loads(body).get("manifests") or []:
        if desc.get("mediaType") not in (OCI_MANIFEST,
                                         "application/vnd.docker.distribution.manifest.v2+json"):
            continue
        p = desc.get("platform") or {}
        if p.get("os") == "unknown":
            continue                  # attestation manifests
        text = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
        out.append((text, p.get("os", ""), p.get("architecture", ""),
                    src.manifest(desc["digest"])))
    return out


class _Workspace:
    """Temporary directories of one recording: layout, plugin state, mount, podman."""

    def __init__(self, workdir=None):
        self.dir = tempfile.mkdtemp(prefix="stargz-record-", dir=workdir)
        self.layout = os.path.join(self.dir, "layout")
        self.mnt = os.path.join(self.dir, "rootfs")
        self.upper = os.path.join(self.dir, "upper")
        self.work = os.path.join(self.dir, "work")
        self.state = os.path.join(self.dir, "state")
        self.record = os.path.join(self.dir, "record.tsv")
        self.config = os.path.join(self.dir, "plugin.toml")
        for d in (self.mnt, self.upper, self.work, self.state):
            os.makedirs(d)
        keys = {"cache_dir": os.path.join(self.dir, "cache"),
                "log_file": os.path.join(self.dir, "plugin.log"),
                "metrics_dir": os.path.join(self.dir, "metrics"),
                "record_file": self.record, "noprefetch": True, "no_background_fetch": True}
        with open(self.config, "w", encoding="utf-8") as f:
            f.write("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))

    def cleanup(self):
        _unmount(self.mnt)
        _wait_gone(self.mnt)              # the daemon releases its layer directories
        _remove(self.dir)


def _wait_gone(text, timeout=10.0):
    """Wait until no process has ``text`` on its command line (e.g. a directory)."""
    needle = os.fsencode(text)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = False
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    busy = needle in f.read()
            except (OSError, ValueError):
                continue
            if busy:
                break
        if not busy:
            return
        time.sleep(0.1)


def _mounted_under(path):
    """Mount points at or below ``path`` (bind mounts included), deepest first."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _remove(path, timeout=10.0):
    """rm -rf ``path``, retrying while exiting processes (the fuse-overlayfs daemon
    releasing its layer directories, conmon's clean-up) still write in it."""
    deadline = time.monotonic() + timeout
    while True:
        for point in _mounted_under(path):   # podman's private bind mount of its store
            subprocess.run(["umount", "-l", point], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def _unmount(mnt):
    if not os.path.ismount(mnt):
        return
    subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
    deadline = time.monotonic() + 10
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)


def _mount(ws, layers, fuse_overlayfs=None):
    """Mount ``layers`` ([(digest, blob path, toc digest)], bottom first) at ws.mnt."""
    from .commands.plugin import check_fuse_overlayfs, plugin_path
    binary = fuse_overlayfs or shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"
    check_fuse_overlayfs(binary)
    lowers = []
    for i, (digest, path, toc) in enumerate(reversed(layers)):
        spec = LayerSpec("blob", path=path, digest=digest, toc=toc, config=ws.config)
        lowers.append(f"//stargz/{encode(spec)}/{os.path.join(ws.state, str(i))}")
    opts = [f"plugins={plugin_path()}", "fast_ino=1", "lowerdir=" + ":".join(lowers),
            f"upperdir={ws.upper}", f"workdir={ws.work}"]
    if any(c in ":," for c in ws.dir):
        raise StargzError(f"temporary directory {ws.dir} contains ':' or ','")
    res = subprocess.run([binary, "-o", ",".join(opts), ws.mnt], capture_output=True, text=True)
    if res.returncode != 0:
        raise StargzError(f"cannot mount the image to record its workload: "
                          f"{(res.stderr or res.stdout).strip()[-500:]}")


class _Runner:
    """Runs argv on a root file system until it exits, prints TEXT, or the period ends."""

    def __init__(self, rootfs, argv, env, workdir, user, scratch, note):
        self.rootfs, self.argv, self.env = rootfs, argv, env
        self.workdir, self.user, self.scratch, self.note = workdir or "/", user, scratch, note
        self.podman = (shutil.which("podman") is not None and shutil.which("runc") is not None
                       and os.geteuid() == 0)
        self.name = f"stargz-record-{uuid.uuid4().hex[:12]}"
        self.runroot = None

    def _podman_env(self):
        os.makedirs(self.scratch, exist_ok=True)
        conf = os.path.join(self.scratch, "storage.conf")
        self.runroot = tempfile.mkdtemp(prefix="szr-", dir="/tmp")   # short: conmon socket
        with open(conf, "w", encoding="utf-8") as f:
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{self.scratch}/graph"\n'
                    f'runroot = "{self.runroot}"\n')
        return dict(os.environ, CONTAINERS_STORAGE_CONF=conf)

    def _podman(self, *args):
        return ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                "--events-backend", "none", *args]

    def start(self):
        if self.podman:
            # (explicit limits: podman copies its own, which runc may not set in a
            # container here: "error setting rlimits"; no --rm: Podman 4.3 can lose a
            # --rm container's exit status, and cleanup() removes it by name)
            cmd = self._podman("run", "--name", self.name, "--network", "none",
                               "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                               "--workdir", self.workdir)
            for key, value in self.env.items():
                cmd += ["--env", f"{key}={value}"]
            if self.user:
                cmd += ["--user", self.user]
            cmd += ["--rootfs", self.rootfs, *self.argv]
            self.host_env = self._podman_env()
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, env=self.host_env,
                                    start_new_session=True)
        uid = gid = None
        if self.user:
            m = re.fullmatch(r"(\d+)(?::(\d+))?", self.user)
            if not m:
                self.note(f"record: chroot runs as root (user {self.user!r} is not numeric)")
            else:
                uid, gid = int(m.group(1)), int(m.group(2) or m.group(1))
        rootfs, workdir = self.rootfs, self.workdir

        def enter():
            os.chroot(rootfs)
            os.chdir(workdir)
            if gid is not None:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
        return subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=self.env, preexec_fn=enter,
                                start_new_session=True)

    def run(self, period, wait_for):
        """Exit status, or "stopped"; the workload's output is passed to note()."""
        try:
            proc = self.start()
        except OSError as exc:
            raise StargzError(f"cannot start the workload {self.argv}: {exc.strerror}") from None
        ready = threading.Event()
        output = {"stdout": [], "stderr": []}

        def pump(stream, name):
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                output[name].append(line)
                if name == "stdout" and wait_for and wait_for in line:
                    ready.set()
        threads = [threading.Thread(target=pump, args=(proc.stdout, "stdout"), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, "stderr"), daemon=True)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + period
        status = None
        try:
            while status is None and not ready.is_set() and time.monotonic() < deadline:
                try:
                    status = proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    pass
        finally:                      # also on ^C: never leave the workload running
            if status is None:
                status = "stopped"
                self.stop(proc)
            for t in threads:
                t.join(timeout=5)
            self.cleanup()
        self.output = output
        return status

    def stop(self, proc):
        if self.podman:
            subprocess.run(self._podman("kill", self.name), env=self.host_env,
                           capture_output=True, timeout=60)
        else:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cleanup(self):
        if self.podman:
            subprocess.run(self._podman("rm", "-f", self.name), env=self.host_env,
                           capture_output=True, timeout=60)
            _wait_gone(self.runroot)      # conmon and its clean-up podman, then remove
            _remove(self.runroot, timeout=3.0)


def _workload(config, entrypoint, args, env):
    cfg = config.get("config") or {}
    argv = command_line(cfg, entrypoint, args)
    if not argv:
        raise StargzError("the image has no Entrypoint or Cmd to record; give --entrypoint")
    merged = parse_env(cfg.get("Env"))
    merged.update(parse_env(env))
    merged.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return argv, merged, cfg.get("WorkingDir") or "/", cfg.get("User") or ""


def by_layer(accesses, layer_map):
    """Source digest -> ordered paths: contents opened and symlinks followed."""
    out = {}
    seen = set()
    for a in accesses:
        if a.op == "open":
            path = a.content
        elif a.op == "readlink":
            path = a.path
        else:
            continue
        digest = layer_map.get(a.layer)
        path = path.lstrip("/")
        if digest is None or not path or (digest, path) in seen:
            continue
        seen.add((digest, path))
        out.setdefault(digest, []).append(path)
    return out


def record_platform(src, body, platform, entrypoint=None, args=None, env=(),
                    period=DEFAULT_PERIOD, wait_for=None, workdir=None, note=print):
    """Record one platform image's workload; returns a Recording."""
    ws = _Workspace(workdir)
    try:
        dst = LayoutEndpoint(f"oci:{ws.layout}:record", create=True)
        report = ImageConverter(_OnePlatform(src, body), dst,
                                ConvertOptions(compression_level=1), workdir=ws.dir).run()
        layer_map = {layer.digest: layer.source_digest for layer in report.layers}
        manifest = json.loads(dst.root_manifest()[0])
        config = json.loads(dst.small_blob(manifest["config"]["digest"]))
        layers = []
        for desc in manifest.get("layers") or []:
            toc = (desc.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION)
            if toc is None:
                raise StargzError(f"[{platform}] layer {desc['digest']} cannot be served by "
                                  f"the plugin (not convertible to eStargz), so the workload "
                                  f"cannot be recorded; use --analyze")
            layers.append((desc["digest"], dst.layout.blob_path(desc["digest"]), toc))
        argv, run_env, cwd, user = _workload(config, entrypoint, args, env)
        _mount(ws, layers)
        runner = _Runner(ws.mnt, argv, run_env, cwd, user, os.path.join(ws.dir, "podman"), note)
        started = time.monotonic()
        status = runner.run(period, wait_for)
        note(f"record [{platform}]: {' '.join(argv)} ran {time.monotonic() - started:.1f} s "
             f"via {'podman' if runner.podman else 'chroot'}: "
             f"{'stopped' if status == 'stopped' else f'exit status {status}'}")
        if status not in (0, "stopped"):
            for line in runner.output["stderr"][-10:]:
                note(f"record [{platform}]: workload: {line}")
            if runner.podman and status in (125, 126, 127):
                raise StargzError(f"[{platform}] podman could not run the workload (status "
                                  f"{status}; its messages are above)")
        _unmount(ws.mnt)
        accesses = read_accesses(ws.record)
        return Recording(platform, argv, by_layer(accesses, layer_map), accesses, status)
    finally:
        ws.cleanup()


def record_image(src, entrypoint=None, args=None, env=(), period=DEFAULT_PERIOD,
                 wait_for=None, workdir=None, note=print):
    """A Recording for every platform of ``src`` (skipped ones carry the reason)."""
    out = []
    for text, os_name, arch, body in _platforms(src):
        why = runnable(os_name, arch)
        if why:
            note(f"record [{text}]: skipped: {why} (--analyze still orders it)")
            out.append(Recording(text, skipped=why))
            continue
        out.append(record_platform(src, body, text, entrypoint, args, env, period, wait_for,
                                   workdir, note))
    return out


def merge(first, extra):
    """digest -> paths: ``first``'s lists, then what ``extra`` adds (order kept)."""
    merged = {d: list(p) for d, p in (first or {}).items()}
    for digest, paths in (extra or {}).items():
        have = merged.setdefault(digest, [])
        seen = set(have)
        have.extend(p for p in paths if p not in seen)
    return merged


def record_for_convert(src_spec, args, client=None, note=None):
    """``convert --optimize``: per-layer recorded lists for every runnable platform."""
    from .commands.analyze import workload
    note = note or (lambda text: print(text, file=__import__("sys").stderr))
    src = open_endpoint(src_spec, client or RegistryClient())
    recordings = record_image(src, period=args.period, wait_for=args.wait_for, note=note,
                              **workload(args))
    merged = {}
    for r in recordings:
        if not r.skipped:
            count = sum(len(p) for p in r.by_layer.values())
            note(f"record [{r.platform}]: {count} files read in {len(r.by_layer)} layer(s) "
                 f"({sum(1 for a in r.accesses if a.op == 'stat')} stats not prioritized)")
        merged = merge(merged, r.by_layer)
    return merged
