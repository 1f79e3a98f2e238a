"""Fixtures for the recording tests: root, FUSE, the plugin and podman (or a printed skip)."""

import os
import shutil
import sys

import pytest

from ..plugin.fusehelp import plugin_so, require_fuse


@pytest.fixture(scope="session")
def so():
    require_fuse()
    return plugin_so()


@pytest.fixture(scope="session")
def podman(so):
    """Recording runs the workload with the real podman (runc, private storage)."""
    missing = [name for name in ("podman", "runc") if shutil.which(name) is None]
    if missing:
        msg = f"recording tests need {' and '.join(missing)} (Debian packages podman, runc)"
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    assert os.geteuid() == 0          # require_fuse() skipped otherwise
