"""Pure-Python parts of the plugin: DATA encoding, configuration, cache, layer view."""

import errno
import hashlib
import io
import os
import stat
import threading

import pytest

from stargz_overlay.cache import ContentCache
from stargz_overlay.config import load_config
from stargz_overlay.errors import ConfigError, DigestMismatch
from stargz_overlay.layer_spec import LayerSpec, LayerSpecError, decode, encode
from stargz_overlay.layer_view import LayerView, normalize
from stargz_overlay.reader import StargzReader
from stargz_overlay.source import FileSource
from stargz_overlay.writer import convert

from ..format.tarbuild import TarBuilder

D = "sha256:" + "ab" * 32


def test_layer_spec_round_trip_and_alphabet():
    for spec in (LayerSpec("blob", path="/a b/c,d:e.blob", toc=D),
                 LayerSpec("registry", ref="127.0.0.1:5000/x/y:1", digest=D, size=7,
                           config="/etc/c.toml")):
        data = encode(spec)
        assert set(data) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                "0123456789-_")
        assert decode(data) == spec


@pytest.mark.parametrize("data,message", [
    ("", "not base64url"), ("a/b", "not base64url"), ("e30", "unknown layer kind"),
    (encode.__globals__["base64"].urlsafe_b64encode(b"[1]").decode().rstrip("="), "not a JSON"),
    (encode.__globals__["base64"].urlsafe_b64encode(b'{"kind":"blob","path":"rel"}')
     .decode().rstrip("="), "absolute"),
    (encode.__globals__["base64"].urlsafe_b64encode(b'{"kind":"registry","ref":"r"}')
     .decode().rstrip("="), "digest"),
    (encode.__globals__["base64"].urlsafe_b64encode(b'{"kind":"blob","path":"/x","toc":"md5:1"}')
     .decode().rstrip("="), "sha256"),
    (encode.__globals__["base64"].urlsafe_b64encode(b'{"kind":"blob","path":"/x","zz":1}')
     .decode().rstrip("="), "unknown fields"),
])
def test_layer_spec_rejects_bad_data(data, message):
    with pytest.raises(LayerSpecError) as exc:
        decode(data)
    assert message in str(exc.value)


def test_config_defaults_file_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("STARGZ_OVERLAY_CONFIG", raising=False)
    path = tmp_path / "c.toml"
    path.write_text('cache_dir = "cache"\nlog_level = "warning"\n[registry]\nretries = 5\n'
                    'insecure = ["h:1"]\n')
    cfg = load_config(str(path))
    assert cfg.cache_dir == str(tmp_path / "cache") and cfg.log_level == "warning"
    assert cfg.registry.retries == 5 and cfg.registry.insecure == ["h:1"]
    assert cfg.log_file == "/var/log/stargz-overlay/plugin.log"
    monkeypatch.setenv("STARGZ_OVERLAY_CONFIG", str(path))
    assert load_config().path == str(path)
    for text, message in (("cache_dirs = 'x'", "unknown key"), ("fsync = 1", "must be a bool"),
                          ("log_level = 'loud'", "log_level"), ("[registry]\nretries = 0",
                                                                "retries"), ("= x", "TOML")):
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_config(str(path))
        assert message in str(exc.value)
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "missing.toml"))


def test_cache_verifies_publishes_atomically_and_fetches_once(tmp_path):
    cache = ContentCache(str(tmp_path / "c"))
    data = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with pytest.raises(DigestMismatch):
        cache.get(digest, len(data), lambda: [data[:50], b"x" * (len(data) - 50)])
    with pytest.raises(DigestMismatch):
        cache.get(digest, len(data), lambda: [data[:-1]])
    assert cache.lookup(digest, len(data)) is None
    assert os.listdir(tmp_path / "c/tmp") == []
    calls = []
    gate = threading.Event()

    def produce():
        calls.append(1)
        gate.wait(5)
        yield data

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(digest, len(data),
                                                                          produce)))
               for _ in range(8)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    path = results[0]
    assert open(path, "rb").read() == data
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700
    os.chmod(path, 0o600)                        # damaged behind our back (e.g. a crash)
    with open(path, "r+b") as f:
        f.write(b"\0" * 10)
    fresh = ContentCache(str(tmp_path / "c"))    # a new mount re-hashes before trusting
    assert fresh.lookup(digest, len(data)) is None and not os.path.exists(path)
    assert open(fresh.get(digest, len(data), lambda: [data]), "rb").read() == data
    computed, p2 = cache.put([b"abc"], 3)
    assert computed == "sha256:" + hashlib.sha256(b"abc").hexdigest() and os.path.exists(p2)


def test_normalize_paths_from_fuse_overlayfs():
    assert normalize(".") == "" and normalize("/.wh.") == ".wh." and normalize("./x/y") == "x/y"
    assert normalize("./.wh..wh..opq") == ".wh..wh..opq" and normalize("a//b/") == "a/b"
    assert normalize("a/./b") == "a/b" and normalize("../../a") == "a"


def test_layer_view_from_toc(tmp_path):
    b = TarBuilder()
    b.dir("d", mode=0o710, uid=5, gid=6, xattrs={"user.d": b"1"})
    b.file("d/f", b"hello", mode=0o640)
    b.file("d/.wh.f", b"")            # same-layer whiteout: dropped
    b.file("d/.wh.lower", b"")        # whiteout of a lower file: kept
    b.symlink("s", "d/f")
    out = io.BytesIO()
    convert(io.BytesIO(b.bytes()), out)
    blob = tmp_path / "b.blob"
    blob.write_bytes(out.getvalue())
    cache = ContentCache(str(tmp_path / "cache"))
    view = LayerView(StargzReader(FileSource(str(blob))), str(tmp_path / "w"), cache, 3, "t")
    assert sorted(view.listing["d"]) == [".wh.lower", "f"]
    fields = view.stat_fields(view.lookup("./d/f"))
    assert fields[1] == (1 << 40) + 3 * (1 << 32) + view.lookup("d/f").ino
    assert fields[2] == stat.S_IFREG | 0o640 and fields[8] == 5
    assert view.stat_fields(view.lookup("s"))[2] == stat.S_IFLNK | 0o777
    with pytest.raises(OSError) as exc:
        view.xattr("d", "user.none")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        view.open("s", os.O_RDONLY | os.O_NOFOLLOW)
    assert exc.value.errno == errno.ELOOP
    fd = view.open("s", os.O_RDONLY)                     # followed inside the layer
    assert os.read(fd, 100) == b"hello"
    os.close(fd)
    fd = view.open("d", os.O_RDONLY)
    st = os.fstat(fd)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o710, 5, 6)
    assert os.getxattr(fd, "user.d") == b"1"
    assert sorted(os.listdir(fd)) == [".wh.lower", "f"]
    os.close(fd)
    view.close()
    assert not os.path.exists(tmp_path / "w/tree")
