"""``analyze REF``: the files an image reads at startup, inferred without running it.

Also the workload options shared with ``convert --analyze``.
"""

import json
import sys

from ..analyze import analyze_image, parse_command, prioritized_by_layer
from ..image_convert import is_image_spec, open_endpoint
from ..errors import StargzError
from ..registry import RegistryClient


def add_workload_options(parser):
    """``--entrypoint``, ``--args`` and ``--env``: the command the analysis assumes."""
    parser.add_argument("--entrypoint", metavar="CMD",
                        help="entrypoint instead of the image's (JSON array or shell words; "
                             "drops the image's Cmd unless --args is given)")
    parser.add_argument("--args", metavar="ARGS",
                        help="arguments instead of the image's Cmd (JSON array or shell words)")
    parser.add_argument("--env", metavar="NAME=VALUE", action="append", default=[],
                        help="extra environment variable (PATH, LD_LIBRARY_PATH, PYTHONPATH, "
                             "LANG ...); repeatable")


def workload(args):
    entrypoint = parse_command(args.entrypoint) if args.entrypoint is not None else None
    cmd = parse_command(args.args) if args.args is not None else None
    for item in args.env:
        if "=" not in item:
            raise StargzError(f"--env {item!r}: want NAME=VALUE")
    return {"entrypoint": entrypoint, "args": cmd, "env": args.env}


def _note(text):
    print(text, file=sys.stderr)


def describe(analysis):
    """Human-readable lines for one Analysis."""
    lines = [f"[{analysis.platform or 'image'}] command: "
             f"{' '.join(analysis.argv) if analysis.argv else '(none)'}"]
    width = max((len(f.path) for f in analysis.files), default=0)
    for n, f in enumerate(analysis.files, 1):
        mark = "@" if f.kind == "symlink" else " "
        lines.append(f"{n:4} L{f.layer} {mark}{f.path:<{width}}  {f.reason}")
    for layer in analysis.layers:
        count = sum(1 for f in analysis.files if f.layer == layer.index)
        lines.append(f"  layer {layer.index} {layer.digest[:19]} ({layer.kind}): {count} "
                     f"startup files; {layer.fetched} blob bytes read")
    for text in analysis.problems:
        lines.append(f"  problem: {text}")
    for text in analysis.notes:
        lines.append(f"  note: {text}")
    return lines


def cmd_analyze(args):
    if not is_image_spec(args.image):
        raise StargzError(f"{args.image}: name images as docker://REF or oci:DIR[:TAG]")
    endpoint = open_endpoint(args.image, RegistryClient())
    results = analyze_image(endpoint, platform=args.platform, all_platforms=args.all_platforms,
                            note=_note, **workload(args))
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    elif args.paths:
        seen = set()
        for r in results:
            for f in r.files:
                if f.path not in seen:
                    seen.add(f.path)
                    print(f.path)
    else:
        for r in results:
            print("\n".join(describe(r)))
    return 0


def analyze_for_convert(src, args, client=None):
    """``convert --analyze``: per-layer prioritized lists for every platform of SRC (a spec
    or an open endpoint)."""
    endpoint = open_endpoint(src, client or RegistryClient())
    results = analyze_image(endpoint, all_platforms=True, note=_note, **workload(args))
    for r in results:
        _note(f"analyze [{r.platform}]: {len(r.files)} startup files of "
              f"{' '.join(r.argv) or '(no command)'} in "
              f"{len({f.layer for f in r.files})} layer(s)")
        for text in r.problems:
            _note(f"analyze [{r.platform}]: problem: {text}")
        kept = {la.digest for la in r.layers if la.annotated} & {f.digest for f in r.files}
        if kept and not args.reconvert:
            _note(f"analyze [{r.platform}]: {len(kept)} layer(s) are already eStargz and kept "
                  f"as they are; add --reconvert to reorder them")
    return prioritized_by_layer(results)


def register(subparsers):
    p = subparsers.add_parser(
        "analyze", help="infer the files an image reads at startup (nothing is run)",
        description="Infer the files an image's entrypoint reads at startup, statically: the "
                    "program found through PATH, #! interpreters, the ELF interpreter and "
                    "DT_NEEDED libraries through the image's own library paths, and for "
                    "Python the startup modules and the imports of the script. Each file "
                    "is listed with its layer and why it is needed. eStargz layers are read "
                    "lazily; other layers are downloaded once.")
    p.add_argument("image", metavar="REF", help="docker://REF or oci:DIR[:TAG]")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="platform of a multi-platform image (default: this machine's)")
    p.add_argument("--all-platforms", action="store_true",
                   help="analyze every platform of a multi-platform image")
    add_workload_options(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="machine-readable output")
    out.add_argument("--paths", action="store_true",
                     help="only the paths, one per line (a --prioritized-files list)")
    p.set_defaults(func=cmd_analyze)
