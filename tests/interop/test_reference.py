"""Interoperability with the reference implementation (containerd estargz 0.12).

(a) blobs the Go library builds must read back through StargzReader with
the meaning of the input tar; (b) blobs our writer produces must open,
list and verify in the Go library.  Comparisons are of meaning (entries,
metadata, contents, digests), never of bytes.  Known 0.12 defects
(FORMAT.md §5) are not asserted as correct values.
"""

import gzip
import io
import os
import shutil
import subprocess
import tarfile

import pytest

from stargz_overlay.errors import DigestMismatch, FormatError
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource
from stargz_overlay.writer import convert

import trees
from trees import CHUNK, PRIORITIZED, Layer, diff, every_kind, sha, view_go, view_ours

# Fields a 0.12 reader reports correctly.  Root nlink differs by design
# (Go does not count the root's own "." link when the tar has a "./" entry).
GO_FIELDS = trees.FIELDS
LANDMARK_SHA = sha(b"\x0f")


def open_reader(path, **kw):
    return StargzReader(FileSource(str(path)), **kw)


def our_convert(tmp_path, layer_or_path, name="ours.esgz", **kw):
    src = layer_or_path if isinstance(layer_or_path, (str, os.PathLike)) else \
        layer_or_path.write(tmp_path / "in.tar")
    out = tmp_path / name
    with open(out, "wb") as f:
        res = convert(str(src), f, **kw)
    return out, res


def go_build(ref, tmp_path, layer, name="go.esgz", **kw):
    src = layer.write(tmp_path / f"{name}.tar")
    out = tmp_path / name
    return out, ref.build(src, out, **kw)


def assert_no_diff(problems):
    assert not problems, "\n".join(problems[:40])


# ---------------------------------------------------------------------------
# (a) Go writes, we read

@pytest.mark.parametrize("prioritized", [None, PRIORITIZED], ids=["no-prefetch", "prefetch"])
def test_go_estargz_reads_back(ref, tmp_path, prioritized):
    layer = every_kind()
    blob, built = go_build(ref, tmp_path, layer, chunk_size=CHUNK, prioritized=prioritized)
    r = open_reader(blob, toc_digest=built["tocDigest"])
    assert r.kind == "estargz"
    assert r.toc_digest == built["tocDigest"]
    ours = view_ours(r)
    want = layer.expected()
    assert_no_diff(diff(ours, want))
    # The Go reader's own view of the same blob agrees with ours.
    go = view_go(ref.ls(blob))
    assert_no_diff(diff(go, ours, skip_paths=("",)))
    report = r.verify()
    assert report.files == len({id(e) for e in r.toc.data_entries()})
    # big/random is 3 full chunks + 100 bytes; big/compressible exactly 3 chunks
    assert [c.size for c in r.toc.lookup("big/random").chunks] == [CHUNK] * 3 + [100]
    assert [c.size for c in r.toc.lookup("big/compressible").chunks] == [CHUNK] * 3
    assert [c.size for c in r.toc.lookup("big/exact").chunks] == [CHUNK]


def test_go_parts_per_cpu_read_back(ref, tmp_path):
    """Build splits work into GOMAXPROCS parts (extra member boundaries, per-part
    owner names): every split reads back with the same meaning."""
    layer = every_kind()
    digests = set()
    for procs in (1, 3, 8):
        env = dict(os.environ, GOMAXPROCS=str(procs))
        blob, built = go_build(ref, tmp_path, layer, name=f"go{procs}.esgz", chunk_size=CHUNK,
                               env=env)
        digests.add(built["tocDigest"])
        r = open_reader(blob, toc_digest=built["tocDigest"])
        assert_no_diff(diff(view_ours(r), layer.expected(), fields=GO_FIELDS + ("user", "group")))
    assert len(digests) > 1          # the TOC digest depends on the CPU count (FORMAT.md §3.9)


def test_go_chunks_match_ours(ref, tmp_path):
    """Chunk boundaries, blob offsets and digests are read the same by both."""
    layer = every_kind()
    blob, built = go_build(ref, tmp_path, layer, chunk_size=CHUNK)
    r = open_reader(blob)
    go = {e["path"]: e for e in ref.ls(blob)["entries"]}
    for path, entry in r.toc.walk():
        if entry.type != "reg" or not entry.size:
            continue
        ours = [(c.offset, c.chunk_offset, c.size, c.digest) for c in entry.chunks]
        theirs = [(c["offset"], c["chunkOffset"], c["chunkSize"], c["chunkDigest"])
                  for c in go[path]["chunks"]]
        assert ours == theirs, path


