#!/usr/bin/env python3
"""Registry benchmark: what it costs to open a layer and read one file lazily.

A loopback docker-registry sits behind a proxy that adds a fixed latency to
every request (default 20 ms, a WAN-like round trip).  An eStargz layer of
many files is pushed; then, with the manifest already resolved, we measure

  (a) opening the layer (footer + TOC parsed): round trips, bytes, time;
  (b) the same when the TOC offset is already known (one round trip);
  (c) reading one file of the layer after the open;
  (d) reading N scattered files with one ``read_ranges`` (multi-range) call.

Targets: (a) 2 round trips, (b) 1 round trip.  Prints a table and writes JSON
to contrib/bench/results/ (git-ignored).

    python3 contrib/bench/registry_open.py [--latency-ms 20] [--files 2000]
                                           [--file-kb 16] [--scattered 32]
"""

import argparse
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "plugin"))
sys.path.insert(0, ROOT)

from stargz_overlay.reader import StargzReader  # noqa: E402
from stargz_overlay.registry import TOC_DIGEST_ANNOTATION, RegistryClient  # noqa: E402
from stargz_overlay.registries_conf import RegistriesConf  # noqa: E402
from stargz_overlay.writer import convert  # noqa: E402
from tests.registryfixture import Proxy, Registry, push_image  # noqa: E402

TARGET_OPEN_ROUND_TRIPS = 2
TARGET_OPEN_KNOWN_OFFSET = 1


def build_layer(n_files, file_kb, seed=1):
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9)))
             for _ in range(500)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n_files):
            size = rnd.randint(file_kb * 512, file_kb * 1536)
            data = b" ".join(rnd.choice(words) for _ in range(size // 5))[:size]
            info = tarfile.TarInfo(f"usr/lib/pkg{i % 50:02d}/file{i:05d}.txt")
            info.size = len(data)
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    res = convert(io.BytesIO(buf.getvalue()), out)
    return out.getvalue(), res


def measure(client, fn):
    before = client.stats.as_dict()
    t = time.monotonic()
    result = fn()
    elapsed = time.monotonic() - t
    after = client.stats.as_dict()
    return result, {"round_trips": after["requests"] - before["requests"],
                    "bytes": after["bytes_received"] - before["bytes_received"],
                    "seconds": round(elapsed, 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--file-kb", type=int, default=16)
    ap.add_argument("--scattered", type=int, default=32)
    ap.add_argument("--workdir")
    args = ap.parse_args()

    blob, res = build_layer(args.files, args.file_kb)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp, Registry(tmp) as reg, \
            Proxy(reg.host, latency=args.latency_ms / 1000) as proxy:
        conf = RegistriesConf.from_text(
            f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n'
            f'[[registry]]\nlocation = "{proxy.host}"\ninsecure = true\n')
        with RegistryClient(registries_conf=conf, auth_files=[], platform="linux/amd64") as c:
            push_image(c, f"{reg.host}/bench:1", [blob],
                       layer_annotations=[{TOC_DIGEST_ANNOTATION: res.toc_digest}])
        ref = f"{proxy.host}/bench:1"
        client = RegistryClient(registries_conf=conf, auth_files=[], platform="linux/amd64")
        with client:
            image, resolve_cost = measure(client, lambda: client.resolve(ref))
            layer = image.layers[0]

            def open_layer(toc_offset=None):
                src = client.blob_source(image, layer.digest, layer.size)
                return StargzReader(src, toc_digest=layer.toc_digest, toc_offset=toc_offset)

            reader, open_cost = measure(client, open_layer)
            _, open_known = measure(client, lambda: open_layer(reader.toc_offset))
            entries = [e for e in reader.toc.entries if e.type == "reg" and e.size > 0]
            one = entries[len(entries) // 2]
            data, read_one = measure(client, lambda: reader.read_file(one))
            picks = random.Random(2).sample(entries, min(args.scattered, len(entries)))
            src = reader.source
            spans = [(e.chunks[0].offset, e.chunks[-1].end - e.chunks[0].offset)
                     for e in picks]
            _, scattered = measure(client, lambda: src.read_ranges(spans))
            _, scattered_single = measure(
                client, lambda: [src.read_at(o, n) for o, n in spans])

    result = {
        "latency_ms": args.latency_ms, "blob_bytes": len(blob), "files": args.files,
        "toc_bytes": len(reader.toc_json), "resolve": resolve_cost,
        "open": open_cost, "open_known_toc_offset": open_known,
        "read_one_file": dict(read_one, file_bytes=len(data)),
        f"read_{len(spans)}_files_multirange": scattered,
        f"read_{len(spans)}_files_one_by_one": scattered_single,
        "targets_met": {"open": open_cost["round_trips"] <= TARGET_OPEN_ROUND_TRIPS,
                        "open_known_toc_offset":
                            open_known["round_trips"] <= TARGET_OPEN_KNOWN_OFFSET},
    }
    print(f"layer: {len(blob):,} bytes, {args.files} files, TOC JSON "
          f"{len(reader.toc_json):,} bytes; proxy latency {args.latency_ms:g} ms/request")
    print(f"{'step':<34}{'round trips':>12}{'bytes':>14}{'seconds':>10}")
    for key, value in result.items():
        if isinstance(value, dict) and "round_trips" in value:
            print(f"{key:<34}{value['round_trips']:>12}{value['bytes']:>14,}"
                  f"{value['seconds']:>10.3f}")
    print(f"targets: open <= {TARGET_OPEN_ROUND_TRIPS} round trips: "
          f"{'met' if result['targets_met']['open'] else 'MISSED'}; with known TOC offset "
          f"<= {TARGET_OPEN_KNOWN_OFFSET}: "
          f"{'met' if result['targets_met']['open_known_toc_offset'] else 'MISSED'}")
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"registry_open-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0 if all(result["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
