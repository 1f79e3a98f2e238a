"""Units of the fetch machinery: configuration keys, ranges, streams, pacing, metrics text."""

import os
import threading
import time

import pytest

from stargz_overlay.background import spans
from stargz_overlay.config import Config, ConfigError, finish, load_config, parse_size
from stargz_overlay.fetch_control import (ForegroundGate, HostLimiter, MeteredSource,
                                          RateLimiter, fetch_kind)
from stargz_overlay.metrics import (Metrics, figures_by_layer, read_snapshots, render,
                                    write_files)
from stargz_overlay.source import FileSource


def test_peer_named_config_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("STARGZ_OVERLAY_CONFIG", raising=False)
    path = tmp_path / "c.toml"
    path.write_text('noprefetch = true\nprefetch_size = "2MiB"\nprefetch_timeout_sec = 3\n'
                    'no_background_fetch = true\nmax_concurrency = 4\n'
                    '[blob]\nmax_retries = 4\nfetching_timeout_sec = 30\nmin_wait_msec = 10\n'
                    '[background_fetch]\nsilence_period_msec = 500\nbandwidth_share = 0.25\n'
                    'max_rate_mbit = 50\nconcurrency = 2\nspan_size = "4MiB"\n'
                    '[directory_cache]\nmax_size = "1.5GiB"\ngc_interval_sec = 60\n')
    c = load_config(str(path))
    assert (c.prefetch, c.prefetch_size, c.prefetch_timeout_sec, c.background) == \
        (False, 2 << 20, 3.0, False)
    assert (c.registry.retries, c.registry.deadline, c.registry.backoff) == (5, 30.0, 0.01)
    assert c.background_fetch.span_size == 4 << 20 and c.background_fetch.concurrency == 2
    assert c.directory_cache.max_size == int(1.5 * (1 << 30)) and c.max_concurrency == 4
    d = finish(Config())                                              # the defaults
    assert d.prefetch and d.background and d.directory_cache.max_size == 10 << 30
    assert d.registry.retries == 3 and d.registry.deadline == 120.0
    for text, message in (
            ("prefetch = false", "use noprefetch"),
            ("[registry]\nretries = 2\n[blob]\nmax_retries = 1", "not both"),
            ("[directory_cache]\nmax_size = '10 parsecs'", "size like"),
            ("[directory_cache]\nmax_lru_cache_entry = 5", "unknown key"),
            ("[background_fetch]\nbandwidth_share = 2.0", "bandwidth_share"),
            ("[background_fetch]\nconcurrency = 0", "at least 1"),
            ("[blob]\nmax_retries = -1", "at least")):
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_config(str(path))
        assert message in str(exc.value), text
    path.write_text("[registry]\nretries = 2\ndeadline = 9.0\n")     # the older spelling
    c = load_config(str(path))
    assert c.registry.retries == 2 and c.registry.deadline == 9.0
    assert parse_size("16MiB") == 16 << 20 and parse_size(7) == 7 and parse_size("1kb") == 1000


class _Entry:
    def __init__(self, start, end):
        class C:
            pass
        a, b = C(), C()
        a.offset, b.end = start, end
        self.chunks = [a, b]


def test_spans_coalesce_up_to_the_span_size():
    entries = [_Entry(0, 100), _Entry(100, 300), _Entry(400, 500), _Entry(2000, 2100),
               _Entry(2100, 5000)]
    out = spans(entries, span_size=1000, max_gap=200)
    assert [(s, e, len(g)) for s, e, g in out] == [(0, 500, 3), (2000, 2100, 1),
                                                   (2100, 5000, 1)]


def _metered(tmp_path, data):
    path = tmp_path / "blob"
    path.write_bytes(data)
    metrics = Metrics()
    metrics.layer("L", blob_size=len(data))
    return MeteredSource(FileSource(str(path)), "L", "L", metrics, HostLimiter(2)), metrics


