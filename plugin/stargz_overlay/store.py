"""``stargz-overlay store``: mount the Additional Layer Store for Podman, CRI-O and Buildah.

The store is a read-only fuse-overlayfs 1.x mount whose only lower layer is
our plugin with a ``store`` DATA (``store_view``)::

    fuse-overlayfs -o plugins=<.so>,fast_ino=1,static_nlink,timeout=<T>,
                      lowerdir=//stargz/<DATA>//<state>/view  MOUNTPOINT

containers/storage is pointed at ``MOUNTPOINT/store`` (storage.conf:
``additionallayerstores = ["MOUNTPOINT/store:ref"]``).  ``static_nlink``
makes lookups in never-loaded directories reach the plugin name by name (so
references and digests resolve on demand); ``timeout`` bounds how long the
kernel remembers a negative lookup, so a layer that failed for a transient
reason (registry down) is asked for again on the next pull.

Besides the mount, the command creates ``MOUNTPOINT/store`` on the underlying
filesystem (containers/storage refuses to start if the ALS path is missing,
so Podman keeps working, without lazy pulls, while the store is down) and
records the store in ``<runtime dir>/stargz-overlay/stores/`` so that the
mount program can find its state and configuration even when it is not
mounted.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from .errors import StargzError
from .layer_spec import LayerSpec, encode
from .store_view import MARKER, NAMESPACE

DEFAULT_TIMEOUT = 2.0         # seconds the kernel caches lookups (positive and negative)
MOUNT_WAIT = 60.0


def is_root():
    return os.geteuid() == 0


def runtime_dir():
    if is_root():
        return "/run"
    return os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"


def default_state_dir():
    if is_root():
        return "/var/lib/stargz-overlay/store"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "stargz-overlay", "store")


def default_mountpoint():
    if is_root():
        return "/var/lib/stargz-overlay/als"
    return os.path.join(runtime_dir(), "stargz-overlay", "als")


def index_path(mountpoint):
    """Where ``store`` records a store mounted at ``mountpoint`` (for the mount program)."""
    key = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:16]
    return os.path.join(runtime_dir(), "stargz-overlay", "stores", key + ".json")


def fuse_overlayfs_binary(explicit=None):
    return (explicit or os.environ.get("STARGZ_OVERLAY_FUSE_OVERLAYFS")
            or shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs")


def is_mounted(path):
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == path:
                    return True
    except OSError:
        pass
    return False


def _unescape(text):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def user_config(state_dir):
    """A configuration for an unprivileged store (cache and log under the user's dirs)."""
    path = os.path.join(state_dir, "config.toml")
    if not os.path.exists(path):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        text = (f'# written by "stargz-overlay store" for an unprivileged user\n'
                f'cache_dir = {json.dumps(os.path.join(cache, "stargz-overlay"))}\n'
                f'log_file = {json.dumps(os.path.join(state_dir, "plugin.log"))}\n')
        from dataclasses import fields
        from .config import Config
        if "metrics_dir" in {f.name for f in fields(Config)}:
            metrics = os.path.join(runtime_dir(), "stargz-overlay", "metrics")
            text += f"metrics_dir = {json.dumps(metrics)}\n"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def resolve_config(explicit, state_dir):
    """The configuration file the store (and its containers' mounts) use, or ""."""
    from .config import DEFAULT_PATH, ENV_VAR, load_config
    path = explicit or os.environ.get(ENV_VAR) or ""
    if not path and not is_root():
        path = user_config(state_dir)
    if not path and os.path.exists(DEFAULT_PATH):
        path = DEFAULT_PATH
    path = os.path.abspath(path) if path else ""
    config = load_config(path or None)        # fail now, with the file's own message
    return path, config


class Store:
    """One store: its mountpoint, state directory and the fuse-overlayfs command."""

    def __init__(self, mountpoint, state_dir=None, config=None, timeout=DEFAULT_TIMEOUT,
                 fuse_overlayfs=None, allow_other=False, options=()):
        self.mountpoint = os.path.abspath(mountpoint)
        self.state_dir = os.path.abspath(state_dir or default_state_dir())
        self.config_arg = config
        self.timeout = timeout
        self.binary = fuse_overlayfs_binary(fuse_overlayfs)
        self.allow_other = allow_other
        self.options = list(options)
        for path in (self.mountpoint, self.state_dir):
            if ":" in path or "," in path:
                raise StargzError(f"{path}: the store's paths cannot contain ':' or ','")
        if self.state_dir == self.mountpoint or self.state_dir.startswith(
                self.mountpoint + os.sep):
            raise StargzError("the state directory cannot be inside the mountpoint")

    @property
    def als_path(self):
        """What goes into storage.conf's ``additionallayerstores`` (with ``:ref``)."""
        return os.path.join(self.mountpoint, NAMESPACE)

    def command(self, foreground=False):
        from .commands.plugin import check_fuse_overlayfs, plugin_path
        check_fuse_overlayfs(self.binary)
        self.config_path, self.config = resolve_config(self.config_arg, self.state_dir)
        spec = LayerSpec(NAMESPACE, path=self.state_dir, config=self.config_path or None)
        lower = f"//stargz/{encode(spec)}/{os.path.join(self.state_dir, 'view')}"
        opts = [f"plugins={plugin_path()}", "fast_ino=1", "static_nlink",
                f"timeout={self.timeout:g}", f"lowerdir={lower}"]
        if self.allow_other:
            opts.append("allow_other")
        opts += self.options
        argv = [self.binary, "-o", ",".join(opts)]
        if foreground:
            argv.append("-f")
        return argv + [self.mountpoint]

    def prepare(self):
        if is_mounted(self.mountpoint):
            raise StargzError(f"{self.mountpoint} is already a mount point (a store already "
                              f"running? stop it with 'stargz-overlay store --unmount "
                              f"{self.mountpoint}')")
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.mountpoint, mode=0o755, exist_ok=True)
        # the ALS path exists even while the store is not mounted (see the module doc)
        os.makedirs(os.path.join(self.mountpoint, NAMESPACE), mode=0o755, exist_ok=True)

    def record(self):
        doc = {"mountpoint": self.mountpoint, "state_dir": self.state_dir,
               "config": self.config_path, "als": self.als_path + ":ref",
               "started": time.time()}
        path = index_path(self.mountpoint)
        from .status import write_json
        write_json(path, doc)

    def ready(self):
        try:
            with open(os.path.join(self.mountpoint, MARKER), encoding="utf-8") as f:
                return json.load(f).get("state_dir") == self.state_dir
        except (OSError, ValueError):
            return False

    def mount(self):
        """Mount in the background (fuse-overlayfs daemonizes once the mount is up)."""
        argv = self.command()
        self.prepare()
        try:
            res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=MOUNT_WAIT)
        except subprocess.TimeoutExpired:
            raise StargzError(f"fuse-overlayfs did not mount {self.mountpoint} within "
                              f"{MOUNT_WAIT:.0f} s") from None
        if res.returncode != 0 or not self.ready():
            text = "\n".join(x for x in (res.stderr.strip(), res.stdout.strip()) if x)
            text = "\n".join(line for line in text.splitlines()
                             if "unknown argument ignored" not in line)
            if is_mounted(self.mountpoint):
                unmount(self.mountpoint, quiet=True)
            raise StargzError(f"fuse-overlayfs could not mount the store at "
                              f"{self.mountpoint} (status {res.returncode})"
                              + (f": {text}" if text else ""))
        self.record()

    def serve(self):
        """Run fuse-overlayfs in the foreground until SIGTERM/SIGINT (systemd Type=notify)."""
        argv = self.command(foreground=True)
        self.prepare()
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        stopping = []

        def stop(signum, frame):
            stopping.append(signum)
            unmount(self.mountpoint, quiet=True)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        deadline = time.monotonic() + MOUNT_WAIT
        while not self.ready():
            if child.poll() is not None:
                raise StargzError(f"fuse-overlayfs exited with status {child.returncode} "
                                  f"before the store was mounted")
            if time.monotonic() > deadline:
                child.kill()
                child.wait()
                raise StargzError(f"the store at {self.mountpoint} did not come up within "
                                  f"{MOUNT_WAIT:.0f} s")
            time.sleep(0.05)
        self.record()
        notify("READY=1\nSTATUS=serving " + self.als_path)
        print(f"stargz-overlay store: serving {self.als_path}", file=sys.stderr, flush=True)
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
        notify("STOPPING=1")
        if stopping:
            return 0
        return code or 0