def test_go_owner_names(ref, tmp_path):
    """User and group names are back-filled per id from the first entry naming them.

    The 0.12 reader fills groupName from its *user* map (owners/g2 shows
    "bob"); we must show the tar's group name.
    """
    layer = every_kind()
    blob, _ = go_build(ref, tmp_path, layer, chunk_size=CHUNK)
    ours = view_ours(open_reader(blob), with_content=False)
    want = layer.expected()
    assert_no_diff(diff(ours, want, fields=("user", "group")))


def test_go_legacy_reads_back(ref, tmp_path):
    """crfs-style stargz (47-byte footer, no chunkDigest, NumLink keys) reads back."""
    layer = every_kind()
    blob, built = go_build(ref, tmp_path, layer, name="go.stargz", chunk_size=CHUNK,
                           legacy=True)
    data = blob.read_bytes()
    assert data[-47:-37] == b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
    r = open_reader(blob, toc_digest=built["tocDigest"])
    assert r.kind == "stargz"
    assert all(c.digest is None for e in r.toc.data_entries() for c in e.chunks)
    assert_no_diff(diff(view_ours(r), layer.expected()))
    r.verify()


def test_go_prefetch_range(ref, tmp_path):
    layer = every_kind()
    blob, _ = go_build(ref, tmp_path, layer, chunk_size=CHUNK, prioritized=PRIORITIZED)
    r = open_reader(blob)
    start, end = r.prefetch_range()
    assert start == 0
    for name in ("files/a", "big/random", "wh/opq/kept"):
        for chunk in r.toc.lookup(name).chunks:
            assert chunk.end <= end, name
    assert all(c.offset >= end for c in r.toc.lookup("big/compressible").chunks)

    blob2, _ = go_build(ref, tmp_path, layer, name="go2.esgz", chunk_size=CHUNK)
    assert open_reader(blob2).prefetch_range() is None


def test_go_blob_with_dangling_hardlink_is_a_format_error(ref, tmp_path):
    layer = Layer().file("a", b"a").hardlink("b", "missing")
    blob, _ = go_build(ref, tmp_path, layer)
    with pytest.raises(FormatError):
        open_reader(blob)


def test_go_blob_with_non_utf8_name(ref, tmp_path):
    """0.12 writes U+FFFD for invalid bytes; the TOC stays readable."""
    layer = Layer().file("bad\udcffname", b"payload").file("ok", b"fine")
    blob, _ = go_build(ref, tmp_path, layer)
    r = open_reader(blob)
    entry = r.toc.lookup("bad\ufffdname")
    assert entry is not None and r.read_file(entry) == b"payload"
    assert r.read_file(r.toc.lookup("ok")) == b"fine"


def test_go_duplicates_and_late_dirs(ref, tmp_path):
    """Same path twice (later wins), a dir entry after its children."""
    layer = (Layer().file("dup", b"A" * 10000).file("./dup", b"BBBBB")
             .file("p", b"file first").dir("p/", mode=0o700)
             .file("late/child", b"c").dir("late/", mode=0o711, uid=5, gid=6))
    blob, _ = go_build(ref, tmp_path, layer)
    r = open_reader(blob)
    assert_no_diff(diff(view_ours(r), layer.expected()))
    assert r.read_file(r.toc.lookup("dup")) == b"BBBBB"


def test_go_hardlink_before_target(ref, tmp_path):
    layer = Layer().hardlink("early", "late").file("late", b"target" * 1000)
    blob, _ = go_build(ref, tmp_path, layer)
    r = open_reader(blob)
    assert_no_diff(diff(view_ours(r), layer.expected()))
    assert r.toc.lookup("early") is r.toc.lookup("late")


def test_go_empty_tar(ref, tmp_path):
    blob, built = go_build(ref, tmp_path, Layer())
    r = open_reader(blob, toc_digest=built["tocDigest"])
    assert list(r.toc.walk()) == [("", r.toc.root)]
    assert r.toc.root.type == "dir"
    r.verify()


def test_go_gzip_input_and_diff_id(ref, tmp_path):
    """Build from a tar.gz; the reported diffID is the sha256 of the whole stream."""
    layer = every_kind()
    tgz = tmp_path / "in.tar.gz"
    tgz.write_bytes(gzip.compress(layer.bytes()))
    out = tmp_path / "go.esgz"
    built = ref.build(tgz, out, chunk_size=CHUNK)
    raw = gzip.decompress(out.read_bytes())
    assert built["diffID"] == sha(raw)
    assert built["uncompressedSize"] == len(raw)
    assert_no_diff(diff(view_ours(open_reader(out)), layer.expected()))


