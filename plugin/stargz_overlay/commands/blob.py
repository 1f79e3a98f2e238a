"""Blob commands: convert, ls, cat, verify and toc on stargz/eStargz layers."""

import contextlib
import json
import os
import shutil
import stat
import sys
import tempfile

from ..errors import StargzError
from ..image_convert import (BlobSpool, ConvertOptions, ImageConverter, RegistryEndpoint,
                             describe, is_image_spec, open_endpoint)
from ..progress import Progress
from ..reader import StargzReader
from ..record import add_record_options, merge, record_for_convert
from ..registry import RegistryClient, open_layer_source
from ..writer import DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, convert
from .analyze import add_workload_options, analyze_for_convert

_TYPE_BITS = {"dir": stat.S_IFDIR, "reg": stat.S_IFREG, "symlink": stat.S_IFLNK,
              "char": stat.S_IFCHR, "block": stat.S_IFBLK, "fifo": stat.S_IFIFO}

def _add_blob_argument(parser):
    parser.add_argument("blob", metavar="BLOB", help="stargz/eStargz blob file or docker://REF")
    parser.add_argument("--toc-digest", metavar="DIGEST",
                        help="expected TOC digest (sha256:...), e.g. from the layer annotation")
    parser.add_argument("--layer", metavar="N|DIGEST",
                        help="with docker://REF: the layer (index, negative from the top, or "
                             "digest); its toc.digest annotation is checked")

def open_reader(args):
    """Open the blob named on the command line and verify its TOC digest if given."""
    source, toc_digest = open_layer_source(args.blob, args.layer)
    return StargzReader(source, toc_digest=args.toc_digest or toc_digest)

