"""Fixtures for the plugin tests: the built .so, a config, mounts that always unmount."""

import os

import pytest

from .fusehelp import Mount, plugin_so, require_fuse, write_config


@pytest.fixture(scope="session")
def so():
    require_fuse()
    return plugin_so()


@pytest.fixture
def config(tmp_path):
    """Path of a config.toml with a private cache and a debug log (``<tmp>/plugin.log``)."""
    return write_config(tmp_path / "config.toml", str(tmp_path / "cache"),
                        str(tmp_path / "plugin.log"))


@pytest.fixture
def mounts():
    """Factory of Mount objects; every one is unmounted (and its daemon reaped) at teardown."""
    made = []

    def make(*args, **kw):
        m = Mount(*args, **kw)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        m.unmount()


def read_log(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def blob_reads(log_text):
    """(offset, length) of every logged blob read."""
    out = []
    for line in log_text.splitlines():
        if " blob-read " in line:
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            out.append((int(fields["offset"]), int(fields["length"])))
    return out


@pytest.fixture
def log_of(tmp_path):
    return lambda: read_log(os.path.join(tmp_path, "plugin.log"))
