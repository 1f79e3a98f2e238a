"""Files the container engine reads from the image before the command starts:
podman/runc resolve the user and groups from the image's /etc/passwd and
/etc/group, so they belong to the startup set (else each is an on-demand fetch)."""

import os
import sys

from stargz_overlay.analyze import analyze_image
from stargz_overlay.image_convert import open_endpoint

from ..plugin.fusehelp import REPO

sys.path.insert(0, os.path.join(REPO, "contrib"))
import images  # noqa: E402

REASON = "read by the container engine (user and groups) before the command starts"


def test_passwd_and_group_are_in_the_startup_set(tmp_path):
    spec = images.build("python", str(tmp_path / "layout"))
    [res] = analyze_image(open_endpoint(spec), note=lambda text: None)
    reasons = {f.path: f.reason for f in res.files if f.kind == "file"}
    assert reasons["/etc/passwd"] == REASON and reasons["/etc/group"] == REASON
    assert "/usr/bin/python3.11" in reasons          # the command's own files as before


def test_not_without_a_command(tmp_path):
    spec = images.build("python", str(tmp_path / "layout"))
    [res] = analyze_image(open_endpoint(spec), note=lambda text: None, entrypoint=[],
                          args=[])
    assert not res.files
