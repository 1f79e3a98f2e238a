"""``stargz-overlay-mount``: a drop-in ``mount_program`` for containers/storage.

containers/storage (Podman, CRI-O, Buildah) runs, with the driver's home as
its working directory::

    MOUNT_PROGRAM -o lowerdir=l/A:l/B,upperdir=...,workdir=...[,more] MERGED

Each lower dir of a lazily pulled layer resolves (through the ``l/`` and
``diff`` symlinks) to ``<store mount>/store/<base64(ref)>/<digest>/diff`` of
a ``stargz-overlay store``.  Those become plugin layers of fuse-overlayfs
(``//stargz/<DATA>//<dir>``, served directly by the plugin, without a second
FUSE hop), and ``plugins=`` and ``fast_ino=1`` are added; every other lower
dir and every other argument is passed through untouched, and the program
then execs ``/usr/bin/fuse-overlayfs`` (or ``$STARGZ_OVERLAY_FUSE_OVERLAYFS``).
DATA carries what the store learnt at pull (TOC digest and offset, blob format
and size), so the plugin opens each layer from the TOC the store left in the
content cache, without a request to the registry.

It stays small on purpose: standard library only (no registry client), no
threads, no child left behind, stderr never duplicated; it ends in
``execv``.  Each lazy layer gets a private directory under the store's
``<state>/mounts/``; directories of mounts that are gone are removed on the
next run.
"""

import base64
import binascii
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time

from .errors import StargzError
from .layer_spec import LayerSpec, encode

PLUGIN_SO = "libstargz_plugin.so"
MARKER = "stargz-overlay-store.json"
STORE_PATH_RE = re.compile(
    r"^(?P<mount>/.*)/store/(?P<ref>[A-Za-z0-9+=]+)/(?P<name>sha256:[0-9a-f]{64})/diff$")
STALE_AFTER = 60.0        # seconds before an unlocked per-mount directory may be removed


class MountProgramError(Exception):
    pass


def fuse_overlayfs():
    return (os.environ.get("STARGZ_OVERLAY_FUSE_OVERLAYFS") or shutil.which("fuse-overlayfs")
            or "/usr/bin/fuse-overlayfs")


def plugin_so():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), PLUGIN_SO)


def split_options(text):
    """Split an ``-o`` value at commas outside double quotes (SELinux ``context="a,b"``)."""
    out, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _runtime_dir():
    if os.geteuid() == 0 and not os.environ.get("XDG_RUNTIME_DIR"):
        return "/run"
    return os.environ.get("XDG_RUNTIME_DIR") or "/run"


def store_info(mount):
    """(state_dir, config) of the store mounted (or last mounted) at ``mount``, or None."""
    doc = _read_json(os.path.join(mount, MARKER))
    if not doc:
        key = hashlib.sha256(os.fsencode(mount)).hexdigest()[:16]
        for base in {_runtime_dir(), "/run"}:
            doc = _read_json(os.path.join(base, "stargz-overlay", "stores", key + ".json"))
            if doc:
                break
    if not doc or not doc.get("state_dir"):
        return None
    return doc["state_dir"], doc.get("config") or ""


