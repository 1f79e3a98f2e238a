"""Round trips, edge cases and damaged input for the stargz/eStargz format library."""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from stargz_overlay.errors import DigestMismatch, FormatError
from stargz_overlay.footer import encode_footer, parse_footer
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import BytesSource
from stargz_overlay.toc import parse_toc
from stargz_overlay.writer import convert

from .tarbuild import TarBuilder


def build(tar_bytes, **kwargs):
    out = io.BytesIO()
    result = convert(io.BytesIO(tar_bytes), out, **kwargs)
    return out.getvalue(), result


def open_blob(blob, **kwargs):
    return StargzReader(BytesSource(blob), **kwargs)


def every_type_tar():
    big = os.urandom(300_000)
    return TarBuilder() \
        .dir("./", mode=0o750) \
        .dir("etc", mode=0o755, uid=0, gid=0) \
        .file("etc/hosts", b"127.0.0.1 localhost\n", mode=0o644, uid=0, gid=0,
              uname="root", gname="root") \
        .file("etc/shadow", b"root:*:1::::::\n", mode=0o640, uid=0, gid=42, gname="shadow") \
        .file("usr/bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4755) \
        .file("big.bin", big, mode=0o600, uid=1000, gid=1000, uname="alice", gname="users") \
        .file("empty", b"") \
        .symlink("etc/localtime", "/usr/share/zoneinfo/UTC") \
        .hardlink("usr/bin/tool2", "usr/bin/tool") \
        .char("dev/null", 1, 3, mode=0o666) \
        .block("dev/sda", 8, 0, mode=0o660) \
        .fifo("run/fifo", mode=0o600) \
        .file("x/attr", b"x", xattrs={"user.foo": b"bar", "security.capability": b"\x01\x00\xff"}) \
        .dir("opaque") \
        .file("opaque/.wh..wh..opq") \
        .file("etc/.wh.removed") \
        .file("sticky/dir/" + "n" * 200, b"long name", mode=0o1777) \
        .bytes(), big


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("chunk_size", [4 << 20, 65536, 100_000])
def test_round_trip_every_entry_type(legacy, chunk_size):
    tar_bytes, big = every_type_tar()
    blob, result = build(tar_bytes, legacy=legacy, chunk_size=chunk_size)
    reader = open_blob(blob, toc_digest=result.toc_digest)
    assert reader.kind == ("stargz" if legacy else "estargz")
    toc = reader.toc
    assert toc.root.mode == 0o750
    hosts = toc.lookup("./etc/hosts")
    assert (hosts.type, hosts.mode, hosts.uid, hosts.size) == ("reg", 0o644, 0, 20)
    assert reader.read_file(hosts) == b"127.0.0.1 localhost\n"
    assert toc.lookup("etc/shadow").gid == 42
    assert toc.lookup("usr/bin/tool").mode == 0o4755
    assert toc.lookup("usr").type == "dir" and toc.lookup("usr").mode == 0o755  # implied
    bigent = toc.lookup("big.bin")
    assert (bigent.uid, bigent.gid, bigent.mode) == (1000, 1000, 0o600)
    assert reader.read_file(bigent) == big
    expected_chunks = -(-len(big) // chunk_size)
    assert len(bigent.chunks) == expected_chunks
    assert toc.lookup("empty").size == 0 and reader.read_file(toc.lookup("empty")) == b""
    link = toc.lookup("etc/localtime")
    assert (link.type, link.link_name) == ("symlink", "/usr/share/zoneinfo/UTC")
    tool, tool2 = toc.lookup("usr/bin/tool"), toc.lookup("usr/bin/tool2")
    assert tool is tool2 and tool.nlink == 2
    null = toc.lookup("dev/null")
    assert (null.type, null.dev_major, null.dev_minor, null.mode) == ("char", 1, 3, 0o666)
    assert toc.lookup("dev/sda").type == "block" and toc.lookup("dev/sda").dev_major == 8
    assert toc.lookup("run/fifo").type == "fifo"
    assert toc.lookup("x/attr").xattrs == {"user.foo": b"bar",
                                            "security.capability": b"\x01\x00\xff"}
    assert toc.lookup("opaque/.wh..wh..opq").type == "reg"
    assert toc.lookup("etc/.wh.removed") is not None
    assert reader.read_file(toc.lookup("sticky/dir/" + "n" * 200)) == b"long name"
    assert toc.lookup("sticky").mode == 0o755
    # a plain tar reader sees the same tree, plus the TOC (and a landmark for eStargz)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = tar.getnames()
        assert names[-1] == "stargz.index.json"
        assert tar.extractfile("big.bin").read() == big
    assert (".no.prefetch.landmark" in names) != legacy
    assert result.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest()
    assert result.uncompressed_size == len(gzip.decompress(blob))
    assert result.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    report = reader.verify()
    assert report.bytes == sum(e.size for e in toc.data_entries())


def test_gnu_tar_accepts_output(tmp_path):
    tar_bytes, big = every_type_tar()
    blob, _ = build(tar_bytes, chunk_size=65536)
    (tmp_path / "layer.tgz").write_bytes(blob)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xzf", str(tmp_path / "layer.tgz"), "-C", str(out),
                    "--no-same-owner", "--exclude=dev"], check=True)
    assert (out / "big.bin").read_bytes() == big
    assert os.readlink(out / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.stat(out / "usr/bin/tool").st_ino == os.stat(out / "usr/bin/tool2").st_ino


def test_reads_fetch_only_the_footer_toc_and_asked_members():
    tar_bytes, big = every_type_tar()
    blob, result = build(tar_bytes, chunk_size=65536)
    source = BytesSource(blob)
    reader = StargzReader(source)
    assert len(source.reads) == 2                    # footer, then TOC
    assert source.reads[0] == (len(blob) - 51, 51)
    source.reads.clear()
    reader.read_file(reader.toc.lookup("etc/hosts"))
    entry = reader.toc.lookup("etc/hosts")
    assert source.reads == [(entry.chunks[0].offset, entry.chunks[0].end - entry.chunks[0].offset)]
    # with the TOC offset known, opening takes one read
    source2 = BytesSource(blob)
    StargzReader(source2, toc_offset=reader.toc_offset)
    assert len(source2.reads) == 1


def test_prioritized_files_go_first_with_landmark():
    tar_bytes, _ = every_type_tar()
    blob, result = build(tar_bytes, prioritized=["usr/bin/tool2", "etc/hosts", "/missing"])
    assert result.missed_prioritized == ["/missing"]
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = tar.getnames()
    # parents first, the hardlink's target before the link, then the landmark
    order = [names.index(n) for n in ("etc", "etc/hosts", ".prefetch.landmark")]
    assert order == sorted(order)
    assert names.index("usr/bin/tool") < names.index("usr/bin/tool2") < order[-1]
    assert names.index(".prefetch.landmark") < names.index("big.bin")
    reader = open_blob(blob)
    start, end = reader.prefetch_range()
    hosts = reader.toc.lookup("etc/hosts")
    assert start == 0 and hosts.chunks[0].end <= end
    assert reader.toc.lookup(".prefetch.landmark") is None      # landmarks are hidden


def test_duplicates_last_definition_wins():
    tar_bytes = TarBuilder().file("f", b"A" * 10000).file("./f", b"B" * 5) \
        .file("p", b"file").dir("p/").bytes()
    blob, _ = build(tar_bytes)
    reader = open_blob(blob)
    assert reader.read_file(reader.toc.lookup("f")) == b"BBBBB"
    assert reader.toc.lookup("p").type == "dir"
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        assert tar.getnames().count("f") == 1


def test_self_hardlink_keeps_the_file():
    tar_bytes = TarBuilder().file("f", b"content").hardlink("f", "f").bytes()
    blob, _ = build(tar_bytes)
    reader = open_blob(blob)
    assert reader.read_file(reader.toc.lookup("f")) == b"content"


def test_hardlink_before_target_is_reordered():
    tar_bytes = TarBuilder().hardlink("link", "target").file("target", b"data").bytes()
    blob, _ = build(tar_bytes)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = tar.getnames()
    assert names.index("target") < names.index("link")
    reader = open_blob(blob)
    assert reader.read_file(reader.toc.lookup("link")) == b"data"


def test_hardlink_to_missing_target_is_refused():
    with pytest.raises(FormatError, match="not in the layer"):
        build(TarBuilder().hardlink("link", "nowhere").bytes())


def test_pax_global_header_is_accepted(tmp_path):
    src = tmp_path / "repo"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    subprocess.run(["git", "-C", str(src), "add", "."], check=True)
    subprocess.run(["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-qm", "x"], check=True)
    archive = subprocess.run(["git", "-C", str(src), "archive", "HEAD"], check=True,
                             capture_output=True).stdout
    assert b"pax_global_header" in archive
    blob, _ = build(archive)
    reader = open_blob(blob)
    assert reader.read_file(reader.toc.lookup("a.txt")) == b"hello"
    assert reader.toc.lookup("pax_global_header") is None


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_files_are_written_dense(tmp_path, fmt):
    path = tmp_path / "src" / "sparse"
    path.parent.mkdir()
    with open(path, "wb") as f:
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek(3 << 20)
        f.write(b"end")
    tar_path = tmp_path / "in.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(tar_path), "-C",
                    str(path.parent), "sparse"], check=True)
    blob, _ = build(tar_path.read_bytes(), chunk_size=1 << 20)
    reader = open_blob(blob)
    assert reader.read_file(reader.toc.lookup("sparse")) == path.read_bytes()


