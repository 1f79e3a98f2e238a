"""The benchmark suite (contrib/bench/run) runs end to end and leaves nothing behind.

One sample per mode of the small python image over a lightly shaped link: the
figures are not checked for speed (benchmarks are not timed tests), only for
being real measurements: the legacy pull moves the whole gzip image, a lazy
start moves a fraction, bytes needed come from the files the workload opened,
and no mount, registry or podman process of the run, nor any record of its
layer stores, survives it.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from stargz_overlay.store import index_path

from ..plugin.fusehelp import REPO, plugin_so, require_fuse

SUITE = os.path.join(REPO, "contrib", "bench", "run")


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def _store_records_since(started):
    """The ``stargz-overlay store`` records (kept outside the suite's tree) of stores
    under a bench-suite- tree that were started since ``started``."""
    stores = os.path.dirname(index_path("/"))
    found = []
    for name in os.listdir(stores) if os.path.isdir(stores) else ():
        try:
            with open(os.path.join(stores, name), encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if "bench-suite-" in doc.get("mountpoint", "") and doc.get("started", 0) >= started:
            found.append(doc["mountpoint"])
    return found


def test_suite_measures_and_cleans_up(tmp_path):
    require_fuse()
    for tool in ("podman", "skopeo", "docker-registry"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            pytest.skip(f"the benchmark suite needs {tool}")
    plugin_so(os.path.join(REPO, "plugin", "stargz_overlay"))   # the suite runs the tree
    out = tmp_path / "results"
    started = time.time()
    res = subprocess.run([SUITE, "--images", "python", "--samples", "1", "--rtt-ms", "2",
                          "--mbit", "800", "--deadline-min", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "shaped link" in res.stdout and "measured" in res.stdout
    [doc] = [p for p in out.iterdir() if p.suffix == ".json"]
    results = json.loads(doc.read_text())
    assert not results["notes"], results["notes"]
    runs = results["samples"]["python"]
    legacy, lazy, opt = runs["legacy"][0], runs["lazy"][0], runs["lazy-opt"][0]
    gzip_bytes = results["image_bytes"]["python"]["legacy"]
    assert legacy["link_bytes"] >= gzip_bytes
    for row in (lazy, opt):
        assert 0 < row["link_bytes"] < gzip_bytes / 2
        assert row["requests"] > legacy["requests"]      # range requests, not blobs
    needed = results["needed"]["python"]
    assert needed["files_opened"] >= 5 and 0 < needed["bytes"] <= lazy["link_bytes"]
    table = results["table"]["python"]
    assert table["lazy"]["x_legacy"] == pytest.approx(lazy["total_s"] / legacy["total_s"])
    assert 0.9 <= table["lazy"]["bytes_x_needed"] <= 1.5
    assert "lazy bytes <= 1.3x (files read + TOCs)" in results["targets"]
    text = next(p for p in out.iterdir() if p.suffix == ".txt").read_text()
    assert "python      lazy-opt" in text and "target" in text
    # nothing left: the suite's temporary tree is gone with its mounts and servers
    with open("/proc/mounts", encoding="utf-8") as f:
        assert "bench-suite-" not in f.read()
    assert not _processes_mentioning("bench-suite-")
    assert not _store_records_since(started)
