"""The ``stargz-overlay`` command line: parser assembly and error reporting.

Each subcommand lives in ``stargz_overlay.commands.<group>`` and registers
itself through that module's ``register(subparsers)``.
"""

import argparse
import sys

from . import __version__
from .commands import COMMAND_MODULES
from .errors import StargzError


def build_parser():
    parser = argparse.ArgumentParser(
        prog="stargz-overlay",
        description="Lazy stargz/eStargz layers for fuse-overlayfs, Podman, CRI-O and Buildah.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv=None):
    """Run one subcommand; errors become one line on stderr and exit status 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except StargzError as exc:
        print(f"stargz-overlay: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        print("stargz-overlay: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
