"""Plain ``podman pull``/``run``, Buildah and ``podman push`` through the store.

Real podman (runc, private graph root), real docker-registry behind a
counting proxy, real fuse-overlayfs for the store and for every container
(through the mount program).
"""

import gzip
import hashlib
import os
import shutil
import subprocess
import time

import pytest

from .conftest import busybox_tar, cli, estargz, plain_gzip, push, run
from ..imagefixture import tar_layer
from ..registry.conftest import make_client

BIG = os.urandom(600_000)          # incompressible: reading it would show at the registry
COLD = os.urandom(200_000)         # read by no test but the outage one
APP = tar_layer({"app": ("dir",), "app/hello.txt": b"hello from a lazy layer\n",
                 "app/big.bin": BIG, "app/sub": ("dir",), "app/sub/note.txt": b"note\n",
                 "app/cold.bin": COLD})


@pytest.fixture(scope="module")
def images(env):
    base = estargz(busybox_tar())
    app = estargz(APP)
    return {"base": base, "app": app,
            "lazy": push(env.registry.host, "lazy/app:1", [base, app]),
            "mixed": push(env.registry.host, "mixed/app:1", [plain_gzip(busybox_tar()), app])}


def via_proxy(env, ref):
    return ref.replace(env.registry.host, env.host, 1)


def test_pull_fetches_no_layer_blob_and_run_fetches_only_what_is_read(env, images):
    ref = via_proxy(env, images["lazy"])
    base, app = images["base"], images["app"]
    mark = env.mark()
    env.podman("pull", "-q", ref)
    for layer in (base, app):
        full, ranged = env.layer_gets(layer, mark)
        assert full == 0, "podman pull downloaded a whole layer blob"
        # the store read the footer and the TOC only (a few kB of each blob)
        assert ranged < len(layer.blob) // 10, (ranged, len(layer.blob))
    # the layers are links into the store, not extracted copies
    overlay = os.path.join(env.podman.dir, "graph", "overlay")
    links = [os.readlink(os.path.join(overlay, d, "diff")) for d in os.listdir(overlay)
             if os.path.islink(os.path.join(overlay, d, "diff"))]
    assert len(links) == 2 and all(x.startswith(env.mnt + "/store/") for x in links)

    mark = env.mark()
    out = run(env, ref, "cat", "/app/hello.txt")
    assert out.stdout == "hello from a lazy layer\n"
    full, ranged = env.layer_gets(app, mark)
    assert full == 0
    assert ranged < len(BIG) // 4, "big.bin was fetched although nothing read it"
    full, ranged = env.layer_gets(base, mark)
    assert full == 0 and ranged > 500_000          # busybox itself was read (it is cat)

    # containers/storage's use/release notifications reached the store (and were answered
    # with ENOENT, so podman printed no GC warning)
    assert "GC doesn't seem to be supported" not in out.stderr
    state = env.status()
    image = next(i for i in state["images"] if i["ref"] == ref)
    rows = {r["digest"]: r for r in image["layers"]}
    assert rows[app.digest]["mode"] == "lazy" and rows[base.digest]["mode"] == "lazy"
    assert rows[app.digest]["uses"] >= 1
    assert rows[app.digest]["uses"] - rows[app.digest]["releases"] >= 1
    # status: only hello.txt of the app layer is local, and opens were counted
    assert rows[app.digest]["local_bytes"] == len(b"hello from a lazy layer\n")
    assert 0 < rows[app.digest]["local_ratio"] < 0.01
    assert rows[app.digest]["opens"] >= 1
    assert rows[base.digest]["blob_bytes"] > 500_000

    # a second run reads from the cache: nothing more of the app layer is fetched
    mark = env.mark()
    assert run(env, ref, "cat", "/app/hello.txt").stdout == "hello from a lazy layer\n"
    assert env.layer_gets(app, mark)[1] == 0      # the file and the TOC come from the cache
    assert env.status()["images"]
    env.podman("rmi", ref)