def test_go_corrupted_payload_is_detected(ref, tmp_path):
    """Go returns corrupted bytes silently; our reader must refuse them."""
    layer = Layer().file("f", b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    blob, _ = go_build(ref, tmp_path, layer, level=0)      # stored blocks: bytes visible
    data = bytearray(blob.read_bytes())
    pos = data.find(b"root:x:0:0")
    assert pos > 0
    data[pos + 3] ^= 0x20                                  # "rooT"
    blob.write_bytes(bytes(data))
    r = open_reader(blob)
    with pytest.raises(DigestMismatch):
        r.read_file(r.toc.lookup("f"))
    assert ref.verify(blob, r.toc_digest, check=False).returncode != 0


# ---------------------------------------------------------------------------
# (b) we write, Go reads

@pytest.mark.parametrize("chunk_size,prioritized,level", [
    (CHUNK, None, 6),
    (CHUNK, PRIORITIZED, 9),
    (4096, ["big/compressible", "files/a"], 1),
    (4 << 20, None, 0),
], ids=["64k", "64k-prefetch-l9", "4k-prefetch-l1", "default-l0"])
def test_our_estargz_in_go(ref, tmp_path, chunk_size, prioritized, level):
    layer = every_kind()
    blob, res = our_convert(tmp_path, layer, chunk_size=chunk_size, prioritized=prioritized,
                            compression_level=level)
    verified = ref.verify(blob, res.toc_digest)
    assert '"chunks"' in verified.stdout
    ls = ref.ls(blob)
    assert ls["tocDigest"] == res.toc_digest
    go = view_go(ls)
    want = layer.expected()
    # The root's nlink and groupName are 0.12 defects; compare them on our side only.
    assert_no_diff(diff(go, want, skip_paths=("",)))
    assert_no_diff(diff(go, want, fields=("user",)))
    landmarks = {e["path"]: e for e in ls["entries"] if e["path"] in trees.LANDMARKS}
    expect_mark = ".prefetch.landmark" if prioritized else ".no.prefetch.landmark"
    assert list(landmarks) == [expect_mark]
    assert landmarks[expect_mark]["contentSha256"] == LANDMARK_SHA
    # A wrong TOC digest is refused by Go.
    assert ref.verify(blob, sha(b"other"), check=False).returncode != 0
    # Our own reader agrees.
    r = open_reader(blob, toc_digest=res.toc_digest)
    assert_no_diff(diff(view_ours(r), want))


def test_our_prioritized_order_seen_by_go(ref, tmp_path):
    layer = every_kind()
    blob, res = our_convert(tmp_path, layer, chunk_size=CHUNK, prioritized=PRIORITIZED)
    entries = {e["path"]: e for e in ref.ls(blob)["entries"]}
    mark = entries[".prefetch.landmark"]["chunks"][0]["offset"]
    for name in ("files/a", "big/random", "links/hardbig", "wh/opq/kept"):
        assert all(c["offset"] < mark for c in entries[name]["chunks"]), name
    for name in ("big/compressible", "big/exact", "xattr/f"):
        assert all(c["offset"] > mark for c in entries[name]["chunks"]), name
    assert res.missed_prioritized == []


def test_our_missing_prioritized_reported(ref, tmp_path):
    layer = every_kind()
    blob, res = our_convert(tmp_path, layer, prioritized=["files/a", "no/such/file"])
    assert res.missed_prioritized == ["no/such/file"]
    ref.verify(blob, res.toc_digest)


@pytest.mark.parametrize("chunk_size", [4 << 20, CHUNK], ids=["unchunked", "chunked"])
def test_our_legacy_in_go(ref, tmp_path, chunk_size):
    layer = every_kind()
    blob, res = our_convert(tmp_path, layer, name="ours.stargz", legacy=True,
                            chunk_size=chunk_size)
    data = blob.read_bytes()
    footer = data[-47:]
    assert footer[:10] == b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff"
    assert footer[12:34].endswith(b"STARGZ")
    ls = ref.ls(blob)
    assert not any(e["path"] in trees.LANDMARKS for e in ls["entries"])
    want = layer.expected()
    go = view_go(ls)
    assert_no_diff(diff(go, want, skip_paths=("",)))
    assert all(not c["chunkDigest"] for e in ls["entries"] for c in e.get("chunks") or ())
    if chunk_size == 4 << 20:
        # Without chunk entries 0.12 verifies legacy blobs by whole-file digest.
        ref.verify(blob, res.toc_digest)
    r = open_reader(blob, toc_digest=res.toc_digest)
    assert r.kind == "stargz"
    assert_no_diff(diff(view_ours(r), want))


def test_our_convert_result_describes_blob(tmp_path):
    layer = every_kind()
    blob, res = our_convert(tmp_path, layer, chunk_size=CHUNK)
    data = blob.read_bytes()
    raw = gzip.decompress(data)
    assert res.compressed_size == len(data)
    assert res.blob_digest == sha(data)
    assert res.uncompressed_size == len(raw)
    assert res.diff_id == sha(raw)
    # A plain tar reader sees the layer, with the TOC as the last entry.
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
    assert names[-1] == "stargz.index.json"
    assert names[0] == ".no.prefetch.landmark"


def test_our_quirk_fixes_read_by_go(ref, tmp_path):
    """Inputs 0.12 mishandles: duplicates, self-hardlink, link before target."""
    layer = (Layer().file("dup", b"A" * 10000).file("./dup", b"BBBBB")
             .file("self", b"self content").hardlink("self", "self")
             .hardlink("early", "late").file("late", b"target" * 1000)
             .file("p", b"file first").dir("p/", mode=0o700))
    blob, res = our_convert(tmp_path, layer)
    ref.verify(blob, res.toc_digest)
    want = layer.expected()
    assert_no_diff(diff(view_go(ref.ls(blob)), want, skip_paths=("",)))
    assert_no_diff(diff(view_ours(open_reader(blob)), want))


def test_our_global_pax_header_input(ref, tmp_path):
    """``git archive`` tarballs start with a PAX global header; 0.12 rejects them."""
    layer = Layer(global_pax={"comment": "0123456789abcdef"}).file("a", b"a" * 100)
    src = layer.write(tmp_path / "in.tar")
    assert ref.run("build", src, tmp_path / "go.esgz", check=False).returncode != 0
    blob, res = our_convert(tmp_path, src)
    ref.verify(blob, res.toc_digest)
    assert_no_diff(diff(view_go(ref.ls(blob)), layer.expected(), skip_paths=("",)))


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_our_sparse_input_written_dense(ref, tmp_path, fmt):
    """Sparse files become dense files with the right bytes (0.12 corrupts PAX sparse)."""
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    tree = tmp_path / "tree"
    tree.mkdir()
    sparse = tree / "sparse"
    with open(sparse, "wb") as f:
        f.seek(300000)
        f.write(b"middle")
        f.seek(700000)
        f.write(b"end")
    (tree / "after").write_bytes(b"next entry")
    src = tmp_path / "in.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-C", str(tree), "-cf", str(src),
                    "sparse", "after"], check=True)
    expected = sparse.read_bytes()
    blob, res = our_convert(tmp_path, str(src), chunk_size=CHUNK)
    ref.verify(blob, res.toc_digest)
    go = {e["path"]: e for e in ref.ls(blob)["entries"]}
    assert go["sparse"]["contentSha256"] == sha(expected)
    assert go["sparse"]["size"] == len(expected)
    assert go["after"]["contentSha256"] == sha(b"next entry")
    r = open_reader(blob)
    assert r.read_file(r.toc.lookup("sparse")) == expected


