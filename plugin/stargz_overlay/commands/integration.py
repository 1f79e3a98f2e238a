"""Podman/CRI-O/Buildah commands: ``store``, ``mount-program`` and ``status``."""

import argparse
import json
import os

from ..errors import StargzError


def cmd_store(args):
    try:
        return _store(args)
    except OSError as exc:
        raise StargzError(f"{exc.filename or 'store'}: {exc.strerror}") from None


def _store(args):
    from .. import store
    mountpoint = args.mountpoint or store.default_mountpoint()
    if args.unmount:
        store.unmount(mountpoint)
        print(f"unmounted {mountpoint}")
        return 0
    s = store.Store(mountpoint, state_dir=args.state_dir, config=args.config,
                    timeout=args.timeout, fuse_overlayfs=args.fuse_overlayfs,
                    allow_other=args.allow_other, options=args.options)
    if args.dry_run:
        import shlex
        print(shlex.join(s.command(foreground=args.foreground)))
        return 0
    if args.foreground:
        return s.serve()
    s.mount()
    print(f"store mounted at {s.mountpoint} (state {s.state_dir}); in storage.conf:\n"
          f'  [storage.options]\n  additionallayerstores = ["{s.als_path}:ref"]\n'
          f"  [storage.options.overlay]\n  mount_program = \"<path of stargz-overlay-mount>\"")
    return 0


def cmd_mount_program(args):
    from .. import mount_program
    return mount_program.main(args.argv)


def cmd_status(args):
    from .. import status, store
    state_dir, config_path = args.state_dir, args.config
    if not state_dir:
        state_dir, found_config = store.find_store(args.store or store.default_mountpoint())
        config_path = config_path or found_config
        state_dir = state_dir or store.default_state_dir()
    if not os.path.isdir(state_dir):
        raise StargzError(f"no store state in {state_dir} (give --state-dir or --store)")
    cache_dir = metrics_dir = None
    try:
        from ..config import load_config
        config = load_config(config_path or None)
        cache_dir, metrics_dir = config.cache_dir, config.metrics_dir
    except StargzError:
        pass
    report = status.collect(state_dir, cache_dir, metrics_dir)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(status.format_report(report))
    return 0


def register(subparsers):
    from ..store import DEFAULT_TIMEOUT
    p = subparsers.add_parser(
        "store", help="serve the Additional Layer Store for Podman/CRI-O/Buildah (lazy pulls)",
        description="Mount the Additional Layer Store (a read-only fuse-overlayfs with the "
                    "stargz plugin) at MOUNTPOINT.  containers/storage then finds eStargz "
                    "layers at MOUNTPOINT/store: storage.conf additionallayerstores = "
                    "[\"MOUNTPOINT/store:ref\"].")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="where to mount (default /var/lib/stargz-overlay/als as root, "
                        "$XDG_RUNTIME_DIR/stargz-overlay/als otherwise)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="layer states, statistics and per-mount directories (default "
                        "/var/lib/stargz-overlay/store, ~/.local/share/stargz-overlay/store)")
    p.add_argument("--config", metavar="FILE",
                   help="plugin configuration (cache, registries, log); also used by the "
                        "containers' mounts")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"kernel lookup cache time (default {DEFAULT_TIMEOUT:g}; a failed "
                        f"lookup is retried after it)")
    p.add_argument("--foreground", action="store_true",
                   help="stay in the foreground until SIGTERM (systemd Type=notify)")
    p.add_argument("--unmount", action="store_true", help="unmount the store and exit")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users reach the mount (FUSE allow_other)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT",
                   help="extra fuse-overlayfs option (repeatable)")
    p.add_argument("--fuse-overlayfs", metavar="PATH", help="the fuse-overlayfs 1.x binary")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not mount")
    p.set_defaults(func=cmd_store)

    p = subparsers.add_parser(
        "mount-program", help="containers/storage mount_program (also: stargz-overlay-mount)",
        description="Drop-in mount_program for storage.conf: lower layers that resolve into "
                    "a stargz-overlay store become lazy plugin layers of fuse-overlayfs; "
                    "every other argument is passed to fuse-overlayfs unchanged.")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="ARG",
                   help="fuse-overlayfs arguments (-o lowerdir=...,upperdir=... MOUNTPOINT)")
    p.set_defaults(func=cmd_mount_program)

    p = subparsers.add_parser(
        "status", help="what the store serves lazily, what was fetched, what is local",
        description="Per image and layer: served lazily or why not, bytes fetched from the "
                    "registry, share of the layer's files in the cache, cache hits.")
    p.add_argument("--store", metavar="MOUNTPOINT", help="the store's mountpoint")
    p.add_argument("--state-dir", metavar="DIR", help="the store's state directory")
    p.add_argument("--config", metavar="FILE", help="plugin configuration (for the cache)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
