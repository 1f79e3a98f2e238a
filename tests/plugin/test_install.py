"""The plugin .so built by pip loads in stock fuse-overlayfs from a virtualenv,
with no environment variables, for a regular and an editable install."""

import os
import shutil
import subprocess
import sys

import pytest

from .fusehelp import REPO, Mount, blob_spec, plugin_lower, write_config
from .layers import build_layer
from ..format.tarbuild import TarBuilder

PROJECT_FILES = ("setup.py", "pyproject.toml", "README.rst", "MANIFEST.in")


def copy_project(dest):
    os.makedirs(dest)
    for name in PROJECT_FILES:
        if os.path.exists(os.path.join(REPO, name)):
            shutil.copy(os.path.join(REPO, name), dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    shutil.copytree(os.path.join(REPO, "plugin"), os.path.join(dest, "plugin"), ignore=ignore)
    shutil.copytree(os.path.join(REPO, "cstub"), os.path.join(dest, "cstub"), ignore=ignore)


def run(*cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


@pytest.mark.parametrize("editable", [False, True])
def test_venv_install_loads_without_env(tmp_path, so, editable):
    project = str(tmp_path / "project")
    copy_project(project)
    venv = str(tmp_path / "venv")
    run(sys.executable, "-m", "venv", "--system-site-packages", venv)
    args = [f"{venv}/bin/pip", "install", "-q", "--no-deps"]
    r = subprocess.run([*args, *(["-e", project] if editable else [project])],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and ("No matching distribution" in r.stderr
                              or "Could not find a version" in r.stderr):
        msg = "pip cannot fetch the build requirements (setuptools, cffi) from its index"
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    assert r.returncode == 0, r.stderr[-3000:]
    plugin = run(f"{venv}/bin/stargz-overlay", "plugin-path").strip()
    expected_pkg = (os.path.join(project, "plugin", "stargz_overlay") if editable else
                    os.path.join(venv, "lib"))
    assert plugin.startswith(expected_pkg)

    b = TarBuilder()
    b.file("hello", b"from the venv\n")
    layer = build_layer(str(tmp_path), "v", b)
    config = write_config(tmp_path / "c.toml", str(tmp_path / "cache"), str(tmp_path / "p.log"))
    m = Mount(str(tmp_path / "mnt"), [plugin_lower(blob_spec(layer.blob, config),
                                                   tmp_path / "l")], so=plugin)
    cmd = m.command()
    os.makedirs(m.mnt)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/",
                           env={"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        from .fusehelp import _daemon_pids
        m.pids = _daemon_pids(m.mnt)
        assert open(os.path.join(m.mnt, "hello"), "rb").read() == b"from the venv\n"
    finally:
        m.unmount()
    loaded = [l for l in open(tmp_path / "p.log") if " loaded in pid " in l][0]
    assert f"package {os.path.dirname(plugin)}," in loaded