def _decode_ref(b64):
    try:
        return base64.b64decode(b64.encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


class Rewriter:
    """Turns lower dirs of store layers into plugin layers."""

    def __init__(self, target, cwd=None):
        self.target = target
        self.cwd = cwd or os.getcwd()
        self.mount_dirs = {}      # state_dir -> this mount's directory
        self.count = 0

    def plugin_item(self, item):
        """``//stargz/...`` for a lower dir inside a store, or None to keep ``item``."""
        if item.startswith("//"):
            return None
        path = os.path.realpath(os.path.join(self.cwd, item))
        m = STORE_PATH_RE.match(path)
        if not m:
            return None
        ref = _decode_ref(m.group("ref"))
        info = store_info(m.group("mount"))
        if ref is None or info is None:
            return None
        state_dir, config = info
        name = m.group("name")
        layer = _read_json(os.path.join(state_dir, "layers", name.split(":", 1)[1] + ".json"))
        if layer is not None and not layer.get("lazy"):
            return None
        layer = layer or {}
        try:
            spec = LayerSpec("store-layer", path=state_dir, ref=layer.get("ref") or ref,
                             digest=layer.get("digest") or name, toc=layer.get("toc"),
                             size=layer.get("size"), toc_offset=layer.get("toc_offset"),
                             format=layer.get("kind"),
                             config=layer.get("config") or config or None)
        except StargzError:
            return None
        directory = os.path.join(self._mount_dir(state_dir), str(self.count))
        self.count += 1
        item = f"//stargz/{encode(spec)}/{directory}"
        if ":" in item or "," in item:
            return None
        return item

    def _mount_dir(self, state_dir):
        directory = self.mount_dirs.get(state_dir)
        if directory is None:
            base = os.path.join(state_dir, "mounts")
            os.makedirs(base, mode=0o700, exist_ok=True)
            clean_stale(base)
            key = hashlib.sha256(os.fsencode(self.target)).hexdigest()[:12]
            directory = os.path.join(base, f"{key}-{secrets.token_hex(4)}")
            os.makedirs(directory, mode=0o700)
            self.mount_dirs[state_dir] = directory
        return directory

    def lowerdir(self, value):
        items = value.split(":")
        out = []
        for item in items:
            new = self.plugin_item(item) if item else None
            out.append(new if new is not None else item)
        return ":".join(out)


def clean_stale(base, now=None):
    """Remove per-mount directories whose layers nobody holds any more."""
    now = now or time.time()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        directory = os.path.join(base, name)
        try:
            if now - os.stat(directory).st_mtime < STALE_AFTER or _held(directory):
                continue
        except OSError:
            continue
        shutil.rmtree(directory, ignore_errors=True)


def _held(directory):
    """Does a live plugin hold the lock of any layer directory under ``directory``?"""
    for sub in os.listdir(directory):
        lock = os.path.join(directory, sub, ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
    return False


def _option_args(argv):
    """Indexes of ``-o`` values in ``argv``, with the length of their prefix (0 or 2)."""
    found = []
    i = 0
    while i < len(argv):
        if argv[i] == "-o" and i + 1 < len(argv):
            found.append((i + 1, 0))
            i += 2
            continue
        if argv[i].startswith("-o"):
            found.append((i, 2))
        i += 1
    return found


def rewrite(argv, cwd=None):
    """(new argv without the program name, whether plugin layers were added)."""
    cwd = cwd or os.getcwd()
    target = next((a for a in reversed(argv) if not a.startswith("-")), "")
    rewriter = Rewriter(os.path.realpath(os.path.join(cwd, target)), cwd)
    out = list(argv)
    options = _option_args(out)
    changed = False
    for idx, skip in options:
        opts = split_options(out[idx][skip:])
        for j, opt in enumerate(opts):
            if opt.startswith("lowerdir="):
                new = "lowerdir=" + rewriter.lowerdir(opt[len("lowerdir="):])
                changed = changed or new != opt
                opts[j] = new
        out[idx] = out[idx][:skip] + ",".join(opts)
    if changed:
        so = plugin_so()
        for idx, skip in options:      # a plugins= already given: add ours to it
            opts = split_options(out[idx][skip:])
            for j, opt in enumerate(opts):
                if opt.startswith("plugins=") and so:
                    plugins = [p for p in opt[len("plugins="):].split(":") if p]
                    opts[j] = "plugins=" + ":".join(plugins + [so] if so not in plugins
                                                    else plugins)
                    so = None
            out[idx] = out[idx][:skip] + ",".join(opts)
        out[:0] = ["-o", ",".join(["fast_ino=1"] + ([f"plugins={so}"] if so else []))]
    return out, changed


def check_version(binary):
    try:
        res = subprocess.run([binary, "--version"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MountProgramError(f"cannot run {binary}: {exc}") from None
    m = re.search(r"fuse-overlayfs:?\s+(?:version\s+)?v?(\d+)\.(\d+)", res.stdout + res.stderr)
    if not m:
        raise MountProgramError(f"{binary} --version did not print a fuse-overlayfs version")
    if m.group(1) != "1":
        raise MountProgramError(f"{binary} is fuse-overlayfs {m.group(1)}.{m.group(2)}; lazy "
                                f"layers need fuse-overlayfs 1.x (2.x skips plugin layers)")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    binary = fuse_overlayfs()
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(__doc__.strip().split("\n\n")[0] + "\n\nusage: stargz-overlay-mount "
                  "-o lowerdir=...,upperdir=...,workdir=... MOUNTPOINT", file=sys.stderr)
            return 0 if argv else 2
        new_argv, changed = rewrite(argv)
        if changed:
            if not os.path.exists(plugin_so()):
                raise MountProgramError(f"the plugin {plugin_so()} is missing (reinstall "
                                        f"stargz-overlay)")
            check_version(binary)
    except (MountProgramError, OSError) as exc:
        print(f"stargz-overlay-mount: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(binary, [binary] + new_argv)
    except OSError as exc:
        print(f"stargz-overlay-mount: cannot run {binary}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
