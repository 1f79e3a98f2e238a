"""Build ``libstargz_plugin.so``: the fuse-overlayfs plugin, Python embedded with cffi.

    python3 cstub/build_plugin.py OUTPUT.so [--extra-site DIR ...]

The .so exports the four plugin symbols (``plugin_version``, ``plugin_name``,
``plugin_load``, ``plugin_release``); their bodies and every ``data_source``
callback live in ``stargz_overlay.plugin``.  At start the embedded interpreter
puts the site directory holding this .so's package first on ``sys.path`` (with
``site.addsitedir``, so ``.pth`` files work), then any ``--extra-site`` directory
(used for editable installs, whose package is not in a site directory); no
environment variable is needed, system-wide or in a virtualenv.
"""

import argparse
import os
import re
import sys
import sysconfig
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "_stargz_plugin"
DEFAULT_LIB_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
                    "/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                    "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu")

TYPES_CDEF = """
typedef int... mode_t;
typedef int... ino_t;
struct stat;
struct dirent;
"""

LIBC_CDEF = """
struct stat { ...; };
struct dirent { ino_t d_ino; unsigned char d_type; char d_name[...]; ...; };
#define DT_UNKNOWN ...
#define DT_FIFO ...
#define DT_CHR ...
#define DT_DIR ...
#define DT_BLK ...
#define DT_REG ...
#define DT_LNK ...

const char *sz_self_path(void);
void sz_fill_stat(struct stat *st, unsigned long long dev, unsigned long long ino,
                  unsigned int mode, unsigned long long nlink, unsigned int uid,
                  unsigned int gid, unsigned int rdev_major, unsigned int rdev_minor,
                  long long size, long long mtime);
struct dirent *sz_readdir(void *dirp, int *errnop);
void sz_set_dirent(struct dirent *de, unsigned long long ino, unsigned char type);
void *sz_fdopendir(int fd);
int sz_closedir(void *dirp);
"""

CALLBACKS_CDEF = """
extern "Python" {
  int sz_num_of_layers(const char *opaque, const char *path);
  int sz_load_data_source(struct ovl_layer *l, const char *opaque, const char *path, int n);
  int sz_cleanup(struct ovl_layer *l);
  int sz_file_exists(struct ovl_layer *l, const char *path);
  int sz_statat(struct ovl_layer *l, const char *path, struct stat *st, int flags,
                unsigned int mask);
  int sz_fstat(struct ovl_layer *l, int fd, const char *path, unsigned int mask,
               struct stat *st);
  void *sz_opendir(struct ovl_layer *l, const char *path);
  struct dirent *sz_readdir_cb(void *dirp);
  int sz_closedir_cb(void *dirp);
  int sz_openat(struct ovl_layer *l, const char *path, int flags, mode_t mode);
  int sz_listxattr(struct ovl_layer *l, const char *path, char *buf, size_t size);
  int sz_getxattr(struct ovl_layer *l, const char *path, const char *name, char *buf,
                  size_t size);
  ssize_t sz_readlinkat(struct ovl_layer *l, const char *path, char *buf, size_t bufsiz);
  bool sz_support_acls(struct ovl_layer *l);
  ino_t sz_get_nfs_filehandle(const struct ovl_layer *l, const char *path);
}
"""

EMBEDDING_API = """
int plugin_version(void);
const char *plugin_name(void);
struct data_source *plugin_load(const char *opaque, const char *path);
int plugin_release(void);
"""

INIT_CODE = r'''
import os, site, sys
from {module} import ffi, lib

def _stargz_setup_path(extra):
    so = os.path.realpath(os.fsdecode(ffi.string(lib.sz_self_path())))
    wanted = [os.path.dirname(os.path.dirname(so))] + extra
    before = list(sys.path)
    for directory in wanted:
        if os.path.isdir(directory):
            site.addsitedir(directory)
    added = [p for p in sys.path if p not in before]
    first = [p for p in wanted if p in sys.path] + added
    sys.path[:] = list(dict.fromkeys(first + before))
    return so

_stargz_so = _stargz_setup_path({extra!r})
import stargz_overlay.plugin
stargz_overlay.plugin.attach(ffi, lib, _stargz_so)
'''


def abi_cdef():
    """The declarations between the CDEF markers of plugin_abi.h, comments removed."""
    with open(os.path.join(HERE, "plugin_abi.h"), encoding="utf-8") as f:
        text = f.read()
    body = text.split("/* CDEF-BEGIN */", 1)[1].split("/* CDEF-END */", 1)[0]
    return re.sub(r"/\*.*?\*/", "", body, flags=re.S)


def python_link_args():
    """-Wl,-rpath to libpython's directory when it is not a default library directory."""
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return [], []
    if os.path.realpath(libdir) in {os.path.realpath(d) for d in DEFAULT_LIB_DIRS}:
        return [], []
    return [libdir], [f"-Wl,-rpath,{libdir}"]


def make_ffi(extra_site=()):
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(TYPES_CDEF)
    ffi.cdef(abi_cdef())
    ffi.cdef(LIBC_CDEF)
    ffi.cdef(CALLBACKS_CDEF)
    ffi.embedding_api(EMBEDDING_API)
    ffi.embedding_init_code(INIT_CODE.format(module=MODULE, extra=list(extra_site)))
    library_dirs, link_args = python_link_args()
    home = sys.base_prefix
    if sys.base_exec_prefix != sys.base_prefix:
        home = f"{sys.base_prefix}:{sys.base_exec_prefix}"
    ffi.set_source(MODULE, '#include "glue.c"', include_dirs=[HERE], libraries=["dl"],
                   define_macros=[("SZ_PYTHON_HOME", '"%s"' % home.replace('"', '\\"'))],
                   library_dirs=library_dirs, extra_link_args=link_args,
                   extra_compile_args=["-Wall", "-Wno-unused-function"])
    return ffi


def build(output, extra_site=(), verbose=False):
    """Compile the plugin into ``output`` (written atomically); return its path."""
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    ffi = make_ffi(extra_site)
    with tempfile.TemporaryDirectory(prefix="stargz-plugin-build-") as tmp:
        built = ffi.compile(tmpdir=tmp, target="libstargz_plugin.so", verbose=verbose)
        tmp_out = output + ".tmp"
        with open(built, "rb") as src, open(tmp_out, "wb") as dst:
            dst.write(src.read())
        os.chmod(tmp_out, 0o755)
        os.replace(tmp_out, output)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("--extra-site", action="append", default=[],
                        help="directory to add to the plugin's sys.path after its own")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    print(build(args.output, args.extra_site, args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
