"""Test layers: one tar each, converted to an eStargz blob and extracted by GNU tar."""

import os
import subprocess

from stargz_overlay.writer import convert


class BuiltLayer:
    def __init__(self, tar, blob, plain, result):
        self.tar = tar
        self.blob = blob
        self.plain = plain          # the same tar extracted into a plain directory
        self.result = result        # writer ConvertResult (toc_digest, ...)


def build_layer(tmp, name, builder, chunk_size=64 << 10, legacy=False, compression_level=6):
    """Write ``builder``'s tar, convert it, extract it; return a BuiltLayer."""
    tar = os.path.join(tmp, f"{name}.tar")
    with open(tar, "wb") as f:
        f.write(builder.bytes())
    blob = os.path.join(tmp, f"{name}.blob")
    with open(blob, "wb") as out:
        result = convert(tar, out, chunk_size=chunk_size, legacy=legacy,
                         compression_level=compression_level)
    plain = os.path.join(tmp, f"{name}.plain")
    os.makedirs(plain)
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner",
                    "--same-permissions", "--same-owner", "-xf", tar, "-C", plain], check=True)
    return BuiltLayer(tar, blob, plain, result)
