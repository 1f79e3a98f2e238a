"""Real fuse-overlayfs mounts for the plugin tests: build, mount, compare, clean up."""

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from stargz_overlay.layer_spec import LayerSpec, encode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUSE_OVERLAYFS = shutil.which("fuse-overlayfs") or "/usr/bin/fuse-overlayfs"


def require_fuse():
    """Skip (with the reason printed) unless real FUSE mounts are possible."""
    reasons = []
    if os.geteuid() != 0:
        reasons.append("not running as root")
    if not os.path.exists("/dev/fuse"):
        reasons.append("/dev/fuse is missing")
    if not os.access(FUSE_OVERLAYFS, os.X_OK):
        reasons.append("fuse-overlayfs is not installed")
    if shutil.which("fusermount3") is None:
        reasons.append("fusermount3 is not installed")
    if reasons:
        msg = "plugin mount tests need real FUSE: " + ", ".join(reasons)
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    out = subprocess.run([FUSE_OVERLAYFS, "--version"], capture_output=True, text=True)
    m = re.search(r"version (\d+)\.(\d+)", out.stdout + out.stderr)
    if not m or int(m.group(1)) != 1:
        msg = f"fuse-overlayfs 1.x needed for plugins, found: {(out.stdout or out.stderr)[:80]!r}"
        print(msg, file=sys.stderr)
        pytest.skip(msg)


def plugin_so(package_dir=None):
    """libstargz_plugin.so of the imported package (or of the package in
    ``package_dir``), (re)built when missing or older than cstub/."""
    if package_dir is None:
        import stargz_overlay
        package_dir = os.path.dirname(stargz_overlay.__file__)
    so = os.path.join(package_dir, "libstargz_plugin.so")
    cstub = os.path.join(REPO, "cstub")
    newest = max(os.path.getmtime(os.path.join(cstub, n)) for n in os.listdir(cstub)
                 if n.endswith((".c", ".h", ".py")))
    if not os.path.exists(so) or os.path.getmtime(so) < newest:
        sys.path.insert(0, cstub)
        try:
            import build_plugin
            build_plugin.build(so)
        finally:
            sys.path.remove(cstub)
    return so


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


def write_config(path, cache_dir, log_file, registry=None, tables=None, **extra):
    """A plugin config.toml for tests (debug log with every blob read).

    Background fetch is off unless asked for (``no_background_fetch=False``):
    tests that count blob reads must not see it; metrics go next to the cache.
    ``tables``: {"blob": {...}, ...} for more TOML tables.
    """
    keys = {"cache_dir": cache_dir, "log_file": log_file, "log_level": "debug",
            "log_reads": True, "log_calls": True, "fsync": False,
            "no_background_fetch": True,
            "metrics_dir": os.path.join(os.path.dirname(os.path.abspath(cache_dir)), "metrics"),
            **extra}
    lines = [f"{k} = {_toml(v)}" for k, v in keys.items()]
    if registry:
        lines.append("[registry]")
        lines += [f"{k} = {_toml(v)}" for k, v in registry.items()]
    for table, values in (tables or {}).items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.abspath(path)


def plugin_lower(spec, workdir):
    """The lowerdir item ``//stargz/DATA//abs/workdir`` for a LayerSpec."""
    return f"//stargz/{encode(spec)}/{os.path.abspath(workdir)}"


def blob_spec(blob, config, toc=None):
    return LayerSpec("blob", path=os.path.abspath(blob), toc=toc, config=config)


class MountError(Exception):
    pass


def _daemon_pids(mnt):
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"fuse-overlayfs") and os.fsencode(mnt) in argv:
            pids.append(int(pid))
    return pids