def test_stream_hands_out_bytes_forward_only(tmp_path):
    data = os.urandom(3 << 20)
    src, metrics = _metered(tmp_path, data)
    with fetch_kind("prefetch"), src.stream(1000, 3 << 20) as stream:
        assert stream.read_at(1000, 10) == data[1000:1010]
        assert stream.read_at(500_000, 100_000) == data[500_000:600_000]
        with pytest.raises(Exception):
            stream.read_at(1000, 10)                  # already handed out
        stream.drain()
    assert metrics.layers["L"].fetched["prefetch"] == (3 << 20) - 1000
    assert metrics.layers["L"].requests["prefetch"] == 1
    src.read_at(0, 10)
    assert metrics.layers["L"].fetched["on_demand"] == 10


def test_host_limiter_puts_foreground_first():
    limiter = HostLimiter(2)
    order = []
    held = limiter.slot("h")
    held.__enter__()
    with limiter.slot("h", background=False):
        pass                                           # second slot is free
    bg_done = threading.Event()

    def background():
        with limiter.slot("h", background=True):      # one slot stays for foreground
            order.append("bg")
        bg_done.set()

    t = threading.Thread(target=background)
    t.start()
    time.sleep(0.1)
    assert not bg_done.is_set()
    with limiter.slot("h"):
        order.append("fg")
    held.__exit__(None, None, None)
    t.join(5)
    assert order == ["fg", "bg"]


def test_gate_waits_for_quiet_and_rate_limiter_paces():
    # "at once" below is under 0.15 s: well short of the 0.2 s silence a wrong wait
    # takes, with room for a thread descheduled on a loaded machine
    gate = ForegroundGate(0.2)
    time.sleep(0.25)
    assert gate.wait_quiet() < 0.15
    busy = gate.busy()
    busy.__enter__()
    threading.Timer(0.3, busy.__exit__, (None, None, None)).start()
    started = time.monotonic()
    gate.wait_quiet()
    assert time.monotonic() - started >= 0.45           # the open, then the silence
    with gate.busy("sha256:x"):      # an open waits for what the background is fetching:
        started = time.monotonic()   # that fetch must not pause (they would deadlock)
        assert gate.wait_quiet(producing="sha256:x") < 0.15
        assert time.monotonic() - started < 0.15
    limiter = RateLimiter(lambda: 1_000_000, burst=100_000)
    started = time.monotonic()
    for _ in range(6):
        limiter.consume(100_000)
    assert 0.4 <= time.monotonic() - started < 1.0
    assert RateLimiter(lambda: 0).consume(10 << 20) == 0


def test_metrics_text_and_files(tmp_path):
    m = Metrics()
    stats = m.layer("sha256:aa", ref="r/x:1", blob_size=1000)
    stats.files, stats.file_bytes, stats.local_bytes = 3, 4000, 1000
    m.fetched("sha256:aa", "prefetch", 300, requests=1)
    m.fetched("sha256:aa", "on_demand", 100, requests=2)
    m.observe("fetch_request_seconds", 0.02, kind="prefetch")
    m.inc("cache_hits_total", layer="sha256:aa")
    write_files(str(tmp_path), m.snapshot())
    [snap] = read_snapshots(str(tmp_path))
    text = render([snap])
    pid = os.getpid()
    assert f'stargz_overlay_fetched_bytes_total{{kind="prefetch",layer="sha256:aa",' \
           f'pid="{pid}"}} 300' in text
    assert f'stargz_overlay_fetch_request_seconds_bucket{{kind="prefetch",le="0.025",' \
           f'pid="{pid}"}} 1' in text
    assert f'stargz_overlay_layer_local_ratio{{layer="sha256:aa",pid="{pid}"}} 0.25' in text
    assert f'stargz_overlay_bytes_saved{{pid="{pid}"}} 600' in text
    assert text.count("# TYPE stargz_overlay_fetched_bytes_total counter") == 1
    fig = figures_by_layer([snap, dict(snap, pid=pid + 1)])["sha256:aa"]   # two daemons
    assert (fig["local_ratio"], fig["mounts"], fig["fetched"]["on_demand"]) == (0.25, 2, 200)
    assert fig["requests"]["prefetch"] == 2 and fig["bytes_saved"] == 200
    snap["start_ticks"] = -1                             # a daemon that is gone
    write_files(str(tmp_path), snap)
    assert read_snapshots(str(tmp_path), clean=True) == [] and os.listdir(tmp_path) == []
