/* plugin_abi.h - the fuse-overlayfs 1.x plugin ABI, mirrored from the 1.x headers
   (fuse-overlayfs.h, plugin.h, plugin-manager.h).

   fuse-overlayfs dlopen()s the plugin with RTLD_NOW|RTLD_LOCAL and looks up the four
   exported functions below.  For every lower layer written //NAME/DATA/PATH it calls
   plugin_load(DATA, PATH), ds->num_of_layers(DATA, PATH) and, per layer, callocs a
   struct ovl_layer and calls ds->load_data_source(l, DATA, PATH, i).

   Layout rules (checked against the Debian 1.10 binary by the tests):
   - struct data_source: 1.0-1.10 call 13 slots; 1.11-1.16 add support_acls; the last C
     code adds get_nfs_filehandle.  We always provide all 15; older versions never read
     the extra ones.
   - struct ovl_layer: 56 bytes on x86-64 up to 1.16.  Later C code appends st_dev,
     nfs_filehandles and fh, which a plugin must never write (the struct may be shorter).

   The part between the CDEF markers is also fed to cffi's cdef(), so it must stay plain
   declarations (no preprocessor lines, no macros).  */
#ifndef STARGZ_PLUGIN_ABI_H
#define STARGZ_PLUGIN_ABI_H

#include <dirent.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>

/* CDEF-BEGIN */
struct ovl_data;

struct ovl_layer
{
  struct ovl_layer *next;
  struct data_source *ds;
  struct ovl_data *ovl_data;
  char *path;                       /* optional malloc()ed string, freed by fuse-overlayfs */
  int fd;                           /* O_DIRECTORY fd of a real directory (statfs uses it) */
  bool low;
  void *data_source_private_data;   /* the plugin's per-layer pointer */
  int stat_override_mode;           /* leave 0; never write anything after this field */
};

struct data_source
{
  int (*num_of_layers) (const char *opaque, const char *path);
  int (*load_data_source) (struct ovl_layer *l, const char *opaque, const char *path, int n_layer);
  int (*cleanup) (struct ovl_layer *l);
  int (*file_exists) (struct ovl_layer *l, const char *pathname);
  int (*statat) (struct ovl_layer *l, const char *path, struct stat *st, int flags, unsigned int mask);
  int (*fstat) (struct ovl_layer *l, int fd, const char *path, unsigned int mask, struct stat *st);
  void *(*opendir) (struct ovl_layer *l, const char *path);
  struct dirent *(*readdir) (void *dirp);
  int (*closedir) (void *dirp);
  int (*openat) (struct ovl_layer *l, const char *path, int flags, mode_t mode);
  int (*listxattr) (struct ovl_layer *l, const char *path, char *buf, size_t size);
  int (*getxattr) (struct ovl_layer *l, const char *path, const char *name, char *buf, size_t size);
  ssize_t (*readlinkat) (struct ovl_layer *l, const char *path, char *buf, size_t bufsiz);
  /* fuse-overlayfs 1.11 - 1.16: */
  bool (*support_acls) (struct ovl_layer *l);
  /* C code after 1.16: */
  ino_t (*get_nfs_filehandle) (const struct ovl_layer *l, const char *path);
};
/* CDEF-END */

/* The four symbols fuse-overlayfs looks up (plugin.h).  plugin_version() must return 1;
   plugin_name()'s string is kept, not copied; plugin_load() returns NULL on failure.  */
int plugin_version (void);
const char *plugin_name (void);
struct data_source *plugin_load (const char *opaque, const char *path);
int plugin_release (void);

#endif
