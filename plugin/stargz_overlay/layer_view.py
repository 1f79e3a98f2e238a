"""One stargz layer seen as a read-only directory tree, for the plugin callbacks.

Every metadata answer (stat, lookup, listing, xattrs, symlink targets) comes
from the TOC in memory.  The only disk state is per layer, under the layer's
private directory (PATH of ``//stargz/DATA/PATH``):

- ``tree/``: a skeleton of the layer, made on demand one directory at a time.
  Directories carry the layer's owner, mode, mtime and xattrs (fuse-overlayfs
  copies a directory up from the fd ``openat`` returns); their children are
  empty placeholders, so ``opendir`` can return a real glibc ``DIR *``.
- regular files are served from the shared ``ContentCache``: the first
  ``openat`` fetches the whole file, verifies it and returns an O_RDONLY fd of
  the cached copy, whose size always equals the ``st_size`` reported.

The view follows what a plain directory with the extracted layer would
show, except that a whiteout ``.wh.X`` is dropped when ``X`` itself is in the
same directory of the layer (fuse-overlayfs would otherwise hide ``X``,
while OCI whiteouts only apply to lower layers).
"""

import errno
import fcntl
import logging
import os
import posixpath
import shutil
import stat
import threading

from .cache import CacheError
from .errors import StargzError
from .toc import OPAQUE_MARKER, WHITEOUT_PREFIX

log = logging.getLogger("stargz_overlay.plugin")

INO_BASE = 1 << 40          # private inode range, clear of real filesystems
INO_LAYER_STRIDE = 1 << 32  # each layer of a process gets its own range

PRIVATE_DIRS = ("tree", "xattr-files", "specials")   # per-layer state under the layer dir
TYPE_MODE = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK,
             "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_MAX = 4096             # bytes, the terminating NUL included
SHORT_PATH = PATH_MAX // 4  # characters: under PATH_MAX even at 4 bytes each
TYPE_DT = {"dir": 4, "reg": 8, "symlink": 10, "char": 2, "block": 6, "fifo": 1}  # DT_*


def fs_error(code, what=""):
    return OSError(code, os.strerror(code), what)


def normalize(path):
    """Layer-relative name for a path from fuse-overlayfs ('.', './x', '/.wh.', 'a/b')."""
    while True:
        if path.startswith("/"):
            path = path.lstrip("/")
        elif path.startswith("./"):
            path = path[2:]
        elif path == ".":
            return ""
        else:
            break
    if "/." in path or "//" in path or path.endswith("/"):
        path = posixpath.normpath("/" + path).lstrip("/")
    return path


def remove_tree(path):
    """``rm -rf path``, ignoring errors, for trees of any depth.

    shutil.rmtree recurses (a skeleton thousands of directories deep raised
    RecursionError, which ``ignore_errors`` does not cover, and left a layer
    directory that no later mount could reset).  Here every subdirectory is
    first moved up next to ``path`` and handled from there, so no level is
    deeper than one and no path grows long.
    """
    parent, base = os.path.split(os.path.abspath(path))
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    todo = [base]
    moved = 0
    try:
        while todo:
            name = todo.pop()
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
            except FileNotFoundError:
                continue
            except OSError:                     # not a directory (or a symlink to one)
                _ignore(os.unlink, name, dir_fd=pfd)
                continue
            try:
                _ignore(os.fchmod, fd, 0o700)   # the layer's mode may forbid writing
                with os.scandir(fd) as it:
                    children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                for child, is_dir in children:
                    if is_dir:
                        flat = f"{base}.rm.{os.getpid()}.{moved}"
                        moved += 1
                        if _ignore(os.rename, child, flat, src_dir_fd=fd, dst_dir_fd=pfd):
                            todo.append(flat)
                    else:
                        _ignore(os.unlink, child, dir_fd=fd)
            finally:
                os.close(fd)
            _ignore(os.rmdir, name, dir_fd=pfd)
    finally:
        os.close(pfd)


def _ignore(fn, *args, **kw):
    try:
        fn(*args, **kw)
        return True
    except OSError:
        return False