class Mount:
    """One fuse-overlayfs mount with plugins; ``mount()`` / ``unmount()``."""

    def __init__(self, mnt, lowers, upper=None, work=None, options=(), so=None,
                 fast_ino=True):
        self.mnt = os.path.abspath(mnt)
        self.lowers = list(lowers)
        self.upper = upper and os.path.abspath(upper)
        self.work = work and os.path.abspath(work)
        self.options = list(options)
        self.so = so
        self.fast_ino = fast_ino
        self.pids = []
        self.result = None

    def command(self):
        opts = []
        if self.so:
            opts.append(f"plugins={self.so}")
        if self.fast_ino:
            opts.append("fast_ino=1")
        opts.append("lowerdir=" + ":".join(self.lowers))
        if self.upper:
            opts += [f"upperdir={self.upper}", f"workdir={self.work}"]
        opts += self.options
        return [FUSE_OVERLAYFS, "-o", ",".join(opts), self.mnt]

    def mount(self, check=True):
        for d in (self.mnt, self.upper, self.work):
            if d:
                os.makedirs(d, exist_ok=True)
        start = time.monotonic()
        # capture_output: if the daemon kept our stderr this would block until timeout
        self.result = subprocess.run(self.command(), capture_output=True, text=True,
                                     timeout=60)
        self.elapsed = time.monotonic() - start
        if self.result.returncode != 0:
            if check:
                raise MountError(f"mount failed ({self.result.returncode}): "
                                 f"{self.result.stderr.strip()}")
            return self.result
        if not os.path.ismount(self.mnt):
            raise MountError("fuse-overlayfs exited 0 but nothing is mounted")
        self.pids = _daemon_pids(self.mnt)
        return self.result

    @property
    def mounted(self):
        return os.path.ismount(self.mnt)

    def unmount(self):
        if self.mounted:
            r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids = []

    def __enter__(self):
        self.mount()
        return self

    def __exit__(self, *exc):
        self.unmount()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def sha(data):
    return hashlib.sha256(data).hexdigest()


def snapshot(root, mtimes=True, dir_mtimes=True, content=True, written_since=None):
    """Everything observable under ``root``: {relpath: attrs} and hardlink groups.

    Mtimes at or after ``written_since`` (the test's own writes, done on two mounts
    one after the other, maybe a second apart) are recorded as "written".
    """
    entries = {}
    by_ino = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = [(dirpath, "")] if dirpath == root else []
        names += [(dirpath, n) for n in sorted(dirnames + filenames)]
        for parent, name in names:
            path = os.path.join(parent, name) if name else parent
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            rec = {"type": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid,
                   "gid": st.st_gid}
            if mtimes and (dir_mtimes or kind != stat.S_IFDIR) and rel != ".":
                # (the root's times are the upper dir's own: when it was created)
                written = written_since is not None and st.st_mtime >= written_since
                rec["mtime"] = "written" if written else int(st.st_mtime)
            if kind != stat.S_IFDIR:
                rec["size"] = st.st_size
                rec["nlink"] = st.st_nlink
            if kind in (stat.S_IFCHR, stat.S_IFBLK):
                rec["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if kind == stat.S_IFLNK:
                rec["link"] = os.readlink(path)
            if kind == stat.S_IFREG and content:
                with open(path, "rb") as f:
                    rec["sha"] = sha(f.read())
            if kind == stat.S_IFREG:
                by_ino.setdefault(st.st_ino, []).append(rel)
            rec["xattrs"] = {k: os.getxattr(path, k, follow_symlinks=False)
                             for k in sorted(os.listxattr(path, follow_symlinks=False))}
            entries[rel] = rec
    links = sorted(sorted(v) for v in by_ino.values() if len(v) > 1)
    return entries, links


def diff_snapshots(a, b):
    """Human-readable differences between two snapshots (empty list if equal)."""
    (ea, la), (eb, lb) = a, b
    out = []
    for name in sorted(set(ea) | set(eb)):
        if name not in ea:
            out.append(f"only in second: {name} {eb[name]}")
        elif name not in eb:
            out.append(f"only in first: {name} {ea[name]}")
        elif ea[name] != eb[name]:
            keys = [k for k in set(ea[name]) | set(eb[name]) if ea[name].get(k) != eb[name].get(k)]
            out.append(f"{name}: " + ", ".join(f"{k}: {ea[name].get(k)!r} != {eb[name].get(k)!r}"
                                              for k in sorted(keys)))
    if la != lb:
        out.append(f"hardlink groups differ: {la} != {lb}")
    return out
