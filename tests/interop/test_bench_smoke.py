"""The format benchmark still runs end to end (tiny sizes; numbers are not checked)."""

import json
import os
import subprocess
import sys

import refgo

ROOT = os.path.dirname(os.path.dirname(refgo.HERE))
BENCH = os.path.join(ROOT, "contrib", "bench", "format_bench.py")


def test_format_bench_smoke(tmp_path, ref):
    # ``ref`` only makes sure the Go reference can be built here (else: skip).
    proc = subprocess.run(
        [sys.executable, BENCH, "--size-mb", "3", "--entries", "3000", "--repeat", "1",
         "--levels", "6", "--workdir", str(tmp_path), "--results", str(tmp_path / "res")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(a) conversion throughput" in proc.stdout
    (result,) = (tmp_path / "res").iterdir()
    data = json.loads(result.read_text())
    assert data["conversion"][0]["go"]["MBps"] > 0
    assert data["conversion"][0]["ours"]["MBps"] > 0
    rows = {row["blob"]: row for row in data["tocOpen"]}
    assert set(rows) == {"ours-built", "go-built"}
    for row in rows.values():
        # both readers see the same paths; ours hides the landmark file
        assert row["go"]["paths"] == row["ours"]["paths"] + 1   # Go lists the landmark
        assert row["tocEntries"] >= 3000