def test_mixed_image_pulls_and_runs_and_status_explains_gzip_layers(env, images):
    ref = via_proxy(env, images["mixed"])
    gz = plain_gzip(busybox_tar())
    mark = env.mark()
    env.podman("pull", "-q", ref)
    assert env.layer_gets(gz, mark)[0] == 1          # the gzip layer is pulled normally
    assert env.layer_gets(images["app"], mark)[0] == 0
    out = run(env, ref, "sh", "-c", "cat /app/hello.txt; ls /bin/busybox")
    assert out.stdout == "hello from a lazy layer\n/bin/busybox\n"
    state = env.status()
    image = next(i for i in state["images"] if i["ref"] == ref)
    rows = {r["digest"]: r for r in image["layers"]}
    assert rows[gz.digest]["mode"] == "pulled"
    assert "footer" in rows[gz.digest]["reason"] and "gzip" in rows[gz.digest]["reason"]
    assert rows[images["app"].digest]["mode"] == "lazy"
    text = cli("status", "--state-dir", env.state, "--config", env.config).stdout
    assert "pulled" in text and "no toc.digest annotation and footer is plain gzip" in text
    env.podman("rmi", ref)


def test_writable_container_layer(env, images):
    ref = via_proxy(env, images["lazy"])
    env.podman("pull", "-q", ref)
    script = ("set -e; echo more >> /app/hello.txt; rm /app/big.bin; mv /app/sub /app/moved; "
              "mv /app/moved/note.txt /app/note2.txt; mkdir /app/new; echo x > /app/new/f; "
              "cat /app/hello.txt; ls /app; ls /app/moved | wc -l; test ! -e /app/big.bin")
    out = run(env, ref, "sh", "-c", script)
    assert out.stdout.split("\n") == ["hello from a lazy layer", "more", "cold.bin", "hello.txt",
                                      "moved", "new", "note2.txt", "0", ""]
    # a second container sees the image as it was
    out = run(env, ref, "sh", "-c", "cat /app/hello.txt; ls /app; ls /app/sub; "
                                    "wc -c < /app/big.bin")
    assert out.stdout.split("\n") == ["hello from a lazy layer", "big.bin", "cold.bin",
                                      "hello.txt", "sub", "note.txt", str(len(BIG)), ""]
    # and so does the store itself
    diff = next(os.readlink(os.path.join(env.podman.dir, "graph", "overlay", d, "diff"))
                for d in os.listdir(os.path.join(env.podman.dir, "graph", "overlay"))
                if os.path.islink(os.path.join(env.podman.dir, "graph", "overlay", d, "diff"))
                and images["app"].digest in os.readlink(
                    os.path.join(env.podman.dir, "graph", "overlay", d, "diff")))
    assert sorted(os.listdir(os.path.join(diff, "app"))) == ["big.bin", "cold.bin", "hello.txt",
                                                             "sub"]
    with open(os.path.join(diff, "app", "big.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(BIG).digest()
    # a named container keeps its changes across restarts
    env.podman("run", "--name", "keeper", "--network", "none", "--ulimit",
               "nofile=1024:1024", "--ulimit", "nproc=1024:1024", ref, "sh", "-c",
               "echo kept > /app/hello.txt")
    env.podman("start", "-a", "keeper")
    out = env.podman("start", "-a", "keeper")
    env.podman("rm", "keeper")
    env.podman("rmi", ref)


def test_buildah_from_and_run(env, images):
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (Debian package buildah)")
    ref = via_proxy(env, images["lazy"])
    buildah = ["buildah"]

    def b(*args, check=True):
        res = subprocess.run([*buildah, *args], env=env.podman.env, capture_output=True,
                             text=True, timeout=120)
        if check and res.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)}: {res.stderr}")
        return res

    mark = env.mark()
    ctr = b("from", "--tls-verify=false", "--quiet", ref).stdout.strip()
    try:
        assert env.layer_gets(images["app"], mark)[0] == 0
        out = b("run", "--runtime", "runc", ctr, "--", "sh", "-c",
                "cat /app/hello.txt; echo built > /app/built.txt; cat /app/built.txt")
        assert out.stdout == "hello from a lazy layer\nbuilt\n"
        assert env.layer_gets(images["app"], mark)[1] < len(BIG) // 4
    finally:
        b("rm", ctr, check=False)
    env.podman("rmi", "-f", ref, check=False)


