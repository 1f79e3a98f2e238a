"""The hostile layers, each with what a user must see.

A case builds a blob and says either ``refused`` (a substring of the one-line
error: the layer is not mounted / the CLI exits 1) or, for a served layer,
``expect``: ``{path: bytes}`` for files that must read back exactly, or
``{path: errno}`` for files that must fail with that errno (EIO for bad data,
ELOOP for link loops).  Every served layer also holds ``good`` with known
bytes, read after the hostile files to show the mount still serves.

``MARKER`` names escape targets: after a case, nothing with it in its name may
exist outside the test's allowed directories.
"""

import errno
import json
import os
import uuid

from .hostile import (MB, BlobBuilder, dir_, gzip_bytes, hardlink, reg, sha, symlink,
                      toc_tar, zeros_digest, zeros_member)

MARKER = f"pwned-{uuid.uuid4().hex[:10]}"
GOOD = b"good bytes, served after the hostile ones\n" * 50
DATA_A = b"A" * 3000
DATA_B = b"B" * 5000

# A zero-filled file this large must go through the plugin without the
# fuse-overlayfs process growing by anything like its size.
BOMB_SIZE = 256 * MB
RSS_GROWTH_LIMIT_MB = 96


class Case:
    def __init__(self, id, build, refused=None, expect=None, toc=None, slow=False,
                 rss_limit_mb=None):
        self.id = id
        self.build = build          # BlobBuilder -> blob bytes
        self.refused = refused      # substring of the error, or None when served
        self.expect = expect or {}
        self.toc = toc              # a TOC digest to pin in DATA / --toc-digest
        self.slow = slow
        self.rss_limit_mb = rss_limit_mb

    def __repr__(self):
        return self.id


def _with_good(b, entries):
    return [reg("good", GOOD, b.member(GOOD))] + entries


def served(files):
    """Expectations: every regular file of ``files`` plus ``good`` reads back."""
    out = {"good": GOOD}
    out.update(files)
    return out


# -- names ------------------------------------------------------------------

def dotdot(b):
    return b.finish(_with_good(b, [
        reg(f"../../../../../../{MARKER}/up", DATA_A, b.member(DATA_A)),
        reg(f"a/../../{MARKER}-x", DATA_B, b.member(DATA_B)),
        dir_(f"./../../{MARKER}-d"),
        reg(f"{MARKER}-d/../../../../tmp/{MARKER}-y", DATA_A, b.member(DATA_A)),
    ]))


def absolute(b):
    return b.finish(_with_good(b, [
        reg(f"/tmp/{MARKER}/abs", DATA_A, b.member(DATA_A)),
        reg(f"//etc/{MARKER}", DATA_B, b.member(DATA_B)),
    ]))


def nul_name(b):
    return b.finish(_with_good(b, [reg(f"a\0{MARKER}", DATA_A, b.member(DATA_A))]))


def long_component(b):
    return b.finish(_with_good(b, [reg("x" * 300, DATA_A, b.member(DATA_A))]))


def long_path(b):
    return b.finish(_with_good(b, [reg("/".join(["d" * 200] * 25), DATA_A, b.member(DATA_A))]))


LONGEST = "/".join(["n" * 255] * 15) + "/" + "f" * 255    # 4095 bytes: the limit


def longest_legal(b):
    return b.finish(_with_good(b, [reg("y" * 255, DATA_A, b.member(DATA_A)),
                                   reg(LONGEST, DATA_B, b.member(DATA_B))]))


DEPTH = 1500
DEEP = "/".join(["a"] * DEPTH) + "/bottom"


def deep_dirs(b):
    return b.finish(_with_good(b, [reg(DEEP, DATA_A, b.member(DATA_A))]))


def duplicates(b):
    return b.finish(_with_good(b, [
        reg("f", DATA_A, b.member(DATA_A)),
        reg("./f", DATA_B, b.member(DATA_B)),           # same name: the last one wins
        reg("d", DATA_A, b.member(DATA_A)),
        dir_("d/"),                                      # a file then a dir: the dir wins
        reg("d/x", DATA_A, b.member(DATA_A)),
        reg("/f", DATA_B, b.member(DATA_B)),
    ]))


