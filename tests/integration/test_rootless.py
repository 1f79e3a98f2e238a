"""Rootless Podman with the store, as a real unprivileged user.

The test creates (once) the user ``szrootless`` with subordinate uids, installs
this checkout for Debian's ``/usr/bin/python3`` in a virtualenv in its home
(no network: ``--system-site-packages`` for cffi/setuptools, the pure-Python
requests stack copied from this interpreter), then, as that user: starts the
store under ``$XDG_RUNTIME_DIR``, writes ``~/.config/containers/storage.conf``
and runs ``podman pull`` + ``podman run`` of an eStargz image.

Unprivileged FUSE needs ``/dev/fuse`` to be usable by everyone (mode 0666, as
Debian ships it); if it is not, the test opens it up for its duration and puts
the original mode back.
"""

import importlib
import os
import pwd
import shutil
import stat
import subprocess
import sys

import pytest

from .conftest import busybox_tar, estargz, push
from ..imagefixture import tar_layer
from ..registryfixture import Registry

USER = "szrootless"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_PYTHON = "/usr/bin/python3"
PURE_DEPS = ("requests", "urllib3", "idna", "charset_normalizer", "certifi")


def skip(reason):
    print(f"rootless test skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


def requirements():
    if os.geteuid() != 0:
        skip("needs root to create the test user")
    for tool in ("useradd", "runuser", "newuidmap", "newgidmap", "podman", "runc",
                 "fuse-overlayfs", "fusermount3", "gcc"):
        if shutil.which(tool) is None:
            skip(f"{tool} is not installed")
    if not os.stat(shutil.which("fusermount3")).st_mode & stat.S_ISUID:
        skip("fusermount3 is not setuid root")
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import venv, setuptools, cffi, sysconfig, os;"
                            "print(os.path.exists(sysconfig.get_paths()['include'] +"
                            "'/Python.h'))"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != "True":
        skip(f"{SYSTEM_PYTHON} lacks venv, setuptools, cffi or its headers (Debian packages "
             f"python3-venv python3-setuptools python3-cffi python3-dev)")


def as_user(home, uid, *argv, timeout=180, check=True, env=None):
    runtime = f"/run/user/{uid}"
    base = {"HOME": home, "USER": USER, "LOGNAME": USER, "XDG_RUNTIME_DIR": runtime,
            "PATH": f"{home}/venv/bin:/usr/local/bin:/usr/bin:/bin"}
    base.update(env or {})
    res = subprocess.run(["runuser", "-u", USER, "--", "env", "-i",
                          *[f"{k}={v}" for k, v in base.items()], *argv], cwd=home,
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} as {USER} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def user():
    requirements()
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", USER], check=True)
    pw = pwd.getpwnam(USER)
    with open("/etc/subuid") as f:
        if not any(line.startswith(f"{USER}:") for line in f):
            skip("useradd gave the test user no subordinate uids (/etc/subuid)")
    home, uid = pw.pw_dir, pw.pw_uid
    runtime = f"/run/user/{uid}"
    os.makedirs(runtime, exist_ok=True)
    os.chown(runtime, uid, pw.pw_gid)
    os.chmod(runtime, 0o700)
    # this checkout, installed for the system python in ~/venv
    src = os.path.join(home, "src")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(os.path.join(src, "plugin"))
    for name in ("setup.py", "pyproject.toml", "README.rst"):
        shutil.copy(os.path.join(REPO, name), src)
    shutil.copytree(os.path.join(REPO, "cstub"), os.path.join(src, "cstub"))
    shutil.copytree(os.path.join(REPO, "plugin", "stargz_overlay"),
                    os.path.join(src, "plugin", "stargz_overlay"),
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    subprocess.run(["chown", "-R", f"{USER}:", src], check=True)
    if not os.path.exists(os.path.join(home, "venv", "bin", "python")):
        as_user(home, uid, SYSTEM_PYTHON, "-m", "venv", "--system-site-packages",
                f"{home}/venv")
    site = as_user(home, uid, f"{home}/venv/bin/python", "-c",
                   "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    for name in PURE_DEPS:
        module = importlib.import_module(name)
        target = os.path.join(site, name)
        if not os.path.exists(target):
            shutil.copytree(os.path.dirname(module.__file__), target,
                            ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chown", "-R", f"{USER}:", os.path.join(home, "venv")], check=True)
    as_user(home, uid, f"{home}/venv/bin/python", "-m", "pip", "install", "-q", "--no-index",
            "--no-deps", "--no-build-isolation", "--force-reinstall", src, timeout=600)
    # unprivileged FUSE
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o006 != 0o006:
        print(f"rootless test: /dev/fuse is {mode:o}; 0666 for the test", file=sys.stderr)
        os.chmod("/dev/fuse", 0o666)
    try:
        yield home, uid
    finally:
        os.chmod("/dev/fuse", mode)


def test_rootless_podman_pulls_and_runs_lazily(tmp_path, user):
    home, uid = user
    runtime = f"/run/user/{uid}"
    mnt = f"{runtime}/stargz-overlay/als"
    P = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend",
         "none"]
    with Registry(str(tmp_path)) as reg:
        app = estargz(tar_layer({"app": ("dir",), "app/hello.txt": b"hello rootless\n",
                                 "app/big.bin": os.urandom(400_000)}))
        ref = push(reg.host, "rootless/app:1", [estargz(busybox_tar()), app])
        conf = os.path.join(home, ".config", "containers")
        state = os.path.join(home, ".local", "share", "stargz-overlay", "store")
        as_user(home, uid, "mkdir", "-p", conf, state)
        as_user(home, uid, "sh", "-c",
                f"printf '[[registry]]\\nlocation = \"{reg.host}\"\\ninsecure = true\\n' "
                f"> {conf}/registries.conf && printf '[storage]\\ndriver = \"overlay\"\\n"
                f"[storage.options]\\nadditionallayerstores = [\"{mnt}/store:ref\"]\\n"
                f"[storage.options.overlay]\\nmount_program = "
                f"\"{home}/venv/bin/stargz-overlay-mount\"\\n' > {conf}/storage.conf")
        # the store writes a user configuration (cache under ~/.cache); point it at the
        # registries.conf that marks the test registry insecure.  No background fetch:
        # the check that big.bin was never fetched would race with it (it starts 2 s
        # after the last foreground fetch, and a container's teardown can take longer
        # on a loaded machine)
        as_user(home, uid, "rm", "-f", f"{state}/config.toml")
        as_user(home, uid, "stargz-overlay", "store", "--dry-run", mnt)
        as_user(home, uid, "sh", "-c", f"printf 'no_background_fetch = true\\n[registry]\\n"
                                       f"registries_conf = \"{conf}/registries.conf\"\\n' "
                                       f">> {state}/config.toml")
        try:
            as_user(home, uid, "stargz-overlay", "store", mnt)
            as_user(home, uid, *P, "pull", "-q", ref)
            out = as_user(home, uid, *P, "run", "--name", "rootless1", "--network", "none",
                          ref, "sh", "-c", "cat /app/hello.txt; ls -ln /app/hello.txt; "
                                           "mount | grep ' / '")
            lines = out.stdout.splitlines()
            assert lines[0] == "hello rootless"
            assert lines[1].split()[2:4] == ["0", "0"]          # root inside the userns
            assert "fuse-overlayfs" in lines[2]
            as_user(home, uid, *P, "rm", "rootless1")
            status = as_user(home, uid, "stargz-overlay", "status", "--json").stdout
            import json
            report = json.loads(status)
            rows = {r["digest"]: r for img in report["images"] for r in img["layers"]}
            assert rows[app.digest]["mode"] == "lazy"
            assert rows[app.digest]["local_ratio"] < 0.01      # big.bin never fetched
        finally:
            as_user(home, uid, *P, "rm", "-af", check=False)
            as_user(home, uid, *P, "system", "reset", "-f", check=False)
            as_user(home, uid, "stargz-overlay", "store", "--unmount", mnt, check=False)
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
