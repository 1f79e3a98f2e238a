"""``convert --optimize``: a workload recorded through the plugin, per layer and in order.

Real fuse-overlayfs mounts of the plugin, the real podman (runc, private
storage), a real docker-registry with a counting proxy, strace as the
independent witness of what the workload reads.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from stargz_overlay.access_log import Access, AccessLog, read_accesses
from stargz_overlay.elf import parse_elf
from stargz_overlay.errors import StargzError
from stargz_overlay.image_convert import open_endpoint
from stargz_overlay.oci_layout import OCILayout
from stargz_overlay.reader import StargzReader
from stargz_overlay.record import by_layer, host_arch, merge, parse_period, record_image
from stargz_overlay.source import FileSource

from ..format.tarbuild import TarBuilder
from ..imagefixture import busybox_layer, write_layout
from ..plugin.fusehelp import REPO, write_config
from ..registryfixture import Proxy, Registry

sys.path.insert(0, os.path.join(REPO, "contrib"))
import images  # noqa: E402

ENV = dict(os.environ)        # the CLI of the package under test (installed or on PYTHONPATH)
CLI = [sys.executable, "-m", "stargz_overlay"]
HELLO = ["python3", "-c", "print('hello')"]
PODMAN_READS = {"etc/passwd", "etc/group"}     # podman run reads them to set up the user


def cli(*args, env=None, check=True):
    res = subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=600,
                         env=env or ENV)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stderr}")
    return res


def foreign_arch():
    return "s390x" if host_arch() != "s390x" else "amd64"


# -- units --

def test_period_and_record_lines(tmp_path):
    assert parse_period("10s") == 10 and parse_period("500ms") == 0.5
    assert parse_period("2m") == 120 and parse_period("3") == 3
    for bad in ("", "0", "-1s", "ten"):
        with pytest.raises(StargzError):
            parse_period(bad)
    log = AccessLog(str(tmp_path / "r.tsv"))
    log.write("sha256:x", "open", "a\tb\\c\nd", "a\tb\\c\nd")
    log.write("sha256:x", "stat", "e", "e")
    (tmp_path / "r.tsv").open("a").write("garbage line\n")
    got = read_accesses(str(tmp_path / "r.tsv"))
    assert [(a.op, a.path, a.content) for a in got] == [
        ("open", "a\tb\\c\nd", "a\tb\\c\nd"), ("stat", "e", "e")]
    assert read_accesses(str(tmp_path / "missing")) == []


def test_lists_per_source_layer_and_merge_with_analysis():
    acc = [Access("t1", "stat", "usr/bin/x", "usr/bin/x"),
           Access("t1", "readlink", "usr/bin/x", "usr/bin/x"),
           Access("t2", "open", "usr/bin/x.1", "usr/bin/x.1"),
           Access("t1", "open", "lib/b", "lib/a"),         # hardlink: its target's content
           Access("t1", "opendir", "lib", "lib"),
           Access("t1", "open", "lib/a", "lib/a"),
           Access("t9", "open", "elsewhere", "elsewhere")]  # not a layer of this image
    got = by_layer(acc, {"t1": "sha256:s1", "t2": "sha256:s2"})
    assert got == {"sha256:s1": ["usr/bin/x", "lib/a"], "sha256:s2": ["usr/bin/x.1"]}
    merged = merge(got, {"sha256:s1": ["etc/x", "lib/a"], "sha256:s3": ["y"]})
    assert merged == {"sha256:s1": ["usr/bin/x", "lib/a", "etc/x"],
                      "sha256:s2": ["usr/bin/x.1"], "sha256:s3": ["y"]}


# -- links, layers, platforms (busybox image, seconds) --

@pytest.fixture(scope="module")
def links_image(tmp_path_factory):
    """An index: the host's platform and a foreign one, of busybox + a data layer."""
    top = (TarBuilder().dir("data").dir("etc")
           .file("data/a", b"content of a\n").hardlink("data/b", "data/a")
           .symlink("data/link", "a").file("data/unread", b"never read\n")
           .file("etc/motd", b"top motd\n").bytes())
    base = busybox_layer()          # bin/cat -> busybox
    extra = TarBuilder().file("etc/motd", b"base motd\n").bytes()
    path = str(tmp_path_factory.mktemp("links") / "layout")
    write_layout(path, "v1", [base, extra, top], platforms=[host_arch(), foreign_arch()])
    return f"oci:{path}:v1"


WORKLOAD = ["/bin/cat", "/data/b", "/data/link", "/etc/motd"]


