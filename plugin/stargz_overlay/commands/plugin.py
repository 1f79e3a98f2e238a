"""Plugin commands: ``plugin-path`` and ``mount`` (fuse-overlayfs with stargz layers)."""

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess

from ..config import load_config
from ..errors import StargzError
from ..layer_spec import LayerSpec, encode

PLUGIN_SO = "libstargz_plugin.so"
DEFAULT_STATE_DIR = "/run/stargz-overlay"


def plugin_path():
    """Absolute path of the installed plugin .so (StargzError if it was not built)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PLUGIN_SO)
    if not os.path.exists(path):
        raise StargzError(f"the plugin is not built ({path} is missing); reinstall with "
                          f"'pip install .' (needs a C compiler and the Python headers)")
    return path


def fuse_overlayfs_version(binary):
    """(major, minor) of a fuse-overlayfs binary; StargzError if it cannot be run."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise StargzError(f"cannot run {binary}: {exc.strerror}") from None
    m = re.search(r"fuse-overlayfs:?\s+(?:version\s+)?v?(\d+)\.(\d+)", out.stdout + out.stderr)
    if not m:
        raise StargzError(f"{binary} --version did not print a fuse-overlayfs version")
    return int(m.group(1)), int(m.group(2))


def check_fuse_overlayfs(binary):
    major, minor = fuse_overlayfs_version(binary)
    if major != 1:
        raise StargzError(f"{binary} is fuse-overlayfs {major}.{minor}; plugin layers need "
                          f"fuse-overlayfs 1.x (2.x skips them: \"plugin layers not yet "
                          f"implemented\"). Install a 1.x release or pass --fuse-overlayfs")
    return major, minor


class _Ordered(argparse.Action):
    """Collect --blob/--registry-layer/--image/--lower in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "lowers", None) or [])
        items.append((self.dest, values))
        namespace.lowers = items


def _image_specs(ref, config):
    """Registry layer specs of an image, top-most first; every layer must be stargz."""
    from ..registry_layers import make_client
    client = make_client(config)
    try:
        image = client.resolve(ref)
        specs = []
        for index, layer in enumerate(image.layers):
            kind = client.classify_layer(image, layer)
            if kind.kind is None:
                raise StargzError(f"{ref}: layer {index} ({layer.digest}) cannot be mounted "
                                  f"lazily: {kind.reason}")
            specs.append(LayerSpec("registry", ref=image.reference, digest=layer.digest,
                                   toc=layer.toc_digest, size=layer.size))
        return specs[::-1]
    finally:
        client.close()


def build_command(args):
    """The fuse-overlayfs command line for ``mount``."""
    if not args.lowers:
        raise StargzError("give at least one layer (--blob, --registry-layer, --image or --lower)")
    if bool(args.upper) != bool(args.work):
        raise StargzError("--upper and --work go together")
    mountpoint = os.path.abspath(args.mountpoint)
    config_path = os.path.abspath(args.config) if args.config else None
    config = None
    state = os.path.join(os.path.abspath(args.state_dir),
                         hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16])
    items = []
    plugin_layers = 0
    for kind, value in args.lowers:
        if kind == "lower":
            path = os.path.abspath(value)
            if not os.path.isdir(path):
                raise StargzError(f"--lower {value}: not a directory")
            items.append(path)
            continue
        if kind == "blob":
            path = os.path.abspath(value)
            if not os.path.isfile(path):
                raise StargzError(f"--blob {value}: no such file")
            specs = [LayerSpec("blob", path=path, config=config_path)]
        elif kind == "registry_layer":
            ref, digest = value
            specs = [LayerSpec("registry", ref=ref.removeprefix("docker://"), digest=digest,
                               config=config_path)]
        else:
            config = config or load_config(config_path)
            specs = _image_specs(value.removeprefix("docker://"), config)
            for spec in specs:
                spec.config = config_path
        for spec in specs:
            items.append(f"//stargz/{encode(spec)}/{os.path.join(state, str(plugin_layers))}")
            plugin_layers += 1
    for item in items:
        if ":" in item or "," in item:
            raise StargzError(f"lower layer path {item!r} contains ':' or ','")
    opts = []
    if plugin_layers:
        opts += [f"plugins={plugin_path()}", "fast_ino=1"]
    opts.append("lowerdir=" + ":".join(items))
    if args.upper:
        opts += [f"upperdir={os.path.abspath(args.upper)}",
                 f"workdir={os.path.abspath(args.work)}"]
    if args.threaded:
        opts.append("threaded=1")
    opts += args.options
    return [args.fuse_overlayfs, "-o", ",".join(opts), mountpoint], state


def cmd_plugin_path(args):
    print(plugin_path())
    return 0


def cmd_mount(args):
    args.fuse_overlayfs = args.fuse_overlayfs or shutil.which("fuse-overlayfs") or \
        "/usr/bin/fuse-overlayfs"
    check_fuse_overlayfs(args.fuse_overlayfs)
    command, state = build_command(args)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    os.makedirs(state, mode=0o700, exist_ok=True)
    if args.upper:
        os.makedirs(args.upper, mode=0o755, exist_ok=True)
        os.makedirs(args.work, mode=0o700, exist_ok=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise StargzError(f"fuse-overlayfs failed with status {result.returncode} "
                          f"(its messages are above)")
    return 0


def register(subparsers):
    p = subparsers.add_parser("plugin-path", help="print the path of the fuse-overlayfs plugin")
    p.set_defaults(func=cmd_plugin_path)

    p = subparsers.add_parser(
        "mount", help="mount stargz layers with fuse-overlayfs (lazy, via the plugin)",
        description="Mount layers with fuse-overlayfs 1.x.  Layers are given top-most first, "
                    "like lowerdir; plugin layers get fast_ino=1.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--blob", dest="blob", action=_Ordered, metavar="FILE",
                   help="a local stargz/eStargz blob as a lazy layer")
    p.add_argument("--registry-layer", dest="registry_layer", action=_Ordered, nargs=2,
                   metavar=("REF", "DIGEST"), help="one layer blob of an image in a registry")
    p.add_argument("--image", dest="image", action=_Ordered, metavar="REF",
                   help="every layer of an image (all must be stargz/eStargz)")
    p.add_argument("--lower", dest="lower", action=_Ordered, metavar="DIR",
                   help="a plain directory layer")
    p.add_argument("--upper", metavar="DIR", help="upper (writable) directory")
    p.add_argument("--work", metavar="DIR", help="work directory (same filesystem as --upper)")
    p.add_argument("--config", metavar="FILE",
                   help="plugin configuration (default: $STARGZ_OVERLAY_CONFIG or "
                        "/etc/stargz-overlay/config.toml)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"where per-layer directories go (default {DEFAULT_STATE_DIR})")
    p.add_argument("--threaded", action="store_true", help="run fuse-overlayfs multi-threaded")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT",
                   help="extra fuse-overlayfs option (repeatable)")
    p.add_argument("--fuse-overlayfs", metavar="PATH", help="the fuse-overlayfs binary to use")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not mount")
    p.set_defaults(func=cmd_mount, lowers=[])
