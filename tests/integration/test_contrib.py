"""contrib/podman: storage.conf snippets, the CRI-O drop-in and the systemd units.

CRI-O is not packaged for Debian 12, so its drop-in is checked for TOML syntax
and keys, and its exact driver options are then handed to podman
(``--storage-opt``), which parses them with the same containers/storage code.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from .conftest import StoreEnv, busybox_tar, estargz, push

CONTRIB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "contrib", "podman")


def load(name):
    with open(os.path.join(CONTRIB, name), "rb") as f:
        return tomllib.load(f)


def test_storage_conf_snippets():
    for name in ("storage.conf", "storage-rootless.conf"):
        conf = load(name)
        assert conf["storage"]["driver"] == "overlay"
        (als,) = conf["storage"]["options"]["additionallayerstores"]
        assert als.endswith("/store:ref")
        assert conf["storage"]["options"]["overlay"]["mount_program"].endswith(
            "/stargz-overlay-mount")
    assert load("storage-rootless.conf")["storage"]["options"][
        "additionallayerstores"][0].startswith("/run/user/")


def crio_options():
    conf = load("crio.conf.d/10-stargz-overlay.conf")
    assert set(conf) == {"crio"}
    assert conf["crio"]["storage_driver"] == "overlay"
    options = conf["crio"]["storage_option"]
    assert all(isinstance(o, str) and re.match(r"^overlay\.[a-z_]+=", o) for o in options)
    keys = {o.split("=", 1)[0] for o in options}
    assert keys == {"overlay.mount_program", "overlay.additionallayerstore"}
    return options


def test_crio_dropin_is_valid_toml_with_the_storage_options():
    crio_options()


def test_crio_storage_options_work_in_containers_storage(tmp_path_factory):
    """The drop-in's option strings, with this test's paths, drive a lazy pull and run."""
    env = StoreEnv(tmp_path_factory.mktemp("crio"))
    try:
        env.start_store()
        opts = []
        for opt in crio_options():
            key, value = opt.split("=", 1)
            if key == "overlay.mount_program":
                value = env.mount_program
            else:
                value = f"{env.mnt}/store:ref"
            opts += ["--storage-opt", f"{key}={value}"]
        with open(env.podman.conf, "w") as f:      # driver options only from the flags
            f.write(f'[storage]\ndriver = "overlay"\ngraphroot = "{env.podman.dir}/graph"\n'
                    f'runroot = "{env.podman.dir}/run"\n')
        layer = estargz(busybox_tar())
        ref = push(env.registry.host, "crio/app:1", [layer]).replace(env.registry.host,
                                                                      env.host, 1)
        mark = env.mark()
        env.podman("--storage-driver", "overlay", *opts, "pull", "-q", ref)
        assert env.layer_gets(layer, mark)[0] == 0
        # a named container removed afterwards, not --rm: under load Podman 4.3.1
        # sometimes loses the exit code of a --rm container that exits at once
        out = env.podman("--storage-driver", "overlay", *opts, "run", "--name", "crio1",
                         "--network", "none", "--ulimit", "nofile=1024:1024", "--ulimit",
                         "nproc=1024:1024", ref, "cat", "/etc/passwd")
        assert out.stdout.startswith("root:x:0:0")
        env.podman("--storage-driver", "overlay", *opts, "rm", "crio1")
        env.podman("--storage-driver", "overlay", *opts, "rmi", "-a")
    finally:
        env.close()


@pytest.mark.parametrize("unit", ["stargz-overlay-store.service",
                                  "stargz-overlay-store.user.service"])
def test_systemd_units(tmp_path, unit):
    with open(os.path.join(CONTRIB, unit)) as f:
        text = f.read()
    assert "Type=notify" in text and "--foreground" in text
    assert re.search(r"^Before=.*podman\.service", text, re.M)
    if "user" not in unit:
        assert re.search(r"^Before=.*crio\.service", text, re.M)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; unit files checked as text only")
    # point the commands at binaries that exist here, then let systemd check the rest
    text = re.sub(r"(ExecStart=)\S+", rf"\g<1>{sys.executable}", text)
    text = text.replace("/usr/bin/fusermount3", shutil.which("fusermount3") or "/bin/true")
    path = tmp_path / unit.replace(".user", "")
    path.write_text(text)
    # (the user unit is verified by the system manager: same syntax, and no user manager
    # runs here; %t and %h expand all the same)
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines() if path.name in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