def file_as_parent(b):
    return b.finish(_with_good(b, [reg("p", DATA_A, b.member(DATA_A)),
                                   reg("p/x", DATA_B, b.member(DATA_B))]))


def surrogate_names(b):
    # "\udcff" is the raw byte 0xff (surrogateescape); "\ud800" is no byte sequence at all
    return b.finish(_with_good(b, [reg("raw-\udcff", DATA_A, b.member(DATA_A)),
                                   reg("lone-\ud800", DATA_B, b.member(DATA_B))]))


def raw_byte_name(b):
    return b.finish(_with_good(b, [reg("raw-\udcff", DATA_A, b.member(DATA_A))]))


# -- links ------------------------------------------------------------------

def symlink_loops(b):
    return b.finish(_with_good(b, [
        symlink("la", "lb"), symlink("lb", "la"), symlink("self", "self"),
        symlink("up", "../../../../../../etc/passwd"), symlink("abs", "/etc/shadow"),
        dir_("d"), symlink("d/loop", "../d/loop"),
    ]))


def symlink_bad_target(b):
    return b.finish(_with_good(b, [symlink("s", f"a\0{MARKER}")]))


def symlink_long_target(b):
    return b.finish(_with_good(b, [symlink("s", "t/" * 3000)]))


def hardlink_loop(b):
    return b.finish(_with_good(b, [hardlink("h1", "h2"), hardlink("h2", "h3"),
                                   hardlink("h3", "h1")]))


def hardlink_outside(b):
    # names are cleaned like tar paths: "../../etc/passwd" is the layer's etc/passwd
    secret = b"the layer's own passwd\n"
    return b.finish(_with_good(b, [
        dir_("etc"), reg("etc/passwd", secret, b.member(secret)),
        hardlink("h", "../../../../../../etc/passwd"), hardlink("abs", "/etc/passwd"),
    ]))


def hardlink_missing(b):
    return b.finish(_with_good(b, [hardlink("h", f"/etc/{MARKER}")]))


def hardlink_to_dir(b):
    return b.finish(_with_good(b, [dir_("d"), hardlink("h", "d")]))


# -- chunks and sizes ---------------------------------------------------------

def chunk_outside_blob(b):
    return b.finish(_with_good(b, [reg("far", DATA_A, 10 ** 12)]))


def chunk_in_toc(b):
    entries = _with_good(b, [])
    entries.append(reg("t", DATA_A, b.offset))      # the TOC member's own offset
    return b.finish(entries)


def chunk_mid_member(b):
    off = b.member(DATA_A)
    return b.finish(_with_good(b, [reg("mid", DATA_A, off + 5), reg("ok", DATA_B,
                                                                    b.member(DATA_B))]))


def overlapping_chunks(b):
    off = b.member(DATA_A)
    other = b"C" * len(DATA_A)
    return b.finish(_with_good(b, [
        reg("a", DATA_A, off),
        reg("same", DATA_A, off),            # same bytes, same member: fine (deduplicated)
        reg("liar", other, off),             # another file's member: digest mismatch
    ]))


def chunks_overlap_in_file(b):
    o1, o2 = b.member(DATA_A[:2000]), b.member(DATA_A[1000:])
    e = reg("f", DATA_A, o1, chunkSize=2000)
    e["chunkDigest"] = sha(DATA_A[:2000])
    chunk = {"name": "f", "type": "chunk", "offset": o2, "chunkOffset": 1000,
             "chunkSize": 2000, "chunkDigest": sha(DATA_A[1000:])}
    return b.finish(_with_good(b, [e, chunk]))


def size_larger(b):
    e = reg("big", DATA_A, b.member(DATA_A))
    e["size"] = len(DATA_A) + 1000
    return b.finish(_with_good(b, [e, reg("ok", DATA_B, b.member(DATA_B))]))


def size_smaller(b):
    e = reg("small", DATA_A, b.member(DATA_A))
    e["size"] = 100
    return b.finish(_with_good(b, [e]))


