"""The fuse-overlayfs plugin callbacks (runs inside ``libstargz_plugin.so``).

Only importable in the embedded interpreter, where cffi provides the
``_stargz_plugin`` module.  This file is the thin ABI layer: argument
conversion, errno, logging; the filesystem logic is in ``layer_view`` and
the loading in ``plugin_state``.

Rules from the ABI (see cstub/plugin_abi.h): every callback returns -1 (or
NULL) with errno set on failure and never lets an exception escape; nothing
is written to stdout/stderr after fuse-overlayfs has daemonised; no thread
is started before the fork.
"""

import errno
import logging
import os

from _stargz_plugin import ffi, lib

from .access_log import AccessLog
from .errors import StargzError
from .layer_view import normalize
from .plugin_state import STATE

log = logging.getLogger("stargz_overlay.plugin")

PLUGIN_NAME = ffi.new("char[]", b"stargz")   # kept alive: fuse-overlayfs stores the pointer
_DS = ffi.new("struct data_source *")
_DIRS = {}   # DIR* address -> (LayerView, directory name)


def attach(ffi_, lib_, so_path):
    """Called by the .so's init code once this module is imported."""
    STATE.so_path = so_path
    for slot in ("num_of_layers", "load_data_source", "cleanup", "file_exists", "statat",
                 "fstat", "opendir", "openat", "listxattr", "getxattr", "readlinkat",
                 "support_acls", "get_nfs_filehandle"):
        setattr(_DS, slot, getattr(lib, "sz_" + slot))
    _DS.readdir = lib.sz_readdir_cb
    _DS.closedir = lib.sz_closedir_cb


def _onerror(exc_type, exc, tb):
    """Map an exception escaping a callback to errno (EIO when unexpected)."""
    if isinstance(exc, OSError) and exc.errno:
        ffi.errno = exc.errno
    else:
        ffi.errno = errno.EIO
        log.error("unexpected error in a plugin callback", exc_info=(exc_type, exc, tb))
    return None


_STRING_TYPES = (ffi.typeof("const char *"),)


def _traced(fn):
    """Log the call and its result when ``log_calls`` is on (tests, debugging)."""
    name = fn.__name__.removeprefix("sz_").removesuffix("_cb")

    def shown(arg):
        if isinstance(arg, ffi.CData):
            if arg == ffi.NULL:
                return "NULL"
            if ffi.typeof(arg) in _STRING_TYPES:
                return repr(ffi.string(arg))
            return "ptr"
        return oct(arg) if name == "openat" else repr(arg)

    def wrapper(*args):
        if not STATE.log_calls:
            return fn(*args)
        text = ", ".join(shown(a) for a in args)
        try:
            result = fn(*args)
        except OSError as exc:
            log.debug("call %s(%s) -> %s", name, text, errno.errorcode.get(exc.errno, exc.errno))
            raise
        failed = (result == -1 or result == ffi.NULL) if result is not None else False
        log.debug("call %s(%s) -> %s%s", name, text, "ptr" if isinstance(result, ffi.CData)
                  else result, f" {errno.errorcode.get(ffi.errno, '')}" if failed else "")
        return result

    wrapper.__name__ = fn.__name__
    return wrapper


def _path(p):
    return os.fsdecode(ffi.string(p))


_RECORD = []   # [AccessLog] once the configuration names a record_file


def _record(l, op, path):
    """Append a successful access to the ``record_file`` (``convert --optimize``)."""
    if not STATE.config.record_file:
        return
    if not _RECORD:
        _RECORD.append(AccessLog(STATE.config.record_file))
    try:
        _RECORD[0].record(_view(l), op, _path(path))
    except OSError as exc:
        log.error("cannot write the access record %s: %s", STATE.config.record_file, exc)


def _view(l):
    return STATE.view(int(ffi.cast("uintptr_t", l.data_source_private_data)))


def _copy_out(value, buf, size):
    if size == 0:
        return len(value)
    if size < len(value):
        ffi.errno = errno.ERANGE
        return -1
    ffi.memmove(buf, value, len(value))
    return len(value)


# -- the four exported symbols --

@ffi.def_extern(error=0)
def plugin_version():
    return 1


@ffi.def_extern()
def plugin_name():
    return PLUGIN_NAME


