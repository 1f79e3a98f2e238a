/* glue.c - the little C that the cffi-embedded plugin needs around its Python code.
   Compiled into libstargz_plugin.so by cstub/build_plugin.py (set_source preamble).  */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <wchar.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include "plugin_abi.h"

/* The embedded interpreter runs inside /usr/bin/fuse-overlayfs, so Python cannot find its
   prefix from the executable (it would search PATH for "python3" and could pick another
   installation's standard library).  The builder passes the prefix of the Python this .so
   links against as SZ_PYTHON_HOME; PYTHONHOME, when set, still wins.  */
#ifdef SZ_PYTHON_HOME
static wchar_t sz_python_home[4096];
#endif

/* fuse-overlayfs dlopen()s plugins RTLD_LOCAL, so libpython (our dependency) is not in the
   global scope and Python extension modules such as _cffi_backend cannot resolve Py*
   symbols.  Re-open the already loaded libpython with RTLD_GLOBAL before Python starts.  */
__attribute__ ((constructor)) static void
sz_promote_libpython (void)
{
  Dl_info info;
  if (dladdr ((void *) &Py_IsInitialized, &info) && info.dli_fname)
    dlopen (info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
#ifdef SZ_PYTHON_HOME
  if (!Py_IsInitialized () && getenv ("PYTHONHOME") == NULL
      && mbstowcs (sz_python_home, SZ_PYTHON_HOME, 4095) != (size_t) -1)
    {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
      Py_SetPythonHome (sz_python_home);
#pragma GCC diagnostic pop
    }
#endif
}

/* The file name this .so was loaded from (as given to dlopen), so the embedded Python can
   find the package it belongs to without environment variables.  */
static const char *
sz_self_path (void)
{
  Dl_info info;
  if (dladdr ((void *) &sz_self_path, &info) && info.dli_fname)
    return info.dli_fname;
  return "";
}

/* Fill every field of *st (fuse-overlayfs reads st_rdev even when asking for the type only). */
static void
sz_fill_stat (struct stat *st, unsigned long long dev, unsigned long long ino, unsigned int mode,
              unsigned long long nlink, unsigned int uid, unsigned int gid, unsigned int rdev_major,
              unsigned int rdev_minor, long long size, long long mtime)
{
  memset (st, 0, sizeof *st);
  st->st_dev = (dev_t) dev;
  st->st_ino = (ino_t) ino;
  st->st_mode = (mode_t) mode;
  st->st_nlink = (nlink_t) nlink;
  st->st_uid = (uid_t) uid;
  st->st_gid = (gid_t) gid;
  st->st_rdev = makedev (rdev_major, rdev_minor);
  st->st_size = (off_t) size;
  st->st_blksize = 4096;
  st->st_blocks = S_ISREG (mode) || S_ISDIR (mode) || S_ISLNK (mode)
                    ? (blkcnt_t) (((size + 4095) / 4096) * 8) : 0;
  st->st_atim.tv_sec = st->st_mtim.tv_sec = st->st_ctim.tv_sec = (time_t) mtime;
}

/* libc readdir() on a DIR* from fdopendir(), then the plugin's inode number and type.
   Returns NULL with errno 0 at the end (fuse-overlayfs sets errno = 0 before each call). */
static struct dirent *
sz_readdir (void *dirp, int *errnop)
{
  struct dirent *de;
  errno = 0;
  de = readdir ((DIR *) dirp);
  *errnop = errno;
  return de;
}

static void
sz_set_dirent (struct dirent *de, unsigned long long ino, unsigned char type)
{
  de->d_ino = (ino_t) ino;
  de->d_type = type;
}

static void *
sz_fdopendir (int fd)
{
  return (void *) fdopendir (fd);
}

static int
sz_closedir (void *dirp)
{
  return closedir ((DIR *) dirp);
}
