"""Fixtures for the interoperability tests against the reference estargz library."""

import pytest

import refgo


@pytest.fixture(scope="session")
def ref(tmp_path_factory):
    """A RefTool for the Go reference driver, compiled once per test session."""
    try:
        binary = refgo.build_tool(str(tmp_path_factory.mktemp("refestargz")))
    except refgo.Unavailable as exc:
        pytest.skip(f"reference estargz tool unavailable: {exc}")
    return refgo.RefTool(binary)