@ffi.def_extern(onerror=_onerror)
def plugin_load(opaque, path):
    try:
        STATE.plugin_load(ffi.string(opaque).decode("ascii", "replace"),
                          _path(path) if path else "")
    except StargzError as exc:
        STATE.report_load_error(str(exc))
        ffi.errno = errno.EINVAL
        return ffi.NULL
    return _DS


@ffi.def_extern(error=0, onerror=_onerror)
def plugin_release():
    STATE.release()
    return 0


# -- struct data_source --

@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_num_of_layers(opaque, path):
    return 1


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_load_data_source(l, opaque, path, n):
    try:
        slot, fd = STATE.load_layer(ffi.string(opaque).decode("ascii", "replace"), _path(path))
    except StargzError as exc:
        STATE.report_load_error(str(exc))
        ffi.errno = errno.EINVAL
        return -1
    except OSError as exc:
        STATE.report_load_error(f"layer directory {_path(path)}: {exc.strerror}")
        ffi.errno = exc.errno or errno.EIO
        return -1
    l.fd = fd
    l.data_source_private_data = ffi.cast("void *", slot)
    return 0


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_cleanup(l):
    STATE.unload_layer(int(ffi.cast("uintptr_t", l.data_source_private_data)))
    return 0


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_file_exists(l, path):
    STATE.touch()
    if _view(l).exists(_path(path)):
        return 0
    ffi.errno = errno.ENOENT
    return -1


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_statat(l, path, st, flags, mask):
    view = _view(l)
    lib.sz_fill_stat(st, *view.stat_fields(view.lookup(_path(path))))
    _record(l, "stat", path)
    return 0


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_fstat(l, fd, path, mask, st):
    view = _view(l)
    lib.sz_fill_stat(st, *view.stat_fields(view.lookup(_path(path))))
    return 0


@ffi.def_extern(onerror=_onerror)
@_traced
def sz_opendir(l, path):
    STATE.touch()
    view = _view(l)
    name = normalize(_path(path))
    fd = view.open_dir(name)
    dirp = lib.sz_fdopendir(fd)
    if dirp == ffi.NULL:
        err = ffi.errno
        os.close(fd)
        ffi.errno = err or errno.ENOMEM
        return ffi.NULL
    _DIRS[int(ffi.cast("uintptr_t", dirp))] = (view, name)
    return dirp


@ffi.def_extern(onerror=_onerror)
@_traced
def sz_readdir_cb(dirp):
    view, name = _DIRS[int(ffi.cast("uintptr_t", dirp))]
    errp = ffi.new("int *")
    while True:
        de = lib.sz_readdir(dirp, errp)
        if de == ffi.NULL:
            ffi.errno = errp[0]
            return ffi.NULL
        child = ffi.string(de.d_name)
        if child == b"." or child == b"..":
            return de
        fields = view.dirent_fields(name, os.fsdecode(child))
        if fields is not None:
            lib.sz_set_dirent(de, *fields)
            return de


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_closedir_cb(dirp):
    _DIRS.pop(int(ffi.cast("uintptr_t", dirp)), None)
    return lib.sz_closedir(dirp)


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_openat(l, path, flags, mode):
    STATE.touch()
    fd = _view(l).open(_path(path), flags)
    _record(l, "open", path)
    return fd


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_listxattr(l, path, buf, size):
    return _copy_out(_view(l).xattr_names(_path(path)), buf, size)


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_getxattr(l, path, name, buf, size):
    return _copy_out(_view(l).xattr(_path(path), _path(name)), buf, size)


@ffi.def_extern(error=-1, onerror=_onerror)
@_traced
def sz_readlinkat(l, path, buf, bufsiz):
    target = _view(l).readlink(_path(path))[:bufsiz]
    _record(l, "readlink", path)
    ffi.memmove(buf, target, len(target))
    return len(target)


@ffi.def_extern(error=True, onerror=_onerror)
@_traced
def sz_support_acls(l):
    # 1.11+ turn POSIX ACLs off for the whole mount if any layer says no; a plain
    # directory layer says yes, and missing ACL xattrs are answered with ENODATA.
    return True


@ffi.def_extern(error=0, onerror=_onerror)
@_traced
def sz_get_nfs_filehandle(l, path):
    ffi.errno = errno.ENOTSUP
    return 0