def test_non_utf8_name_is_refused():
    tar_bytes = TarBuilder(fmt=tarfile.GNU_FORMAT).file(
        b"caf\xe9".decode("utf-8", "surrogateescape"), b"x").bytes()
    with pytest.raises(FormatError, match="not UTF-8"):
        build(tar_bytes)


def test_gzip_input_and_existing_landmarks_and_toc_are_replaced():
    inner = TarBuilder().file(".no.prefetch.landmark", b"\x0f").file("stargz.index.json", b"{}") \
        .file("sub/stargz.index.json", b"kept").file("a", b"a").bytes()
    blob, _ = build(gzip.compress(inner))
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        names = tar.getnames()
    assert names.count(".no.prefetch.landmark") == 1
    assert names.count("stargz.index.json") == 1
    assert "sub/stargz.index.json" in names
    # converting our own output again is idempotent in meaning
    blob2, _ = build(blob)
    r1, r2 = open_blob(blob), open_blob(blob2)
    assert [p for p, _ in r1.toc.walk()] == [p for p, _ in r2.toc.walk()]


def test_empty_tar():
    blob, result = build(TarBuilder().bytes())
    reader = open_blob(blob, toc_digest=result.toc_digest)
    assert reader.toc.root.children == {}


def flip(blob, offset):
    data = bytearray(blob)
    data[offset] ^= 0x55
    return bytes(data)