def size_without_offset(b):
    e = reg("nochunk", DATA_A, 0)
    del e["offset"], e["chunkDigest"]
    e["size"] = 0
    e2 = {"name": "claims", "type": "reg", "size": 5000, "digest": sha(DATA_B)}
    return b.finish(_with_good(b, [e, e2]))


# -- digests ------------------------------------------------------------------

def wrong_chunk_digest(b):
    e = reg("bad", DATA_A, b.member(DATA_A))
    e["chunkDigest"] = sha(b"something else")
    return b.finish(_with_good(b, [e]))


def wrong_file_digest(b):
    e = reg("bad", DATA_A, b.member(DATA_A))
    del e["chunkDigest"]
    e["digest"] = sha(b"something else")
    return b.finish(_with_good(b, [e]))


def no_digest(b):
    e = reg("unverifiable", DATA_A, b.member(DATA_A))
    del e["chunkDigest"], e["digest"]
    return b.finish(_with_good(b, [e]))


def malformed_digest(b):
    e = reg("bad", DATA_A, b.member(DATA_A))
    e["digest"] = "sha256:../../../../etc/passwd"
    return b.finish(_with_good(b, [e]))


def pinned_toc(b):
    return b.finish(_with_good(b, []))


# -- numbers, xattrs ------------------------------------------------------------

def huge_uid(b):
    return b.finish(_with_good(b, [reg("u", DATA_A, b.member(DATA_A), uid=1 << 40)]))


def huge_size(b):
    e = reg("s", DATA_A, b.member(DATA_A))
    e["size"] = 1 << 70
    return b.finish(_with_good(b, [e]))


def huge_dev(b):
    return b.finish(_with_good(b, [{"name": "c", "type": "char", "devMajor": 1 << 40,
                                    "devMinor": 1}]))


def far_mtime(b):
    return b.finish(_with_good(b, [reg("m", DATA_A, b.member(DATA_A),
                                       modtime="9999-12-31T23:59:59Z"),
                                   reg("old", DATA_B, b.member(DATA_B),
                                       modtime="0001-01-01T00:00:00Z")]))


def xattr_nul_key(b):
    return b.finish(_with_good(b, [reg("x", DATA_A, b.member(DATA_A),
                                       xattrs={"user.a\u0000b": "eQ=="})]))


def xattr_empty_key(b):
    return b.finish(_with_good(b, [dir_("d", xattrs={"": "eQ=="})]))


def xattr_big_value(b):
    import base64
    big = base64.b64encode(b"v" * (200 * 1024)).decode()
    return b.finish(_with_good(b, [dir_("d", xattrs={"user.big": big}),
                                   reg("x", DATA_A, b.member(DATA_A),
                                       xattrs={"user.big": big})]))


# -- sizes of the TOC and of members --------------------------------------------

def many_entries(b):
    """2.2 million tiny entries (more than the 2 million objects a TOC may hold): 60 MB of
    JSON in a few MB of gzip."""
    import io
    n = 2_200_000
    out = io.BytesIO()
    out.write(b'{"version":1,"entries":[{"name":"good","type":"reg","size":%d,"offset":%d,'
              b'"digest":"%s"}' % (len(GOOD), b.member(GOOD), sha(GOOD).encode()))
    for start in range(0, n, 100_000):
        out.write(b"".join(b',{"name":"d%d","type":"dir"}' % i
                           for i in range(start, min(n, start + 100_000))))
    out.write(b"]}")
    return b.finish(toc_json=out.getvalue())