def _read_list(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise StargzError(f"cannot read prioritized files list {path}: {exc.strerror}") from None

def convert_image(args, prioritized):
    """``convert docker://SRC docker://DST`` (or ``oci:DIR[:TAG]`` on either side)."""
    options = ConvertOptions(chunk_size=args.chunk_size, legacy=args.legacy,
                             compression_level=args.compression_level,
                             prioritized=prioritized, reconvert=args.reconvert)
    client = RegistryClient()
    src = open_endpoint(args.input, client)
    if args.optimize:
        options.reconvert = True  # reorder layers that are already eStargz too
    with contextlib.ExitStack() as cleanup:
        if (args.analyze or args.optimize) and isinstance(src, RegistryEndpoint):
            # the analysis/recording and the conversion share one download per layer
            cleanup.enter_context(BlobSpool(src, options.reconvert))
        if args.analyze:
            options.prioritized_by_layer = analyze_for_convert(src, args)
        if args.optimize:         # recorded first, then what the analysis adds
            options.prioritized_by_layer = merge(record_for_convert(src, args, client),
                                                 options.prioritized_by_layer)
        dst = open_endpoint(args.output, client, create=True)
        report = ImageConverter(src, dst, options).run()
    if args.json:
        print(json.dumps({"digest": report.digest, "mediaType": report.media_type,
                          "layers": [vars(layer) for layer in report.layers]}, indent=2))
    else:
        print("\n".join(describe(report)))
    return 0


def cmd_convert(args):
    prioritized = _read_list(args.prioritized_files) if args.prioritized_files else None
    if is_image_spec(args.input) or is_image_spec(args.output):
        return convert_image(args, prioritized)
    for flag in ("analyze", "optimize"):
        if getattr(args, flag):
            raise StargzError(f"--{flag} needs an image to convert (docker://REF or "
                              f"oci:DIR[:TAG])")
    try:
        source = open(args.input, "rb")
    except OSError as exc:
        raise StargzError(f"cannot open {args.input}: {exc.strerror}") from None
    out_dir = os.path.dirname(os.path.abspath(args.output))
    progress = Progress(f"converting {os.path.basename(args.input)}")
    tmp = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".stargz-", delete=False)
    try:
        with source, tmp:
            result = convert(source, tmp, legacy=args.legacy, chunk_size=args.chunk_size,
                             prioritized=prioritized, compression_level=args.compression_level,
                             progress=progress)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, args.output)
    except BaseException:
        os.unlink(tmp.name)
        raise
    finally:
        progress.close()
    summary = {
        "format": "stargz" if args.legacy else "estargz",
        "tocDigest": result.toc_digest,
        "diffID": result.diff_id,
        "blobDigest": result.blob_digest,
        "uncompressedSize": result.uncompressed_size,
        "compressedSize": result.compressed_size,
        "entries": result.entries,
        "missedPrioritizedFiles": result.missed_prioritized,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            if key != "missedPrioritizedFiles":
                print(f"{key}: {value}")
        for name in result.missed_prioritized:
            print(f"warning: prioritized file not in the layer: {name}", file=sys.stderr)
    return 0

def _describe(path, entry, first_name):
    mode = stat.filemode(_TYPE_BITS[entry.type] | entry.mode)
    if entry.type in ("char", "block"):
        size = f"{entry.dev_major},{entry.dev_minor}"
    else:
        size = str(entry.size)
    record = {"path": path or ".", "type": entry.type, "mode": mode, "uid": entry.uid,
              "gid": entry.gid, "size": size}
    if first_name is not None:
        record["type"] = "hardlink"
        record["target"] = first_name
    elif entry.type == "symlink":
        record["target"] = entry.link_name
    return record

def cmd_ls(args):
    reader = open_reader(args)
    first_names = {}
    records = []
    for path, entry in reader.toc.walk():
        first = first_names.get(id(entry))
        if first is None and entry.type == "reg":
            first_names[id(entry)] = path
        record = _describe(path, entry, first)
        if args.long or args.json:
            record.update({"mtime": entry.mtime, "nlink": entry.nlink, "ino": entry.ino,
                           "digest": entry.digest, "xattrs": sorted(entry.xattrs)})
        records.append(record)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    for r in records:
        line = f"{r['type']:<8} {r['mode']} {r['uid']}:{r['gid']} {r['size']:>10} {r['path']}"
        if "target" in r:
            line += f" -> {r['target']}"
        if args.long:
            line += f"  mtime={r['mtime']} nlink={r['nlink']} ino={r['ino']}"
            if r["digest"]:
                line += f" {r['digest']}"
            if r["xattrs"]:
                line += " xattrs=" + ",".join(r["xattrs"])
        print(line)
    return 0

def cmd_cat(args):
    reader = open_reader(args)
    entry = reader.toc.lookup(args.path)
    if entry is None:
        raise StargzError(f"no such file in the layer: {args.path}")
    if entry.type != "reg":
        raise StargzError(f"{args.path} is not a regular file (it is a {entry.type})")
    out = sys.stdout.buffer
    if all(c.digest for c in entry.chunks):
        for block in reader.iter_file(entry):   # each chunk verified before it is written
            out.write(block)
    else:
        # only a whole-file digest: spool to disk, write out once the digest matched
        with tempfile.TemporaryFile() as spool:
            for block in reader.iter_file(entry):
                spool.write(block)
            spool.seek(0)
            shutil.copyfileobj(spool, out, 1 << 20)
    out.flush()
    return 0


def cmd_verify(args):
    reader = open_reader(args)
    report = reader.verify()
    print(f"ok: {reader.kind} blob, TOC digest {reader.toc_digest}, {report.files} files, "
          f"{report.chunks} chunks, {report.bytes} bytes verified")
    return 0

def cmd_toc(args):
    reader = open_reader(args)
    if args.raw:
        sys.stdout.buffer.write(reader.toc_json)
        sys.stdout.buffer.flush()
    else:
        print(json.dumps(json.loads(reader.toc_json), indent=2, ensure_ascii=False))
    return 0

def _positive_int(text):
    value = int(text, 0)
    if value <= 0:
        raise ValueError(text)
    return value

def register(subparsers):
    p = subparsers.add_parser(
        "convert", help="convert a layer (tar/tar.gz) or a whole image to eStargz",
        description="Convert a tar/tar.gz layer file into an eStargz (or stargz) blob, or "
                    "every layer of every platform of an image: IN and OUT may be "
                    "docker://REF or oci:DIR[:TAG].")
    p.add_argument("input", metavar="IN", help="tar or tar.gz layer, docker://REF, oci:DIR[:TAG]")
    p.add_argument("output", metavar="OUT", help="blob to write, docker://REF, oci:DIR[:TAG]")
    p.add_argument("--legacy", action="store_true", help="write legacy stargz (47-byte footer)")
    p.add_argument("--chunk-size", type=_positive_int, default=DEFAULT_CHUNK_SIZE,
                   metavar="N", help=f"chunk size in bytes (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--compression-level", type=int, default=DEFAULT_COMPRESSION_LEVEL,
                   choices=range(10), metavar="0-9",
                   help=f"gzip level (default {DEFAULT_COMPRESSION_LEVEL})")
    p.add_argument("--prioritized-files", metavar="LISTFILE",
                   help="file with one path per line to place before .prefetch.landmark")
    p.add_argument("--reconvert", action="store_true",
                   help="images: convert layers that are already eStargz again")
    p.add_argument("--analyze", action="store_true",
                   help="images: infer the files the entrypoint reads at startup (see the "
                        "analyze command) and put them first in each layer")
    add_workload_options(p)
    add_record_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_convert)

    p = subparsers.add_parser("ls", help="list every entry of a layer")
    _add_blob_argument(p)
    p.add_argument("--long", "-l", action="store_true", help="also mtime, nlink, digest, xattrs")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("cat", help="write a file of a layer to stdout, verified")
    _add_blob_argument(p)
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_cat)

    p = subparsers.add_parser("verify", help="check every chunk and file digest of a layer")
    _add_blob_argument(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("toc", help="print the TOC JSON of a layer")
    _add_blob_argument(p)
    p.add_argument("--raw", action="store_true", help="the exact stored bytes")
    p.set_defaults(func=cmd_toc)