def test_corrupted_data_member_never_returns_wrong_bytes():
    payload = b"secret data " * 1000
    blob, _ = build(TarBuilder().file("f", payload).bytes(), compression_level=0)
    reader = open_blob(blob)
    entry = reader.toc.lookup("f")
    chunk = entry.chunks[0]
    # compression level 0 stores the bytes: flip one inside the payload itself
    bad = flip(blob, blob.index(b"secret data", chunk.offset) + 3)
    reader = open_blob(bad)
    with pytest.raises((DigestMismatch, FormatError)):
        reader.read_file(reader.toc.lookup("f"))
    with pytest.raises((DigestMismatch, FormatError)):
        reader.verify()


def test_every_flipped_byte_is_caught_or_harmless():
    payload = os.urandom(5000)
    blob, result = build(TarBuilder().file("f", payload).file("g", b"g" * 3000).bytes(),
                         chunk_size=2048)
    for offset in range(0, len(blob), 7):
        try:
            reader = open_blob(flip(blob, offset), toc_digest=result.toc_digest)
            assert reader.read_file(reader.toc.lookup("f")) == payload
            assert reader.read_file(reader.toc.lookup("g")) == b"g" * 3000
        except (FormatError, DigestMismatch):
            pass


def test_wrong_toc_digest():
    blob, _ = build(TarBuilder().file("f", b"x").bytes())
    with pytest.raises(DigestMismatch, match="TOC digest"):
        open_blob(blob, toc_digest="sha256:" + "0" * 64)


