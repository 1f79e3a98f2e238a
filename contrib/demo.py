"""The main job, end to end: ``podman run`` of a real Debian python image, lazily.

Run through ``contrib/run demo`` (it installs everything first), as root::

    contrib/run demo [--image python-full|python] [--rtt-ms 30] [--mbit 100] [--keep]

1. builds a Debian python image from this machine's own Debian packages
   (``contrib/images.py``; no internet; cached between runs under
   ``~/.cache/stargz-overlay-demo``): by default ``python-full``, python3 on a
   build toolchain like the official python image (90 MB); ``--image python``
   is a minimal root with python3 only (21 MB).  It is pushed to a private
   docker-registry on 127.0.0.1 as an ordinary gzip image;
2. converts it with ``stargz-overlay convert --analyze`` (eStargz, the files
   python needs at startup first, so they arrive in one prefetch);
3. puts the registry behind a shaped link (default 30 ms round trip,
   100 Mbit/s: this kernel has no netem) and times, each with its own private
   storage.conf and graph root:
   - a normal ``podman run`` of the gzip image (pull, then run),
   - ``podman run`` of the eStargz image through ``stargz-overlay store`` and
     the ``stargz-overlay-mount`` mount program: no layer is downloaded at
     pull, the container starts with only the files it reads;
4. prints both times, the bytes that crossed the link, and ``stargz-overlay
   status``; then removes every container, image, mount and process it made.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "stargz_overlay"]
COMMAND = ["python3", "-c", "print('hello')"]
PODMAN_RUN = ["run", "--network", "none", "--ulimit", "nofile=1024:1024",
              "--ulimit", "nproc=1024:1024"]    # (no --rm: see podman_run)


class DemoError(Exception):
    pass


def say(text=""):
    print(text, flush=True)


def timed(title, argv, **kw):
    start = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, **kw)
    elapsed = time.monotonic() - start
    if res.returncode != 0:
        raise DemoError(f"{title} failed ({res.returncode}):\n{res.stderr.strip()}")
    say(f"[{elapsed:6.2f} s] {title}")
    return res, elapsed


def check_machine():
    missing = [tool for tool in ("podman", "runc", "skopeo", "fuse-overlayfs", "fusermount3",
                                 "docker-registry") if shutil.which(tool) is None]
    if missing:
        raise DemoError(f"missing: {', '.join(missing)} (contrib/run demo installs them)")
    if os.geteuid() != 0:
        raise DemoError("the demo runs Podman as root (private storage); run it as root")
    if not os.path.exists("/dev/fuse"):
        raise DemoError("/dev/fuse is missing: FUSE is not available here")


def podman_run(podman, title, ref, shaper):
    """Time ``podman run`` of ``ref`` (pull included) in ``podman``'s private storage,
    print its output and the bytes it moved over ``shaper``'s link; returns both figures.

    Not ``run --rm``: under load Podman 4.3.1 sometimes loses the exit code of a
    ``--rm`` container that exits at once ("no such exit code"); the named
    container is removed afterwards instead.
    """
    name = f"demo-{uuid.uuid4().hex[:8]}"
    before = shaper.bytes_down
    try:
        res, elapsed = timed(title, podman.argv(*PODMAN_RUN, "--name", name, ref, *COMMAND),
                             env=podman.env, timeout=600)
    finally:
        subprocess.run(podman.argv("rm", "-f", "-t", "0", name), env=podman.env,
                       capture_output=True, timeout=120)
    moved = shaper.bytes_down - before
    say(f"    output: {res.stdout.strip()!r}; {mb(moved)} over the link")
    return elapsed, moved


def image_layout(cache_root, kind):
    """The python image ``kind`` as an OCI layout (built once per set of package versions)."""
    sys.path.insert(0, HERE)
    import images
    versions = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Version}\n",
                               *images.image_packages(kind)],
                              capture_output=True, text=True).stdout
    key = hashlib.sha256(versions.encode()).hexdigest()[:16]
    layout = os.path.join(cache_root, f"{kind}-{key}")
    if os.path.exists(os.path.join(layout, "index.json")):
        say(f"[  0.00 s] reused the {kind} image built earlier ({layout})")
        return layout
    start = time.monotonic()
    tmp = layout + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    images.build(kind, tmp, tag="python")
    os.rename(tmp, layout)
    say(f"[{time.monotonic() - start:6.2f} s] built the {kind} image from this machine's "
        f"Debian packages (cached in {layout})")
    return layout


def mount_program(work):
    installed = os.path.join(os.path.dirname(sys.executable), "stargz-overlay-mount")
    if os.access(installed, os.X_OK):
        return installed
    path = os.path.join(work, "stargz-overlay-mount")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} -m stargz_overlay.mount_program "$@"\n')
    os.chmod(path, 0o755)
    return path


def mb(n):
    return f"{n / 1e6:.1f} MB"


def demo(args):
    check_machine()
    sys.path.insert(0, os.path.join(HERE, "bench"))
    from benchenv import Podman, registries_conf, unmount_all, unmount_store  # noqa: E402
    from netshape import Shaper  # noqa: E402
    from tests.registryfixture import Registry  # noqa: E402
    cache_root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                              "stargz-overlay-demo")
    os.makedirs(cache_root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="sz-demo-", dir="/tmp")
    say(f"stargz-overlay demo: podman run {' '.join(COMMAND)} (work directory {work})")
    registry = shaper = store_mnt = None
    podmans = []
    try:
        layout = image_layout(cache_root, args.image)
        registry = Registry(os.path.join(work, "registry"))
        timed("pushed it to a local docker-registry as an ordinary gzip image",
              ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:python",
               f"docker://{registry.host}/demo/python:gzip"], timeout=300)
        shaper = Shaper(("127.0.0.1", registry.port), rtt_ms=args.rtt_ms, mbit=args.mbit)
        link = shaper.start()
        regconf = registries_conf(os.path.join(work, "registries.conf"), [registry.host, link])
        env = dict(os.environ, CONTAINERS_REGISTRIES_CONF=regconf)
        res, _ = timed("converted it to eStargz (startup files found by static analysis "
                       "first, for one prefetch)",
                       CLI + ["convert", "--analyze", f"docker://{registry.host}/demo/python:gzip",
                              f"docker://{registry.host}/demo/python:esgz"],
                       env=env, timeout=600)
        for line in res.stdout.strip().splitlines():
            say("    " + line)
        say(f"\nthe registry is now behind a shaped link: {args.rtt_ms:g} ms round trip, "
            f"{args.mbit:g} Mbit/s\n")

        # 1. the normal way
        plain = Podman(work, "plain", link)
        podmans.append(plain)
        t_plain, plain_bytes = podman_run(
            plain, "normal: podman run of the gzip image (full pull, then run)",
            f"{link}/demo/python:gzip", shaper)

        # 2. lazily, through the store
        store_mnt = os.path.join(work, "als")
        config = os.path.join(work, "config.toml")
        with open(config, "w") as f:
            f.write(f'cache_dir = "{work}/cache"\nlog_file = "{work}/plugin.log"\n'
                    f'[registry]\nregistries_conf = "{regconf}"\n')
        timed("mounted the store (stargz-overlay store)",
              CLI + ["store", store_mnt, "--state-dir", os.path.join(work, "state"),
                     "--config", config], timeout=120)
        lazy = Podman(work, "lazy", link,
                      storage=f'[storage.options]\nadditionallayerstores = '
                              f'["{store_mnt}/store:ref"]\n[storage.options.overlay]\n'
                              f'mount_program = "{mount_program(work)}"\n')
        podmans.append(lazy)
        t_lazy, lazy_bytes = podman_run(
            lazy, "lazy: podman run of the eStargz image through the store",
            f"{link}/demo/python:esgz", shaper)
        t_warm, _ = podman_run(lazy, "lazy again: a second container (files cached locally)",
                               f"{link}/demo/python:esgz", shaper)

        say(f"\ncold start: {t_lazy:.2f} s lazily vs {t_plain:.2f} s with a full pull "
            f"({t_lazy / t_plain:.2f}x); {mb(lazy_bytes)} vs {mb(plain_bytes)} transferred")
        res = subprocess.run(CLI + ["status", "--state-dir", os.path.join(work, "state"),
                                    "--config", config], capture_output=True, text=True)
        say("\nstargz-overlay status:")
        say("    " + (res.stdout or res.stderr).strip().replace("\n", "\n    "))
        if args.json:
            print(json.dumps({"plain_seconds": t_plain, "lazy_seconds": t_lazy,
                              "warm_seconds": t_warm, "plain_bytes": plain_bytes,
                              "lazy_bytes": lazy_bytes, "rtt_ms": args.rtt_ms,
                              "mbit": args.mbit}))
    finally:
        say("\ncleaning up ...")
        for p in podmans:
            p.cleanup()
        if store_mnt:
            unmount_store(store_mnt)
        unmount_all(work)
        if shaper is not None:
            shaper.stop()
        if registry is not None:
            registry.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        say("done")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", choices=("python-full", "python"), default="python-full",
                        help="python3 on a build toolchain like the official python image "
                             "(default), or a minimal root with python3 only")
    parser.add_argument("--rtt-ms", type=float, default=30.0, help="link round trip (ms)")
    parser.add_argument("--mbit", type=float, default=100.0, help="link bandwidth (Mbit/s)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    try:
        demo(args)
    except (DemoError, RuntimeError) as exc:     # (RuntimeError: the registry did not start)
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
