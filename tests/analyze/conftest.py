"""The test image (built once per session from this machine's python3.11)."""

import pytest

from .imagebuilder import build_layers, write_image


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """``(lower tar, upper tar, info)``; info has the host interpreter's real imports."""
    return build_layers(str(tmp_path_factory.mktemp("analyze-build")))


@pytest.fixture(scope="session")
def image(built, tmp_path_factory):
    """``(oci:DIR:TAG, [layer digests])`` of the two-layer gzip image."""
    low, up, _ = built
    return write_image(str(tmp_path_factory.mktemp("analyze-image")), "v1", [low, up])
