"""Fixtures of the reliability suite: the plugin .so, mounts that always go away."""

import pytest

from ..plugin.fusehelp import Mount, plugin_so, require_fuse


@pytest.fixture(scope="session")
def so():
    require_fuse()
    return plugin_so()


@pytest.fixture
def mounts():
    """Factory of Mount objects; each is unmounted and its daemon reaped (or killed)."""
    made = []

    def make(*args, **kw):
        m = Mount(*args, **kw)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        m.unmount()
