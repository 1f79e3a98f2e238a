"""Podman/Buildah against a real store: registry, counting proxy, store mount, private podman.

``StoreEnv`` puts together, in one temporary directory:

- a real docker-registry and a counting ``Proxy`` in front of it (Podman and
  the store both talk to the proxy, so every request is seen);
- ``stargz-overlay store`` mounted on a private mountpoint and state directory,
  with a test plugin configuration (private cache, debug log, no background
  fetch or prefetch, so that what is fetched is exactly what was read);
- a real podman with a private graph root whose storage.conf names the store
  (``additionallayerstores``) and the mount program.

Everything is torn down at the end: containers, images, mounts, the store
and the servers.
"""

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

import stargz_overlay
from stargz_overlay.registry import TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION
from stargz_overlay.writer import convert

from ..imagefixture import BUSYBOX, Podman, tar_layer
from ..plugin.fusehelp import plugin_so, require_fuse
from ..registry.conftest import make_client
from ..registryfixture import Proxy, Registry, _ProxyHandler, push_image

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(stargz_overlay.__file__)))
APPLETS = ("sh", "cat", "echo", "ls", "rm", "mv", "mkdir", "touch", "wc", "head", "sleep",
           "sha256sum", "stat", "test", "true", "dd", "sync")
RANGE_RE = re.compile(r"bytes=(\d+)-(\d+)")


def require_podman():
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not running as root")
    for tool in ("podman", "runc", "fuse-overlayfs", "fusermount3"):
        if shutil.which(tool) is None:
            reasons.append(f"{tool} is not installed")
    if not os.path.exists(BUSYBOX):
        reasons.append("busybox is not installed (Debian package busybox-static)")
    if reasons:
        msg = "Podman integration tests need: " + ", ".join(reasons)
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    require_fuse()


def cli_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + env["PYTHONPATH"]
                                      if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def cli(*args, env=None, timeout=120, check=True):
    """Run ``stargz-overlay ARGS`` from this checkout (the code under test)."""
    res = subprocess.run([sys.executable, "-m", "stargz_overlay", *args], capture_output=True,
                         text=True, env=env or cli_env(), timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"stargz-overlay {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


def mount_program_wrapper(directory):
    """An executable running ``stargz_overlay.mount_program`` of this checkout."""
    path = os.path.join(directory, "stargz-overlay-mount")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nPYTHONPATH={PKG_PARENT} exec {sys.executable} -m "
                f"stargz_overlay.mount_program \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def plugin_config(path, cache, log, registries_conf, **registry):
    """A plugin config.toml for the tests, written for the keys this checkout knows."""
    from stargz_overlay.config import Config
    known = {f.name for f in dataclasses.fields(Config)}
    lines = [f"cache_dir = {json.dumps(cache)}", f"log_file = {json.dumps(log)}",
             'log_level = "debug"', "log_reads = true"]
    if "noprefetch" in known:
        lines.append("noprefetch = true")
    elif "prefetch" in known:
        lines.append("prefetch = false")
    if "no_background_fetch" in known:
        lines.append("no_background_fetch = true")
    if "metrics_dir" in known:
        lines.append(f"metrics_dir = {json.dumps(os.path.join(os.path.dirname(path), 'metrics'))}")
    lines.append("[registry]")
    lines.append(f"registries_conf = {json.dumps(registries_conf)}")
    settings = {"connect_timeout": 2.0, "read_timeout": 5.0, "retries": 1, "deadline": 8.0}
    settings.update(registry)
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class _OneAcceptHandler(_ProxyHandler):
    """The shared proxy forwards headers through a dict, which keeps only the last of
    Podman's several ``Accept`` headers (the registry then refuses OCI manifests):
    join them into one first."""

    def parse_request(self):
        ok = super().parse_request()
        if ok:
            accepts = self.headers.get_all("Accept") or []
            if len(accepts) > 1:
                del self.headers["Accept"]
                self.headers["Accept"] = ", ".join(accepts)
        return ok


class CountingProxy(Proxy):
    def _serve(self, handler_cls):
        super()._serve(_OneAcceptHandler)


# -- images ------------------------------------------------------------------

def busybox_tar(extra=None):
    with open(BUSYBOX, "rb") as f:
        binary = f.read()
    files = {"bin": ("dir",), "bin/busybox": binary, "etc": ("dir",),
             "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n", "tmp": ("dir",)}
    for applet in APPLETS:
        files[f"bin/{applet}"] = ("symlink", "busybox")
    files.update(extra or {})
    return tar_layer(files)


@dataclasses.dataclass
class Layer:
    blob: bytes
    diff_id: str
    annotations: dict
    tar: bytes

    @property
    def digest(self):
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def estargz(tar_bytes, chunk_size=65536):
    out = io.BytesIO()
    res = convert(io.BytesIO(tar_bytes), out, chunk_size=chunk_size)
    return Layer(out.getvalue(), res.diff_id,
                 {TOC_DIGEST_ANNOTATION: res.toc_digest,
                  UNCOMPRESSED_SIZE_ANNOTATION: str(res.uncompressed_size)}, tar_bytes)


def plain_gzip(tar_bytes):
    return Layer(gzip.compress(tar_bytes, mtime=0),
                 "sha256:" + hashlib.sha256(tar_bytes).hexdigest(), {}, tar_bytes)


def push(registry_host, ref, layers, cmd=("/bin/sh",)):
    """Push an image of ``layers`` (Layer) to ``registry_host/ref``; returns the reference."""
    reference = f"{registry_host}/{ref}"
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]}}
    with make_client(registry_host) as client:
        push_image(client, reference, [x.blob for x in layers], config=config,
                   layer_annotations=[x.annotations or None for x in layers])
    return reference