def notify(text):
    """sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET, if any."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(text.encode("utf-8"), address)
    except OSError:
        pass


def unmount(mountpoint, quiet=False, timeout=30.0):
    """Unmount a store (or any FUSE mount) and wait until it is gone."""
    mountpoint = os.path.abspath(mountpoint)
    if not is_mounted(mountpoint):
        if quiet:
            return
        raise StargzError(f"{mountpoint} is not mounted")
    tools = [["fusermount3", "-u", mountpoint], ["fusermount", "-u", mountpoint]]
    if is_root():
        tools.insert(0, ["umount", mountpoint])
    last = ""
    for argv in tools:
        if shutil.which(argv[0]) is None:
            continue
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if res.returncode == 0:
            break
        last = res.stderr.strip()
    deadline = time.monotonic() + timeout
    while is_mounted(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_mounted(mountpoint) and not quiet:
        raise StargzError(f"cannot unmount {mountpoint}: {last or 'still mounted'} (is a "
                          f"process using it? 'fusermount3 -u -z {mountpoint}' detaches it)")


def find_store(mountpoint):
    """(state_dir, config path) of the store mounted (or last mounted) at ``mountpoint``."""
    from .status import read_json
    marker = read_json(os.path.join(mountpoint, MARKER))
    if marker and marker.get("state_dir"):
        return marker["state_dir"], marker.get("config") or ""
    doc = read_json(index_path(mountpoint))
    if doc and doc.get("state_dir"):
        return doc["state_dir"], doc.get("config") or ""
    return None, None
