"""Registry layers through the plugin, against a real docker-registry on 127.0.0.1.

A counting proxy sits between the plugin and the registry: the tests count
blob requests, break the registry, and flip bytes on the wire.
"""

import errno
import os
import subprocess
import sys
import time

import pytest

from stargz_overlay.layer_spec import LayerSpec
from stargz_overlay.reader import StargzReader
from stargz_overlay.registries_conf import RegistriesConf
from stargz_overlay.registry import RegistryClient, TOC_DIGEST_ANNOTATION
from stargz_overlay.source import FileSource

from .fusehelp import Mount, _daemon_pids, plugin_lower, write_config
from .layers import build_layer
from ..format.tarbuild import TarBuilder
from ..registryfixture import Proxy, Registry, push_image

BASE_FILES = {f"lib/f{i}": os.urandom(2000 + 7000 * i) for i in range(5)}
TOP_FILES = {"app/main": b"print('hello')\n" * 200, "app/data": os.urandom(90_000)}


def tree(files, dirs):
    b = TarBuilder()
    for d in dirs:
        b.dir(d)
    for name, data in files.items():
        b.file(name, data)
    return b


@pytest.fixture(scope="module")
def image(tmp_path_factory, so):
    tmp = str(tmp_path_factory.mktemp("regimg"))
    base = build_layer(tmp, "base", tree(BASE_FILES, ["lib"]))
    top = build_layer(tmp, "top", tree(TOP_FILES, ["app"]))
    reg = Registry(tmp)
    try:
        conf = RegistriesConf.from_text(f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n')
        with RegistryClient(registries_conf=conf, auth_files=[], certs_dir=os.devnull) as client:
            ref = f"{reg.host}/plug/app:1"
            push_image(client, ref, [base.blob, top.blob],
                       layer_annotations=[{TOC_DIGEST_ANNOTATION: base.result.toc_digest},
                                          {TOC_DIGEST_ANNOTATION: top.result.toc_digest}])
        yield reg, base, top
    finally:
        reg.stop()


@pytest.fixture
def proxy(image):
    reg = image[0]
    p = Proxy(reg.host)
    yield p
    p.stop()


@pytest.fixture
def reg_config(tmp_path, proxy):
    empty_conf = tmp_path / "registries.conf"
    empty_conf.write_text("")
    auth = tmp_path / "auth.json"
    auth.write_text("{}")
    certs = tmp_path / "certs.d"
    certs.mkdir()
    return write_config(tmp_path / "config.toml", str(tmp_path / "cache"),
                        str(tmp_path / "plugin.log"),
                        registry={"insecure": [proxy.host], "registries_conf": str(empty_conf),
                                  "auth_file": str(auth), "certs_dir": str(certs),
                                  "connect_timeout": 2.0, "read_timeout": 3.0, "retries": 2,
                                  "deadline": 8.0})


def specs(proxy, image, config, with_toc):
    _, base, top = image
    ref = f"{proxy.host}/plug/app:1"
    return [LayerSpec("registry", ref=ref, digest=layer.result.blob_digest,
                      toc=layer.result.toc_digest if with_toc else None, config=config)
            for layer in (top, base)]


def ranges_of(blob):
    with FileSource(blob) as src:
        toc = StargzReader(src).toc
    return {e.name: (e.chunks[0].offset, e.chunks[-1].end) for e in toc.entries
            if e.type == "reg" and e.size}


def blob_gets(proxy):
    return [r for r in proxy.requests("GET", kind="blob")]


def mount_image(tmp_path, so, mounts, proxy, image, config, with_toc=True, options=()):
    lowers = [plugin_lower(s, tmp_path / f"l{i}")
              for i, s in enumerate(specs(proxy, image, config, with_toc))]
    m = mounts(tmp_path / "mnt", lowers, tmp_path / "up", tmp_path / "wk", options=options,
               so=so)
    m.mount()
    return m


@pytest.mark.parametrize("with_toc", [True, False])
def test_registry_layers_are_lazy(tmp_path, so, mounts, proxy, image, reg_config, with_toc):
    m = mount_image(tmp_path, so, mounts, proxy, image, reg_config, with_toc)
    at_mount = len(blob_gets(proxy))
    ranged = [r for r in blob_gets(proxy) if r[2]]
    assert len(ranged) <= 4                      # footer + TOC per layer, nothing else
    assert at_mount - len(ranged) <= (0 if with_toc else 1)     # + the image config
    subprocess.run(["ls", "-lR", m.mnt], check=True, capture_output=True)
    for root, dirs, files in os.walk(m.mnt):
        for name in files:
            os.stat(os.path.join(root, name))
    assert len(blob_gets(proxy)) == at_mount
    assert open(os.path.join(m.mnt, "lib/f3"), "rb").read() == BASE_FILES["lib/f3"]
    new = blob_gets(proxy)[at_mount:]
    assert len(new) == 1
    start, end = ranges_of(image[1].blob)["lib/f3"]
    lo, hi = [int(x) for x in new[0][2].split("=")[1].split("-")]
    assert start <= lo and hi < end                  # only that file's bytes
    assert open(os.path.join(m.mnt, "lib/f3"), "rb").read() == BASE_FILES["lib/f3"]
    assert len(blob_gets(proxy)) == at_mount + 1     # reopen: cache hit
    for name, data in TOP_FILES.items():
        assert open(os.path.join(m.mnt, name), "rb").read() == data


def test_registry_outage_gives_eio_then_recovers(tmp_path, so, mounts, proxy, image,
                                                 reg_config):
    reg = image[0]
    m = mount_image(tmp_path, so, mounts, proxy, image, reg_config)
    assert open(os.path.join(m.mnt, "lib/f0"), "rb").read() == BASE_FILES["lib/f0"]
    reg.kill()
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as exc:
            open(os.path.join(m.mnt, "lib/f1"), "rb").read()
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - started < 30
        # fetched files and metadata keep working while the registry is gone
        assert open(os.path.join(m.mnt, "lib/f0"), "rb").read() == BASE_FILES["lib/f0"]
        assert os.stat(os.path.join(m.mnt, "lib/f4")).st_size == len(BASE_FILES["lib/f4"])
    finally:
        reg.start()
    assert open(os.path.join(m.mnt, "lib/f1"), "rb").read() == BASE_FILES["lib/f1"]
    log = open(tmp_path / "plugin.log").read()
    assert "cannot open lib/f1:" in log


def test_bytes_flipped_on_the_wire_give_eio(tmp_path, so, mounts, proxy, image, reg_config):
    start, end = ranges_of(image[2].blob)["app/data"]
    m = mount_image(tmp_path, so, mounts, proxy, image, reg_config)
    proxy.flip_byte = (start + end) // 2
    with pytest.raises(OSError) as exc:
        open(os.path.join(m.mnt, "app/data"), "rb").read()
    assert exc.value.errno == errno.EIO
    proxy.flip_byte = None
    assert open(os.path.join(m.mnt, "app/data"), "rb").read() == TOP_FILES["app/data"]


def test_unreachable_registry_fails_the_mount_clearly(tmp_path, so, mounts, proxy, image,
                                                     reg_config):
    spec = specs(proxy, image, reg_config, True)[0]
    spec.ref = spec.ref.replace(proxy.host, "127.0.0.1:9")     # nothing listens there
    m = mounts(tmp_path / "mnt", [plugin_lower(spec, tmp_path / "l")], so=so)
    result = m.mount(check=False)
    assert result.returncode != 0 and not m.mounted
    ours = [l for l in result.stderr.splitlines() if l.startswith("stargz-overlay:")]
    assert len(ours) == 1 and "127.0.0.1:9" in ours[0], result.stderr


def test_cli_mount_image(tmp_path, so, proxy, image, reg_config):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = [sys.executable, "-m", "stargz_overlay", "mount", "--config", reg_config,
           "--image", f"docker://{proxy.host}/plug/app:1", "--state-dir", str(tmp_path / "s"),
           str(mnt)]
    m = Mount(str(mnt), [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        m.pids = _daemon_pids(str(mnt))
        assert sorted(os.listdir(mnt)) == ["app", "lib"]
        assert open(mnt / "app/main", "rb").read() == TOP_FILES["app/main"]
    finally:
        m.unmount()