@pytest.mark.parametrize("cut", [1, 20, 51, 100, 1000])
def test_truncated_blob(cut):
    blob, _ = build(TarBuilder().file("f", os.urandom(3000)).bytes())
    with pytest.raises(FormatError):
        open_blob(blob[:-cut])


def test_not_a_blob():
    with pytest.raises(FormatError, match="no stargz footer"):
        open_blob(gzip.compress(os.urandom(1000)))
    with pytest.raises(FormatError, match="only 3 bytes"):
        open_blob(b"abc")


def test_footer_without_extra_field():
    plain_member = gzip.compress(b"")
    tail = (b"\0" * 60 + plain_member)[-51:]
    with pytest.raises(FormatError):
        parse_footer(tail, 1000)
    # gzip header with FEXTRA set but an Extra shorter than it claims
    with pytest.raises(FormatError):
        parse_footer(b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\xff\x00" + b"\0" * 39, 1000)


def test_footer_round_trip_and_bounds():
    for legacy in (False, True):
        footer = encode_footer(1234, legacy=legacy)
        parsed = parse_footer(footer, 5000)
        assert parsed.toc_offset == 1234 and parsed.size == len(footer)
    with pytest.raises(FormatError, match="beyond the blob"):
        parse_footer(encode_footer(10_000), 5000)


def replace_toc(blob, toc_json):
    """Re-pack ``blob`` with another TOC JSON (offsets of data members kept)."""
    reader = open_blob(blob)
    head = blob[:reader.toc_offset]
    member = io.BytesIO()
    with tarfile.open(fileobj=member, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tar.addfile(info, io.BytesIO(toc_json))
    return head + gzip.compress(member.getvalue()) + encode_footer(len(head))


@pytest.mark.parametrize("toc_json,message", [
    (b"not json", "not valid JSON"),
    (b"[]", "entries"),
    (b'{"version": 2, "entries": []}', "version"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "weird"}]}', "unknown type"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": -1}]}', "non-negative"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": 5, "offset": 999999}]}',
     "outside"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "hardlink", "linkName": "b"}]}',
     "not in the layer"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "hardlink", "linkName": "b"},'
     b'{"name": "b", "type": "hardlink", "linkName": "a"}]}', "loop"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg"}, {"name": "a/b", "type": "reg"}]}',
     "not a directory"),
    (b'{"version": 1, "entries": [{"name": "a\\u0000b", "type": "reg"}]}', "NUL"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "xattrs": {"k": "!!"}}]}',
     "base64"),
    (b'{"version": 1, "entries": [{"name": "a", "type": "chunk"}]}', "follows no regular"),
])
def test_bad_toc_is_a_clear_error(toc_json, message):
    blob, _ = build(TarBuilder().file("f", b"x" * 100).bytes())
    with pytest.raises(FormatError, match=message):
        open_blob(replace_toc(blob, toc_json))


def test_chunks_must_tile_the_file():
    blob, _ = build(TarBuilder().file("f", b"x" * 100).bytes())
    offset = open_blob(blob).toc.lookup("f").chunks[0].offset
    toc = {"version": 1, "entries": [
        {"name": "f", "type": "reg", "size": 100, "offset": offset, "chunkSize": 50},
        {"name": "f", "type": "chunk", "offset": offset, "chunkOffset": 60}]}
    with pytest.raises(FormatError, match="contiguously"):
        open_blob(replace_toc(blob, json.dumps(toc).encode()))


