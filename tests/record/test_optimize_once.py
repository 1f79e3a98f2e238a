"""``convert --optimize --analyze docker://SRC``: the recording, the analysis and the
conversion share one download of each source layer; the result is the same as
converting the same image from a local layout."""

import json
import os
import subprocess
import sys

from stargz_overlay.record import host_arch

from ..analyze.test_convert_analyze_once import gets_per_layer, push_layout
from ..format.tarbuild import TarBuilder
from ..imagefixture import busybox_layer, write_layout
from ..registryfixture import Proxy, Registry, require_registry

WORKLOAD = ["/bin/cat", "/data/a", "/etc/motd"]


def convert(src, dst, env):
    res = subprocess.run([sys.executable, "-m", "stargz_overlay", "convert", src, dst,
                          "--optimize", "--analyze", "--period", "20s", "--json",
                          "--entrypoint", json.dumps(WORKLOAD)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), res.stderr


def test_optimize_fetches_each_source_layer_once(podman, tmp_path):
    require_registry()
    top = (TarBuilder().dir("data").dir("etc").file("data/a", b"content of a\n")
           .file("data/unread", b"never read\n").file("etc/motd", b"motd\n").bytes())
    layout = write_layout(str(tmp_path / "layout"), "v1", [busybox_layer(), top],
                          platforms=[host_arch()])
    spool_parent = tmp_path / "tmp"
    spool_parent.mkdir()
    (tmp_path / "auth.json").write_text("{}")         # podman reads it too
    with Registry(str(tmp_path / "registry")) as reg, Proxy(reg.host) as proxy:
        conf = tmp_path / "registries.conf"
        conf.write_text("".join(f'[[registry]]\nlocation = "{h}"\ninsecure = true\n'
                                for h in (reg.host, proxy.host)))
        env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=str(conf), TMPDIR=str(spool_parent),
                   REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"),
                   STARGZ_OVERLAY_CERTS_DIR=str(tmp_path))
        layers = push_layout(layout, reg.host, "src/links")
        proxy.clear()
        spooled, err = convert(f"docker://{proxy.host}/src/links:v1",
                               f"docker://{reg.host}/dst/links:v1", env)
        assert "exit status 0" in err
        assert gets_per_layer(proxy, layers) == [1, 1]
        direct, _ = convert(layout, f"oci:{tmp_path}/direct:v1", env)
    assert [la["digest"] for la in spooled["layers"]] == \
        [la["digest"] for la in direct["layers"]]
    assert spooled["digest"] == direct["digest"]
    assert [n for n in os.listdir(spool_parent) if n.startswith("stargz-spool-")] == []