def test_record_follows_links_to_the_serving_layer(podman, links_image, tmp_path):
    notes = []
    recs = record_image(open_endpoint(links_image), entrypoint=WORKLOAD, note=notes.append,
                        workdir=str(tmp_path))
    assert os.listdir(tmp_path) == []                 # mount, podman storage: all gone
    assert str(tmp_path) not in open("/proc/self/mountinfo").read()
    by_platform = {r.platform: r for r in recs}
    skipped = by_platform[f"linux/{foreign_arch()}"]
    assert skipped.skipped and not skipped.by_layer
    assert any(f"linux/{foreign_arch()}" in n and "skipped" in n for n in notes), notes
    rec = by_platform[f"linux/{host_arch()}"]
    assert rec.exit_status == 0, notes
    layout = OCILayout(links_image.split(":")[1])
    index = json.loads(layout.read_blob(layout.find("v1")["digest"]))
    manifest = json.loads(layout.read_blob(index["manifests"][0]["digest"]))
    base, extra, top = (d["digest"] for d in manifest["layers"])
    # the hardlink's content is its target's entry; the symlink followed is listed;
    # etc/motd comes from the top layer only; data/unread is not there
    assert rec.by_layer[top] == ["data/a", "data/link", "etc/motd"]
    assert extra not in rec.by_layer
    assert rec.by_layer[base].index("bin/cat") < rec.by_layer[base].index("bin/busybox")
    assert set(rec.by_layer[base]) <= {"bin/cat", "bin/busybox"} | PODMAN_READS
    assert any(a.op == "stat" for a in rec.accesses)


@pytest.mark.parametrize("how", ["wait-for", "period"])
def test_long_workloads_stop_at_the_ready_line_or_the_period(podman, links_image, how):
    script = "cat /data/b; echo ready; sleep 60; cat /etc/motd"
    # the period runs from "podman run", so it must also cover a container start on a
    # loaded machine before the workload's first read (about 1 s here when idle)
    kw = {"wait_for": "ready", "period": 30.0} if how == "wait-for" else {"period": 10.0}
    notes = []
    started = time.monotonic()
    rec = record_image(open_endpoint(links_image), entrypoint=["/bin/sh", "-c", script],
                       note=notes.append, **kw)[0]
    assert time.monotonic() - started < 40, notes      # not the 60 s sleep
    assert rec.exit_status == "stopped", notes
    assert ["data/a"] in rec.by_layer.values()    # read before the stop; motd never read


def test_convert_optimize_puts_the_recorded_files_first(podman, links_image, tmp_path):
    out = f"oci:{tmp_path}/out:opt"
    res = cli("convert", links_image, out, "--optimize", "--period", "20s",
              "--entrypoint", json.dumps(WORKLOAD))
    assert re.search(rf"record \[linux/{foreign_arch()}\]: skipped", res.stderr)
    assert re.search(rf"record \[linux/{host_arch()}\]: .* exit status 0", res.stderr)
    layout = OCILayout(str(tmp_path / "out"))
    index = json.loads(layout.read_blob(layout.find("opt")["digest"]))
    [mine] = [m for m in index["manifests"] if m["platform"]["architecture"] == host_arch()]
    manifest = json.loads(layout.read_blob(mine["digest"]))
    with FileSource(layout.blob_path(manifest["layers"][-1]["digest"])) as source:
        reader = StargzReader(source)
        _, end = reader.prefetch_range()
        names = [e.name for e in reader.toc.entries if e.type in ("reg", "symlink")]
        prefetched = [e.name for e in reader.toc.entries
                      if e.type == "reg" and e.chunks and e.chunks[-1].end <= end]
    assert names[:3] == ["data/a", "data/link", "etc/motd"]
    assert prefetched == ["data/a", "etc/motd"]         # data/unread after the landmark


# -- the python image: recorded list vs strace, then a start from the prefetch --

@pytest.fixture(scope="module")
def python_image(tmp_path_factory):
    return images.build("python", str(tmp_path_factory.mktemp("pyimg") / "layout"))


@pytest.fixture(scope="module")
def python_recording(podman, python_image):
    notes = []
    [rec] = record_image(open_endpoint(python_image), note=notes.append)
    assert rec.exit_status == 0, notes
    return rec


def _extract(image, root):
    """Unpack every layer of an ``oci:`` image into ``root`` (no whiteouts in it)."""
    layout = OCILayout(image.split(":")[1])
    manifest = json.loads(layout.read_blob(layout.find(image.split(":")[2])["digest"]))
    for desc in manifest["layers"]:
        with tarfile.open(layout.blob_path(desc["digest"])) as tar:
            tar.extractall(root, numeric_owner=True, filter="fully_trusted")


def _resolve(root, path, depth=0):
    """``path`` (absolute, in the image) with every symlink resolved inside ``root``."""
    parts = [p for p in path.split("/") if p]
    done = ""
    while parts:
        part = parts.pop(0)
        if part == "..":
            done = os.path.dirname(done)
            continue
        if part == ".":
            continue
        candidate = f"{done}/{part}"
        full = root + candidate
        if os.path.islink(full):
            assert depth < 40
            target = os.readlink(full)
            base = "" if target.startswith("/") else done
            resolved = _resolve(root, f"{base}/{target}", depth + 1)
            done = resolved[len(root):]
        else:
            done = candidate
    return root + done