def _zeros_toc_member(claimed, inflated):
    """A TOC member whose tar header claims ``claimed`` bytes, inflating to ``inflated``."""
    import zlib
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [c.compress(toc_tar(b"", claimed_size=claimed)[:512])]
    zero = bytes(8 * MB)
    for _ in range(inflated // len(zero)):
        out.append(c.compress(zero))
    out.append(c.flush())
    return b"".join(out)


def toc_gzip_bomb(b):
    """A TOC member of ~600 KB that inflates to 600 MB (its tar header says so)."""
    return b.finish(toc_member=_zeros_toc_member(600 * MB, 600 * MB))


def toc_gzip_bomb_quiet(b):
    """The header claims 400 MB (under the limit), the member inflates to 600 MB of zeros."""
    return b.finish(toc_member=_zeros_toc_member(400 * MB, 600 * MB))


def toc_deep_json(b):
    body = b'{"version":1,"entries":[' + b"[" * 200_000 + b"]" * 200_000 + b"]}"
    return b.finish(toc_json=body)


def toc_far_offset(b):
    """The footer says the TOC starts at 0: the whole 64 MB blob is 'the TOC member'."""
    b.raw(os.urandom(64 * MB))
    data = b.buf.getvalue()
    from stargz_overlay.footer import encode_footer
    return data + encode_footer(0)


def data_gzip_bomb(b):
    """A legitimate all-zero file of BOMB_SIZE bytes in a ~250 KB member."""
    off = b.raw(zeros_member(BOMB_SIZE))
    digest = zeros_digest(BOMB_SIZE)
    e = {"name": "zeros", "type": "reg", "size": BOMB_SIZE, "offset": off,
         "digest": digest, "chunkDigest": digest}
    return b.finish(_with_good(b, [e]))


def data_gzip_bomb_legacy(b):
    """The bomb as legacy stargz writes it: a file digest, no chunk digest."""
    off = b.raw(zeros_member(BOMB_SIZE))
    e = {"name": "zeros", "type": "reg", "size": BOMB_SIZE, "offset": off,
         "digest": zeros_digest(BOMB_SIZE)}
    return b.finish(_with_good(b, [e]))


def data_gzip_bomb_liar(b):
    """The same bomb with a digest that does not match: EIO, memory still bounded."""
    off = b.raw(zeros_member(BOMB_SIZE))
    e = {"name": "zeros", "type": "reg", "size": BOMB_SIZE, "offset": off,
         "chunkDigest": sha(b"not zeros"), "digest": sha(b"not zeros")}
    return b.finish(_with_good(b, [e]))


def data_bomb_overflow(b):
    """A member that inflates to far more than the file's size (only its start counts)."""
    off = b.raw(zeros_member(4 * BOMB_SIZE))
    e = {"name": "zeros", "type": "reg", "size": 10 * MB, "offset": off,
         "digest": zeros_digest(10 * MB), "chunkDigest": zeros_digest(10 * MB)}
    return b.finish(_with_good(b, [e]))


# -- not a layer at all -----------------------------------------------------------

def random_bytes(b):
    return os.urandom(4096)


def empty_blob(b):
    return b""


def truncated(b):
    return pinned_toc(b)[:-20]


def corrupt_toc_gzip(b):
    member = bytearray(gzip_bytes(toc_tar(json.dumps({"version": 1, "entries": []}).encode())))
    member[20] ^= 0xFF
    return b.finish(toc_member=bytes(member))


EIO, ELOOP = errno.EIO, errno.ELOOP

CASES = [
    Case("dotdot-names", dotdot, expect=served({
        f"{MARKER}/up": DATA_A, f"{MARKER}-x": DATA_B, f"tmp/{MARKER}-y": DATA_A})),
    Case("absolute-names", absolute, expect=served({
        f"tmp/{MARKER}/abs": DATA_A, f"etc/{MARKER}": DATA_B})),
    Case("nul-in-name", nul_name, refused="NUL"),
    Case("name-over-255", long_component, refused="longer than 255"),
    Case("path-over-4096", long_path, refused="longer than 4096"),
    Case("longest-legal-names", longest_legal, expect=served({"y" * 255: DATA_A})),
    Case("deep-dirs", deep_dirs, expect=served({})),
    Case("duplicate-names", duplicates, expect=served({"f": DATA_B, "d/x": DATA_A})),
    Case("file-as-parent", file_as_parent, refused="not a directory"),
    Case("lone-surrogate-name", surrogate_names, refused="not valid UTF-8"),
    Case("raw-byte-name", raw_byte_name, refused="not valid UTF-8"),
    Case("symlink-loops", symlink_loops, expect=served({"la": ELOOP, "self": ELOOP,
                                                       "d/loop": ELOOP})),
    Case("symlink-nul-target", symlink_bad_target, refused="NUL"),
    Case("symlink-target-over-4096", symlink_long_target, refused="longer than 4096"),
    Case("hardlink-loop", hardlink_loop, refused="link loop"),
    Case("hardlink-outside", hardlink_outside, expect=served({
        "h": b"the layer's own passwd\n", "abs": b"the layer's own passwd\n"})),
    Case("hardlink-missing-target", hardlink_missing, refused="not in the layer"),
    Case("hardlink-to-dir", hardlink_to_dir, refused="points at a directory"),
    Case("chunk-outside-blob", chunk_outside_blob, refused="outside the blob"),
    Case("chunk-in-toc", chunk_in_toc, refused="outside the blob"),
    Case("chunk-mid-member", chunk_mid_member, expect=served({"mid": EIO, "ok": DATA_B})),
    Case("overlapping-chunks", overlapping_chunks, expect=served({
        "a": DATA_A, "same": DATA_A, "liar": EIO})),
    Case("chunks-overlap-in-file", chunks_overlap_in_file, refused="overlap"),
    Case("size-larger-than-data", size_larger, expect=served({"big": EIO, "ok": DATA_B})),
    Case("size-smaller-than-data", size_smaller, expect=served({"small": EIO})),
    Case("size-without-offset", size_without_offset, expect=served({"claims": EIO})),
    Case("wrong-chunk-digest", wrong_chunk_digest, expect=served({"bad": EIO})),
    Case("wrong-file-digest", wrong_file_digest, expect=served({"bad": EIO})),
    Case("no-digest", no_digest, expect=served({"unverifiable": EIO})),
    Case("malformed-digest", malformed_digest, refused="is not a sha256 digest"),
    Case("pinned-toc-mismatch", pinned_toc, refused="TOC digest", toc=sha(b"another toc")),
    Case("huge-uid", huge_uid, refused="uid"),
    Case("huge-size", huge_size, refused="size"),
    Case("huge-device-number", huge_dev, refused="devMajor"),
    Case("far-mtimes", far_mtime, expect=served({"m": DATA_A, "old": DATA_B})),
    Case("xattr-nul-key", xattr_nul_key, refused="xattr"),
    Case("xattr-empty-key", xattr_empty_key, refused="xattr"),
    Case("xattr-big-value", xattr_big_value, expect=served({"x": DATA_A})),
    Case("many-entries", many_entries, refused="entries", slow=True, rss_limit_mb=400),
    Case("toc-gzip-bomb", toc_gzip_bomb, refused="claims", rss_limit_mb=100),
    Case("toc-gzip-bomb-quiet", toc_gzip_bomb_quiet, refused="not valid JSON", slow=True,
         rss_limit_mb=600),
    Case("toc-deeply-nested-json", toc_deep_json, refused="nested"),
    Case("toc-offset-far-back", toc_far_offset, refused="TOC", rss_limit_mb=300),
    Case("data-gzip-bomb", data_gzip_bomb, expect=served({"zeros": ("zeros", BOMB_SIZE)}),
         slow=True),
    Case("data-gzip-bomb-legacy", data_gzip_bomb_legacy,
         expect=served({"zeros": ("zeros", BOMB_SIZE)}), slow=True),
    Case("data-gzip-bomb-liar", data_gzip_bomb_liar, expect=served({"zeros": EIO}),
         slow=True),
    Case("data-bomb-overflow", data_bomb_overflow,
         expect=served({"zeros": ("zeros", 10 * MB)}), slow=True),
    Case("random-bytes", random_bytes, refused="not a stargz"),
    Case("empty-blob", empty_blob, refused="not a stargz"),
    Case("truncated-blob", truncated, refused="not a stargz"),
    Case("corrupt-toc-gzip", corrupt_toc_gzip, refused="TOC"),
]


_BUILT = {}


def build(case, path):
    """Write the case's blob to ``path`` (built once per test session)."""
    data = _BUILT.get(case.id)
    if data is None:
        data = _BUILT[case.id] = case.build(BlobBuilder())
    with open(path, "wb") as f:
        f.write(data)
    return path


def matches(expected, data):
    """Does ``data`` match an expectation (bytes, or ("zeros", n))?"""
    if isinstance(expected, tuple) and expected[0] == "zeros":
        return len(data) == expected[1] and not data.strip(b"\0")
    return data == expected
