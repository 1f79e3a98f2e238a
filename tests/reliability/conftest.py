"""Fixtures of the reliability suite: the plugin suite's ``so`` (the plugin .so) and
``mounts`` (mounts that always go away), shared, not copied."""

from ..plugin.conftest import mounts, so  # noqa: F401

__all__ = ["mounts", "so"]