def test_mode_with_file_type_bits(ref, tmp_path):
    """A tar mode field of 0100644 (some Go tools) is masked to 0644 on both paths."""
    info = tarfile.TarInfo("typed")
    info.size = 3
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    header[100:108] = b"0100644\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    src = tmp_path / "in.tar"
    src.write_bytes(bytes(header) + b"abc".ljust(512, b"\0") + b"\0" * 1024)
    go_blob = tmp_path / "go.esgz"
    ref.build(src, go_blob)
    e = open_reader(go_blob).toc.lookup("typed")
    assert (e.type, e.mode) == ("reg", 0o644)
    blob, res = our_convert(tmp_path, str(src))
    go = {x["path"]: x for x in ref.ls(blob)["entries"]}
    assert go["typed"]["mode"] & 0o7777 == 0o644 and go["typed"]["type"] == "reg"


def test_restargzify_go_blob(ref, tmp_path):
    """Converting an eStargz blob again drops its TOC and landmark and keeps the meaning."""
    layer = every_kind()
    go_blob, _ = go_build(ref, tmp_path, layer, chunk_size=CHUNK, prioritized=PRIORITIZED)
    blob, res = our_convert(tmp_path, go_blob, chunk_size=CHUNK)
    ref.verify(blob, res.toc_digest)
    r = open_reader(blob, toc_digest=res.toc_digest)
    assert_no_diff(diff(view_ours(r), layer.expected()))
    assert r.toc.lookup("stargz.index.json") is None
