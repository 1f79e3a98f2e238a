"""Hostile layers through the plugin mount and through the CLI.

Each case of ``cases.CASES`` is a hand-made blob.  Through a real
fuse-overlayfs mount it must be refused with one clear line (no mount), or be
served: the hostile files fail with the expected errno or read back exactly,
``good`` still reads, and the fuse-overlayfs daemon is still alive.  Nothing
may change under the test's root except the cache, the layer directory, the
log and the mount's own directories; nothing named after ``MARKER`` may appear
anywhere.  Through the CLI (``ls``, ``verify``, ``cat``) the same case gives
exit 0 or one ``stargz-overlay: error:`` line, never a traceback, never bytes
that do not match the TOC.  Where a case sets a memory limit, the peak RSS of
the process that loads the TOC is measured.
"""

import errno
import os
import re
import subprocess
import time

import pytest

from stargz_overlay import cli

from ..plugin.fusehelp import _daemon_pids, blob_spec, plugin_lower
from .cases import CASES, DEEP, LONGEST, MARKER, build, matches
from .helpers import alive, cli as run_cli, diff_states, find_marker, measured, \
    check_cache, plugin_config, proc_status, tree_state

MOUNT_TIME_LIMIT = 60      # seconds, even for the slowest refused TOC
OUR_LINE = re.compile(r"^stargz-overlay: ")


def open_rel(root, rel, flags=os.O_RDONLY):
    """Open ``root/rel`` one directory at a time (paths may exceed PATH_MAX)."""
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


def read_rel(root, rel):
    fd = open_rel(root, rel)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def zeros_ok(root, rel, size):
    """Stream the file: all zero bytes, ``size`` of them."""
    fd = open_rel(root, rel)
    total = 0
    with os.fdopen(fd, "rb") as f:
        while True:
            block = f.read(8 << 20)
            if not block:
                break
            if block.strip(b"\0"):
                return False
            total += len(block)
    return total == size


def one_error_line(stderr, needle):
    ours = [line for line in stderr.splitlines() if OUR_LINE.match(line)]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(ours) == 1, stderr[-2000:]
    assert needle in ours[0], ours[0]
    return ours[0]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_layer_through_the_plugin(case, tmp_path, so, mounts):
    blob = build(case, str(tmp_path / "layer.blob"))
    config, paths = plugin_config(tmp_path)
    cache, layer_dir = paths["cache"], tmp_path / "l"
    mnt, up, wk = tmp_path / "mnt", tmp_path / "up", tmp_path / "wk"
    allowed = [cache, paths["log"], paths["metrics"], layer_dir, mnt, up, wk]
    for d in (mnt, up, wk):
        d.mkdir()
    before = tree_state(tmp_path, allowed)
    m = mounts(mnt, [plugin_lower(blob_spec(blob, config, toc=case.toc), layer_dir)], up, wk,
               so=so)
    started = time.monotonic()
    rc, _, stderr, peak = measured(m.command(), timeout=MOUNT_TIME_LIMIT + 30)
    elapsed = time.monotonic() - started
    if rc == 0:
        m.pids = _daemon_pids(str(mnt))
    assert elapsed < MOUNT_TIME_LIMIT
    if case.rss_limit_mb:
        assert peak < case.rss_limit_mb, f"fuse-overlayfs peaked at {peak:.0f} MiB"
    try:
        if case.refused:
            assert rc != 0 and not m.mounted, "a hostile layer was mounted"
            one_error_line(stderr, case.refused)
        else:
            assert rc == 0, stderr
            check_served(case, str(mnt), m)
    finally:
        m.unmount()
    assert diff_states(before, tree_state(tmp_path, allowed)) == []
    assert find_marker(MARKER) == []
    assert find_marker(MARKER, roots=[str(tmp_path.parent)]) == []
    if os.path.exists(cache):
        assert check_cache(cache) == []


def check_served(case, mnt, m):
    assert len(m.pids) == 1
    pid = m.pids[0]
    if case.id == "deep-dirs":
        # the deepest directory first, by one path: its 1500 parents are materialised at once
        assert os.listdir(os.path.join(mnt, os.path.dirname(DEEP))) == ["bottom"]
    listing = subprocess.run(["find", mnt], capture_output=True, timeout=60)
    assert listing.returncode == 0, listing.stderr[-500:]
    for rel, want in case.expect.items():
        if isinstance(want, int):
            with pytest.raises(OSError) as exc:
                read_rel(mnt, rel)
            assert exc.value.errno == want, (rel, exc.value)
        elif isinstance(want, tuple):
            rss_before = proc_status(pid, "VmRSS")
            assert zeros_ok(mnt, rel, want[1]), rel
            growth = (proc_status(pid, "VmHWM") - rss_before) / 1024
            assert growth < 96, f"fuse-overlayfs grew by {growth:.0f} MiB serving {rel}"
        else:
            assert read_rel(mnt, rel) == want, rel
    if case.id == "symlink-loops":
        assert os.readlink(os.path.join(mnt, "up")) == "../../../../../../etc/passwd"
        assert os.readlink(os.path.join(mnt, "abs")) == "/etc/shadow"
    if case.id == "deep-dirs":
        assert read_rel(mnt, DEEP) == b"A" * 3000
    assert read_rel(mnt, "good") == case.expect["good"]
    assert alive(pid), "fuse-overlayfs died"
    assert os.path.ismount(mnt)