def _strace_reads(root, argv):
    """Regular files opened for reading or executed after chroot() (by inode)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (Debian package strace): no independent witness")
    out = os.path.join(os.path.dirname(root), "strace.out")
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,execve,chroot", "-o", out,
                    "chroot", root, *argv], check=True, capture_output=True, env=env, timeout=60)
    inodes, inside = set(), False
    for line in open(out, encoding="utf-8", errors="replace"):
        if re.search(r"chroot\(.*\) = 0", line):
            inside = True
            continue
        if not inside:
            continue
        m = re.search(r'(openat\(AT_FDCWD, |execve\()"([^"]+)"(.*)\) = (-?\d+)', line)
        if not m or int(m.group(4)) < 0:
            continue
        flags = m.group(3)
        if "O_WRONLY" in flags or "O_RDWR" in flags or "O_DIRECTORY" in flags:
            continue
        full = _resolve(root, m.group(2))
        if os.path.isfile(full):
            inodes.add(os.stat(full).st_ino)
        if m.group(1) == "execve(":          # the kernel opens PT_INTERP itself: no openat
            with open(full, "rb") as f:
                data = f.read()
            interp = parse_elf(lambda off, n: data[off:off + n], len(data), full).interp
            if interp:
                inodes.add(os.stat(_resolve(root, interp)).st_ino)
    return inodes


def test_python_recording_matches_strace(python_recording, python_image, tmp_path):
    rec = python_recording
    everything = [p for paths in rec.by_layer.values() for p in paths]
    for wanted in ("usr/lib/python3.11/encodings/__init__.py",
                   "usr/lib/python3.11/encodings/utf_8.py"):
        assert wanted in everything
    assert any(re.fullmatch(r"(usr/)?bin/python3\.11", p) for p in everything)
    assert any(re.search(r"/libc\.so\.6$", p) for p in everything)
    assert "usr/lib/python3.11/json/__init__.py" not in everything   # never imported
    root = str(tmp_path / "root")
    os.mkdir(root)
    _extract(python_image, root)
    witness = _strace_reads(root, HELLO)
    recorded, extra = set(), set()
    for path in everything:
        full = os.path.join(root, path)
        if os.path.islink(full) or not os.path.isfile(full):
            assert os.path.islink(full), f"{path} is neither a file read nor a symlink"
            continue
        ino = os.stat(full).st_ino
        recorded.add(ino)
        if ino not in witness:
            extra.add(path)
    missing = {p for p in witness - recorded}
    assert not missing, f"read under strace but not recorded: {len(missing)} files"
    assert extra <= PODMAN_READS, f"recorded but never read by the workload: {extra}"


def test_optimized_python_image_starts_from_one_prefetch_per_layer(podman, python_image,
                                                                   tmp_path):
    reg = Registry(str(tmp_path))
    proxy = Proxy(reg.host)
    mnt = tmp_path / "mnt"
    try:
        conf = tmp_path / "registries.conf"
        conf.write_text("".join(f'[[registry]]\nlocation = "{h}"\ninsecure = true\n'
                                for h in (reg.host, proxy.host)))
        env = dict(ENV, CONTAINERS_REGISTRIES_CONF=str(conf))
        res = cli("convert", python_image, f"docker://{reg.host}/opt/python:1", "--optimize",
                  "--json", env=env)
        assert "exit status 0" in res.stderr
        layers = [layer["digest"] for layer in json.loads(res.stdout)["layers"]]
        (tmp_path / "auth.json").write_text("{}")
        config = write_config(tmp_path / "config.toml", str(tmp_path / "cache"),
                              str(tmp_path / "plugin.log"), log_calls=False,
                              registry={"insecure": [proxy.host],
                                        "registries_conf": str(conf),
                                        "auth_file": str(tmp_path / "auth.json")})
        mnt.mkdir()
        cli("mount", "--config", config, "--state-dir", str(tmp_path / "state"),
            "--image", f"docker://{proxy.host}/opt/python:1", str(mnt), env=env)
        at_mount = {d: len([g for g in proxy.requests("GET", kind="blob") if d in g[1]])
                    for d in layers}
        # (the CLI reads each footer to check the layer, the plugin its footer and TOC)
        at_mount = {d: len([g for g in proxy.requests("GET", kind="blob") if d in g[1]])
                    for d in layers}
        out = subprocess.run([shutil.which("chroot"), str(mnt), *HELLO], capture_output=True, text=True,
                             timeout=60, env={"PATH": "/usr/bin:/bin"})
        assert out.stdout == "hello\n", out.stderr
        for d in layers:
            gets = [g for g in proxy.requests("GET", kind="blob") if d in g[1]][at_mount[d]:]
            # one more request per layer: the landmark region (prefetch); no on-demand fetch
            assert len(gets) == 1, (d, gets)
            assert gets[0][2].startswith("bytes=0-"), gets
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proxy.stop()
        reg.stop()