def test_push_of_a_lazily_pulled_image(env, images):
    """Podman 4.3.1 re-compresses on push (see the README); the layer bytes are identical."""
    ref = via_proxy(env, images["lazy"])
    env.podman("pull", "-q", ref)
    target = f"{env.registry.host}/pushed/app:1"     # (the counting proxy cannot relay uploads)
    mark = env.mark()
    env.podman("push", "--tls-verify=false", ref, target)
    # the store served the whole blob, verified against its digest, from the registry
    for layer in (images["base"], images["app"]):
        full, ranged = env.layer_gets(layer, mark)
        assert full + ranged > 0
    with make_client(env.registry.host) as client:
        image = client.resolve(target)
        assert image.config["rootfs"]["diff_ids"] == [images["base"].diff_id,
                                                      images["app"].diff_id]
        for desc, layer in zip(image.layers, (images["base"], images["app"])):
            blob = client.get_blob(image.reference, desc.digest, limit=1 << 30)
            tar = gzip.decompress(blob)
            # the uncompressed layer is byte-identical to the original eStargz layer's
            assert tar == gzip.decompress(layer.blob)
            assert "sha256:" + hashlib.sha256(tar).hexdigest() == layer.diff_id
    env.podman("rmi", ref)


def test_store_restart_under_running_containers(env, images):
    ref = via_proxy(env, images["lazy"])
    env.podman("pull", "-q", ref)
    env.podman("run", "-d", "--name", "longrun", "--network", "none", "--ulimit",
               "nofile=1024:1024", "--ulimit", "nproc=1024:1024", ref, "sleep", "600")
    env.podman("create", "--name", "stopped", "--network", "none", "--ulimit",
               "nofile=1024:1024", "--ulimit", "nproc=1024:1024", ref, "cat", "/app/hello.txt")
    try:
        env.stop_store()
        # the running container's layers are served by its own mount, not by the store
        out = env.podman("exec", "longrun", "cat", "/app/hello.txt")
        assert out.stdout == "hello from a lazy layer\n"
        # an existing container starts: the mount program finds the store's state
        # and configuration without the store
        out = env.podman("start", "-a", "stopped")
        assert out.stdout == "hello from a lazy layer\n"
        # a new container cannot be created while the store is down (containers/storage
        # stats the image's layer directories, which live in the store): a clear error
        started = time.monotonic()
        out = run(env, ref, "true", check=False, timeout=60)
        assert out.returncode != 0 and "diff" in out.stderr
        assert time.monotonic() - started < 30
        env.start_store()
        assert run(env, ref, "cat", "/app/sub/note.txt").stdout == "note\n"
        assert env.podman("exec", "longrun", "cat", "/app/sub/note.txt").stdout == "note\n"
        # and a pull of another tag resolves through the restarted store
        other = via_proxy(env, push(env.registry.host, "lazy/app:2",
                                    [images["base"], images["app"]]))
        env.podman("pull", "-q", other)
        assert run(env, other, "cat", "/app/hello.txt").stdout == "hello from a lazy layer\n"
        env.podman("rmi", other)
    finally:
        env.podman("rm", "-f", "-t", "0", "longrun", "stopped", check=False)
        if not env.mounted:
            env.start_store()
    env.podman("rmi", ref)


def test_registry_outage_cached_files_work_unfetched_fail_with_eio(env, images):
    ref = via_proxy(env, images["lazy"])
    env.podman("pull", "-q", ref)
    env.podman("run", "-d", "--name", "outage", "--network", "none", "--ulimit",
               "nofile=1024:1024", "--ulimit", "nproc=1024:1024", ref, "sleep", "600")
    try:
        assert env.podman("exec", "outage", "cat", "/app/hello.txt").returncode == 0
        env.registry.kill()
        started = time.monotonic()
        out = env.podman("exec", "outage", "cat", "/app/hello.txt")
        assert out.stdout == "hello from a lazy layer\n"
        out = env.podman("exec", "outage", "cat", "/app/cold.bin", check=False, timeout=90)
        assert out.returncode != 0 and "Input/output error" in out.stderr
        assert time.monotonic() - started < 60
        # the mount still answers afterwards
        assert env.podman("exec", "outage", "ls", "/app").returncode == 0
    finally:
        env.podman("rm", "-f", "-t", "0", "outage", check=False)
        env.registry.start()
    env.podman("rmi", ref)