# -- the CLI ---------------------------------------------------------------------

def cli_in_process(capsysbinary, *argv):
    rc = cli.main(list(argv))
    out, err = capsysbinary.readouterr()
    return rc, out, err.decode("utf-8", "replace")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_layer_through_the_cli(case, tmp_path, capsysbinary):
    blob = build(case, str(tmp_path / "layer.blob"))
    toc = ["--toc-digest", case.toc] if case.toc else []
    before = tree_state(tmp_path)
    if case.rss_limit_mb:      # in a child process, to measure its memory
        rc, out, err, peak = run_cli("ls", blob, *toc)
        assert peak < case.rss_limit_mb, f"the CLI peaked at {peak:.0f} MiB"
    else:
        rc, out, err = cli_in_process(capsysbinary, "ls", blob, *toc)
    if case.refused:
        assert rc == 1 and out == b""
        one_error_line(err, case.refused)
        return
    assert rc == 0, err
    rc, out, err = cli_in_process(capsysbinary, "verify", blob, *toc)
    bad = [rel for rel, want in case.expect.items() if isinstance(want, int) and want == errno.EIO]
    if bad:
        assert rc == 1
        one_error_line(err, "")
    else:
        assert rc == 0, err
    for rel, want in case.expect.items():
        if isinstance(want, tuple):
            continue      # the zero bombs: checked through the mount, bounded there
        rc, out, err = cli_in_process(capsysbinary, "cat", blob, *toc, rel)
        if isinstance(want, int):
            assert rc == 1 and out == b"", (rel, rc, out[:100])
            one_error_line(err, "")
        else:
            assert rc == 0 and matches(want, out), (rel, err)
    assert diff_states(before, tree_state(tmp_path)) == []
    assert find_marker(MARKER) == []


@pytest.mark.parametrize("case", [c for c in CASES if c.id.startswith("data-")], ids=str)
def test_gzip_bombs_stream_through_cat_with_bounded_memory(case, tmp_path):
    """``cat`` of the zero bombs: the verified bytes stream out, memory stays flat."""
    blob = build(case, str(tmp_path / "layer.blob"))
    rc, out, err, peak = run_cli("cat", blob, "zeros")
    want = case.expect["zeros"]
    if isinstance(want, int):
        assert rc == 1 and out == b""
        one_error_line(err, "digest")
    else:
        assert rc == 0, err
        assert matches(want, out)
    assert peak < 160, f"the CLI peaked at {peak:.0f} MiB"


def test_a_deep_layer_directory_is_reset_by_the_next_mount(tmp_path, so, mounts):
    """A skeleton 1500 directories deep is removed at unmount and at the next load.

    (It once was left behind by a RecursionError, and the next mount of that
    layer directory then failed.)
    """
    case = next(c for c in CASES if c.id == "deep-dirs")
    blob = build(case, str(tmp_path / "layer.blob"))
    config, _ = plugin_config(tmp_path)
    layer_dir = tmp_path / "l"
    for attempt in range(2):
        m = mounts(tmp_path / f"mnt{attempt}", [plugin_lower(blob_spec(blob, config), layer_dir)],
                   so=so)
        m.mount()
        assert os.listdir(os.path.join(m.mnt, os.path.dirname(DEEP))) == ["bottom"]
        assert read_rel(m.mnt, "good") == case.expect["good"]
        if attempt == 0:
            os.kill(m.pids[0], 9)          # no cleanup at all: the next load must cope
            m.unmount()
        else:
            m.unmount()
            assert sorted(os.listdir(layer_dir)) == [".lock"]


def test_a_path_of_4095_bytes_is_served(tmp_path, so, mounts):
    case = next(c for c in CASES if c.id == "longest-legal-names")
    blob = build(case, str(tmp_path / "layer.blob"))
    config, _ = plugin_config(tmp_path)
    m = mounts(tmp_path / "mnt", [plugin_lower(blob_spec(blob, config), tmp_path / "l")], so=so)
    m.mount()
    try:
        assert read_rel(m.mnt, LONGEST) == b"B" * 5000
    finally:
        assert read_rel(m.mnt, "good") == case.expect["good"]