def lock_directory(path, busy):
    """Create ``path`` (0700) and hold an exclusive flock on it; StargzError(``busy``) if
    another process holds it.  Returns the fd: the lock lives as long as it, and passes
    to the forked daemon with it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StargzError(busy) from None
    return fd


class CountingSource:
    """Pass-through blob source that logs every read (``log_reads``) and counts them."""

    def __init__(self, inner, label, log_reads):
        self.inner = inner
        self.size = inner.size
        self.label = label
        self.log_reads = log_reads
        self.reads = 0
        self.bytes = 0

    def read_at(self, offset, length):
        self.reads += 1
        self.bytes += length
        if self.log_reads:
            log.info("blob-read %s offset=%d length=%d", self.label, offset, length)
        return self.inner.read_at(offset, length)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class LayerView:
    """The files of one layer, answered from its TOC."""

    def __init__(self, reader, workdir, cache, slot, label):
        self.reader = reader
        self.toc = reader.toc
        self.workdir = workdir
        self.tree = os.path.join(workdir, "tree")
        self.cache = cache
        self.label = label
        self.ino_base = INO_BASE + slot * INO_LAYER_STRIDE
        self.dev = os.makedev(0xfe, 0x100 + slot)   # constant per layer, unlike real devices
        self.paths = {}     # name -> Entry (every visible name, hardlinks included)
        self.listing = {}   # directory name -> {child name: Entry}, visible children only
        self._computed = {}            # Entry.ino -> digest, for files the TOC gives none
        self._made = set()             # skeleton directories already materialised
        self._placeholder = None       # the empty file that skeleton names link to
        self._placeholders = 0
        self._skel_lock = threading.Lock()
        self.fetch = None              # LayerFetch (prefetch waits, metrics, pins), if any
        self._build()
        self._lock_fd = self._lock_workdir()
        self._reset_tree()

    # -- set-up --

    def _build(self):
        """Fill ``paths`` and ``listing`` (a directory's own children dict unless a
        whiteout in it is hidden)."""
        paths = self.paths
        paths[""] = self.toc.root
        stack = [("", self.toc.root)]
        while stack:
            path, entry = stack.pop()
            children = entry.children
            prefix = f"{path}/" if path else ""
            hidden = []
            for name, child in children.items():
                if (name.startswith(WHITEOUT_PREFIX) and name != OPAQUE_MARKER
                        and name[len(WHITEOUT_PREFIX):] in children):
                    hidden.append(name)
                    continue
                child_path = prefix + name
                paths[child_path] = child
                if child.type == "dir":
                    stack.append((child_path, child))
            if hidden:
                children = {k: v for k, v in children.items() if k not in hidden}
            self.listing[path] = children

    def _lock_workdir(self):
        return lock_directory(self.workdir, f"layer directory {self.workdir} is in use by "
                              f"another mount; give each layer of each mount its own directory")

    def _reset_tree(self):
        for sub in PRIVATE_DIRS:
            old = os.path.join(self.workdir, sub)
            if os.path.lexists(old):
                trash = f"{old}.old.{os.getpid()}"
                os.rename(old, trash)
                remove_tree(trash)
        os.mkdir(self.tree, 0o700)

    def close(self):
        for sub in PRIVATE_DIRS:
            remove_tree(os.path.join(self.workdir, sub))
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        close = getattr(self.reader.source, "close", None)
        if close is not None:
            close()

    # -- lookups --

    def lookup(self, path):
        entry = self.paths.get(normalize(path))
        if entry is None:
            raise fs_error(errno.ENOENT)
        return entry

    def exists(self, path):
        return normalize(path) in self.paths

    def ino(self, entry):
        return self.ino_base + entry.ino

    def stat_fields(self, entry):
        """(dev, ino, mode, nlink, uid, gid, rdev major, rdev minor, size, mtime)."""
        kind = entry.type
        if kind == "reg":
            size = entry.size
        elif kind == "symlink":
            size = len(os.fsencode(entry.link_name))
        elif kind == "dir":
            size = 4096
        else:
            size = 0
        mode = entry.mode if kind != "symlink" else 0o777     # Linux symlinks are 0777
        return (self.dev, self.ino_base + entry.ino, TYPE_MODE[kind] | mode, entry.nlink,
                entry.uid, entry.gid, entry.dev_major, entry.dev_minor, size, entry.mtime)

    def dirent_fields(self, dir_path, name):
        """(d_ino, d_type) of ``name`` in directory ``dir_path``, or None if not listed."""
        children = self.listing.get(dir_path)
        entry = children.get(name) if children else None
        if entry is None:
            return None
        return self.ino_base + entry.ino, TYPE_DT[entry.type]

    def readlink(self, path):
        entry = self.lookup(path)
        if entry.type != "symlink":
            raise fs_error(errno.EINVAL)
        return os.fsencode(entry.link_name)

    def xattr_names(self, path):
        return b"".join(os.fsencode(k) + b"\0" for k in self.lookup(path).xattrs)

    def xattr(self, path, name):
        value = self.lookup(path).xattrs.get(name)
        if value is None:
            raise fs_error(errno.ENODATA)
        return value

    # -- directories on disk --
    #
    # Only opening a skeleton directory takes a path; everything else is done
    # relative to a directory fd, so a layer path of any legal length works
    # (tree/ + a 4095-byte name exceeds PATH_MAX).  The skeleton holds only
    # directories and hard links to a regular file, never a symlink.

    def open_dir(self, path):
        """O_RDONLY fd of the materialised skeleton directory ``path`` (normalised)."""
        entry = self.paths.get(path)
        if entry is None:
            raise fs_error(errno.ENOENT)
        if entry.type != "dir":
            raise fs_error(errno.ENOTDIR)
        with self._skel_lock:
            return self._make_dir(path)

    def _open_skeleton(self, path):
        """fd of the existing skeleton directory ``path``: one open by absolute path when
        it fits under PATH_MAX (the common case), else one component at a time."""
        full = f"{self.tree}/{path}" if path else self.tree
        if len(full) < SHORT_PATH or len(os.fsencode(full)) < PATH_MAX:
            return os.open(full, DIR_FLAGS)
        fd = os.open(self.tree, DIR_FLAGS)
        try:
            for part in path.split("/"):
                fd, parent = os.open(part, DIR_FLAGS, dir_fd=fd), fd
                os.close(parent)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _make_dir(self, path):
        """fd of ``path``, materialised with any missing parents, top-down (no
        recursion: a layer may nest thousands of directories)."""
        chain = []
        while path not in self._made:
            chain.append(path)
            if not path:
                break
            path = posixpath.dirname(path)
        if not chain:
            return self._open_skeleton(path)
        chain.reverse()
        fd = self._open_skeleton(chain[0])     # exists: its parent was populated
        try:
            for depth, path in enumerate(chain):
                if depth:
                    fd, parent = os.open(posixpath.basename(path), DIR_FLAGS, dir_fd=fd), fd
                    os.close(parent)
                self._populate(fd, path)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _populate(self, fd, path):
        for name, child in self.listing[path].items():
            try:
                if child.type == "dir":
                    os.mkdir(name, 0o700, dir_fd=fd)
                else:
                    self._placeholder_link(fd, name)
            except FileExistsError:
                pass
        self._apply_metadata(fd, self.paths[path])
        self._made.add(path)

    def _placeholder_link(self, dir_fd, name):
        """A name for a non-directory: a hard link to one empty file (no new inode)."""
        while True:
            if self._placeholder is None:
                self._placeholder = os.path.join(self.workdir, "specials",
                                                 f"placeholder.{self._placeholders}")
                self._placeholders += 1
                os.makedirs(os.path.dirname(self._placeholder), mode=0o700, exist_ok=True)
                os.close(os.open(self._placeholder, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC,
                                 0o600))
            try:
                os.link(self._placeholder, name, dst_dir_fd=dir_fd)
                return
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                self._placeholder = None       # link count limit: start another one

    def _apply_metadata(self, fd, entry):
        self._set_xattrs(fd, entry)
        try:
            os.fchown(fd, entry.uid, entry.gid)
        except OSError as exc:
            log.debug("%s: cannot chown %r: %s", self.label, entry.name, exc)
        os.fchmod(fd, entry.mode)
        os.utime(fd, (entry.mtime, entry.mtime))

    # -- opening --

    def resolve(self, path, follow=True):
        """``(name, Entry or None, [symlinks followed])`` for ``path`` within this layer."""
        name = normalize(path)
        entry = self.paths.get(name)
        hops = []
        while follow and entry is not None and entry.type == "symlink":
            if len(hops) >= 40:
                raise fs_error(errno.ELOOP)
            hops.append(name)
            target = entry.link_name
            base = "" if target.startswith("/") else posixpath.dirname(name)
            name = normalize(posixpath.join(base, target))
            entry = self.paths.get(name)
        return name, entry, hops

    def open(self, path, flags):
        """A real O_RDONLY fd for ``path``: whole verified file, or a real directory."""
        if flags & os.O_NOFOLLOW:
            link = self.paths.get(normalize(path))
            if link is not None and link.type == "symlink":
                raise fs_error(errno.ELOOP)
        name, entry, _ = self.resolve(path)
        if entry is None:
            raise fs_error(errno.ENOENT)
        if entry.type == "dir":
            return self.open_dir(name)
        if flags & os.O_DIRECTORY:
            raise fs_error(errno.ENOTDIR)
        if entry.type != "reg":
            return os.open(self._special(entry), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fetch is not None:
            cached = self.fetch.open_file(entry, name)
        else:
            cached = self.file_path(entry, name)
        if entry.xattrs:
            cached = self._with_xattrs(entry, cached)
        return os.open(cached, os.O_RDONLY | os.O_CLOEXEC | (flags & os.O_NONBLOCK))

    def _with_xattrs(self, entry, cached):
        """A per-layer copy of a cached file carrying the entry's xattrs.

        Copy-up takes xattrs from the fd, and the shared cache file cannot
        carry them (one content, possibly several sets of xattrs).
        """
        path = os.path.join(self.workdir, "xattr-files", str(entry.ino))
        if os.path.exists(path):
            return path
        with self._skel_lock:
            if os.path.exists(path):
                return path
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            tmp = path + ".tmp"
            with open(cached, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            self._set_xattrs(tmp, entry)
            os.chmod(tmp, 0o400)
            os.rename(tmp, path)
        return path

    def _special(self, entry):
        """A stand-in for a fifo or device: fuse-overlayfs opens one on unlink/copy-up.

        Fifos get a real fifo; devices an empty regular file, so that no device
        driver is ever opened; both carry the entry's xattrs.
        """
        path = os.path.join(self.workdir, "specials", str(entry.ino))
        with self._skel_lock:
            if not os.path.lexists(path):
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                if entry.type == "fifo":
                    os.mkfifo(path, 0o600)
                else:
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
                self._set_xattrs(path, entry)
        return path

    def _set_xattrs(self, target, entry):
        """Set ``entry``'s xattrs on ``target``, an fd or a path (never followed)."""
        nofollow = {} if isinstance(target, int) else {"follow_symlinks": False}
        for key, value in entry.xattrs.items():
            try:
                os.setxattr(target, key, value, **nofollow)
            except OSError as exc:
                log.warning("%s: cannot set xattr %s on %s: %s", self.label, key,
                            entry.name, exc)

    def cached(self, entry):
        """Is the content of ``entry`` already in the cache (verified)?"""
        digest = entry.digest or self._computed.get(entry.ino)
        return entry.size == 0 or (digest is not None
                                   and self.cache.lookup(digest, entry.size) is not None)

    def file_path(self, entry, name, reader=None):
        """Cache path of a regular file's verified content, fetched if needed.

        Fails with ENOSPC when the cache has no room for it, EIO otherwise.
        """
        if entry.size == 0:
            return self.cache.empty()
        reader = reader or self.reader
        digest = entry.digest or self._computed.get(entry.ino)
        try:
            if digest is not None:
                path = self.cache.get(digest, entry.size,
                                      lambda: self._fetch(reader, entry, name))
                computed = False
            else:
                digest, path = self.cache.put(self._fetch(reader, entry, name), entry.size)
                self._computed[entry.ino] = digest
                computed = True
        except CacheError as exc:
            log.error("%s: cannot open %s: %s", self.label, name, exc)
            raise fs_error(exc.errno, name) from None
        except StargzError as exc:
            log.error("%s: cannot open %s: %s", self.label, name, exc)
            raise fs_error(errno.EIO, name) from None
        except OSError as exc:
            log.error("%s: cannot open %s: %s", self.label, name, exc)
            raise fs_error(errno.EIO, name) from None
        if self.fetch is not None:
            self.fetch.stored(entry, digest, computed)
        return path

    def _fetch(self, reader, entry, name):
        log.debug("%s: fetching %s (%d bytes)", self.label, name, entry.size)
        return reader.iter_file(entry)