# -- the environment ---------------------------------------------------------

class StoreEnv:
    def __init__(self, tmp, mount_program=True):
        require_podman()
        plugin_so()                        # (re)built if cstub/ changed
        self.tmp = str(tmp)
        self.registry = Registry(self.tmp)
        self.proxy = CountingProxy(self.registry.host)
        self.host = self.proxy.host
        self.registries_conf = os.path.join(self.tmp, "registries.conf")
        with open(self.registries_conf, "w") as f:
            for host in (self.proxy.host, self.registry.host):
                f.write(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
        self.cache = os.path.join(self.tmp, "cache")
        self.log = os.path.join(self.tmp, "plugin.log")
        self.config = plugin_config(os.path.join(self.tmp, "config.toml"), self.cache,
                                    self.log, self.registries_conf)
        self.mnt = os.path.join(self.tmp, "als")
        self.state = os.path.join(self.tmp, "state")
        self.mounted = False
        overlay = ""
        if mount_program:
            self.mount_program = mount_program_wrapper(self.tmp)
            overlay = f'mount_program = "{self.mount_program}"'
        # a short directory: with a run root path of ~50+ characters (pytest's tmp_path),
        # every "podman run" here waits 20 s for conmon's exit status
        self.podman_dir = tempfile.mkdtemp(prefix="szp-", dir="/tmp")
        self.podman = Podman(self.podman_dir,
                             storage_extra=f'[storage.options]\nadditionallayerstores = '
                                           f'["{self.mnt}/store:ref"]',
                             overlay_extra=overlay, registries_conf=self.registries_conf)
        # podman keeps its "alive" marker in engine.tmp_dir, /run/libpod by default for every
        # graph root: any "podman system reset" on the machine wipes it, and this podman then
        # resets its running containers to "created".  A private tmp_dir isolates the tests.
        containers_conf = os.path.join(self.podman_dir, "containers.conf")
        with open(containers_conf, "w") as f:
            f.write(f'[engine]\ntmp_dir = "{self.podman_dir}/tmp"\n')
        self.podman.env["CONTAINERS_CONF"] = containers_conf

    # store
    def start_store(self):
        cli("store", self.mnt, "--state-dir", self.state, "--config", self.config)
        self.mounted = True

    def stop_store(self):
        if self.mounted or os.path.ismount(self.mnt):
            cli("store", "--unmount", self.mnt, check=False)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        self.mounted = False

    def status(self):
        res = cli("status", "--state-dir", self.state, "--config", self.config, "--json")
        return json.loads(res.stdout)

    # registry traffic
    def layer_gets(self, layer, since=0):
        """(full GETs, ranged bytes) of ``layer``'s blob seen by the proxy after ``since``."""
        full, ranged = 0, 0
        for method, path, rng, status in self.proxy.log[since:]:
            if method != "GET" or not path.split("?")[0].endswith(layer.digest):
                continue
            m = RANGE_RE.match(rng or "")
            if m and "," not in rng:
                ranged += int(m.group(2)) - int(m.group(1)) + 1
            elif rng:
                ranged += sum(int(b) - int(a) + 1 for a, b in
                              re.findall(r"(\d+)-(\d+)", rng))
            else:
                full += 1
        return full, ranged

    def mark(self):
        return len(self.proxy.log)

    def close(self):
        try:
            self.podman.cleanup()
        finally:
            self.stop_store()
            from stargz_overlay.store import index_path
            try:
                os.unlink(index_path(self.mnt))
            except OSError:
                pass
            self.proxy.stop()
            self.registry.stop()
            shutil.rmtree(self.podman_dir, ignore_errors=True)


@contextlib.contextmanager
def running_store(tmp, mount_program=True):
    """A StoreEnv in ``tmp`` with its store mounted; all of it torn down at the end."""
    e = StoreEnv(tmp, mount_program=mount_program)
    try:
        e.start_store()
        yield e
    finally:
        e.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with running_store(tmp_path_factory.mktemp("podman-store")) as e:
        yield e


def run(env, image, *cmd, extra=(), check=True, timeout=120):
    """``podman run`` in the test environment, then ``podman rm``; the CompletedProcess.

    (Not ``--rm``: under load Podman 4.3.1 sometimes loses the exit code of a
    ``--rm`` container that exits at once, "no such exit code".)
    """
    name = f"t{uuid.uuid4().hex[:12]}"
    try:
        return env.podman("run", "--name", name, "--network", "none", "--ulimit",
                          "nofile=1024:1024", "--ulimit", "nproc=1024:1024", *extra, image,
                          *cmd, check=check, timeout=timeout)
    finally:
        env.podman("rm", "-f", "-t", "0", name, check=False)