def test_inner_offset_is_supported():
    """Two files in one gzip member, the second at innerOffset (upstream format)."""
    a, b = b"A" * 700, b"B" * 300
    tar_stream = TarBuilder().file("a", a).file("b", b).bytes()
    with tarfile.open(fileobj=io.BytesIO(tar_stream)) as tar:
        ia, ib = tar.getmember("a"), tar.getmember("b")
    head = gzip.compress(tar_stream[:ia.offset_data])
    member = gzip.compress(tar_stream[ia.offset_data:])
    toc = {"version": 1, "entries": [
        {"name": "a", "type": "reg", "size": 700, "offset": len(head),
         "digest": "sha256:" + hashlib.sha256(a).hexdigest(),
         "chunkDigest": "sha256:" + hashlib.sha256(a).hexdigest()},
        {"name": "b", "type": "reg", "size": 300, "offset": len(head),
         "innerOffset": ib.offset_data - ia.offset_data,
         "digest": "sha256:" + hashlib.sha256(b).hexdigest(),
         "chunkDigest": "sha256:" + hashlib.sha256(b).hexdigest()}]}
    toc_json = json.dumps(toc).encode()
    toc_tar = io.BytesIO()
    with tarfile.open(fileobj=toc_tar, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tar.addfile(info, io.BytesIO(toc_json))
    body = head + member
    blob = body + gzip.compress(toc_tar.getvalue()) + encode_footer(len(body))
    reader = open_blob(blob)
    assert reader.read_file(reader.toc.lookup("a")) == a
    assert reader.read_file(reader.toc.lookup("b")) == b


def test_parse_toc_names_are_cleaned_and_implied_dirs_created():
    toc = parse_toc(json.dumps({"version": 1, "entries": [
        {"name": "/abs/f", "type": "reg"},
        {"name": "a/../b/c", "type": "symlink", "linkName": "../x"},
        {"name": "../escape", "type": "dir", "mode": 0o40700},
    ]}).encode(), 1000)
    assert toc.lookup("abs/f").type == "reg"
    assert toc.lookup("b/c").link_name == "../x"
    assert toc.lookup("escape").mode == 0o700
    assert toc.lookup("b").nlink == 2 and toc.root.nlink == 5
    inos = [e.ino for e in toc.entries]
    assert inos == list(range(1, len(inos) + 1))


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stargz_overlay", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_convert_ls_cat_verify_toc(tmp_path):
    tar_bytes, big = every_type_tar()
    (tmp_path / "in.tar").write_bytes(tar_bytes)
    (tmp_path / "prio").write_text("# startup\netc/hosts\n")
    res = run_cli("convert", str(tmp_path / "in.tar"), str(tmp_path / "out.esgz"), "--json",
                  "--chunk-size", "65536", "--prioritized-files", str(tmp_path / "prio"))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["tocDigest"].startswith("sha256:")
    blob = str(tmp_path / "out.esgz")
    res = run_cli("ls", blob)
    lines = res.stdout.splitlines()
    assert any(line.startswith("hardlink") and "usr/bin/tool2 -> usr/bin/tool" in line
               for line in lines)
    assert any(line.startswith("char") and "1,3" in line for line in lines)
    res = run_cli("cat", blob, "etc/hosts")
    assert res.stdout == "127.0.0.1 localhost\n"
    res = run_cli("verify", blob, "--toc-digest", summary["tocDigest"])
    assert res.returncode == 0 and res.stdout.startswith("ok:")
    res = run_cli("toc", blob)
    assert json.loads(res.stdout)["version"] == 1
    res = run_cli("ls", blob, "--json")
    assert {r["path"] for r in json.loads(res.stdout)} >= {".", "etc/hosts", "big.bin"}


def test_cli_errors_are_one_line(tmp_path):
    blob, _ = build(TarBuilder().file("f", b"x" * 5000).bytes(), compression_level=0)
    (tmp_path / "bad").write_bytes(flip(blob, blob.index(b"xxxx")))
    (tmp_path / "junk").write_bytes(b"junk" * 100)
    cases = [("ls", str(tmp_path / "missing")), ("ls", str(tmp_path / "junk")),
             ("cat", str(tmp_path / "bad"), "f"), ("verify", str(tmp_path / "bad")),
             ("cat", str(tmp_path / "junk"), "f"), ("convert", str(tmp_path / "junk"),
                                                    str(tmp_path / "out"))]
    for args in cases:
        res = run_cli(*args)
        assert res.returncode == 1, args
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("stargz-overlay: error:"), \
            res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".stargz-")]
