"""Build and run ``refestargz``, the Go driver of the reference estargz library.

The tool is compiled offline in GOPATH mode from Debian's
``golang-github-containerd-stargz-snapshotter-dev`` sources (estargz 0.12.0);
nothing is downloaded.  Used by the interop tests and by
``contrib/bench/format_bench.py``.
"""

import json
import os
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL_SOURCE = os.path.join(HERE, "refestargz")
# Debian installs Go library sources here; REFESTARGZ_GOPATH may name another tree.
DEBIAN_GOPATH = "/usr/share/gocode"
ESTARGZ_PKG = "github.com/containerd/stargz-snapshotter/estargz"


class Unavailable(Exception):
    """The Go toolchain or the reference sources are not installed."""


def gopath():
    return os.environ.get("REFESTARGZ_GOPATH", DEBIAN_GOPATH)


def build_tool(workdir):
    """Compile refestargz into ``workdir``; return the binary's path.

    Raises Unavailable (with the reason) when ``go`` or the Debian source
    package is missing, CalledProcessError when the build itself fails.
    """
    go = shutil.which("go")
    if go is None:
        raise Unavailable("the Go toolchain is not installed (Debian package golang-go)")
    src = os.path.join(gopath(), "src", ESTARGZ_PKG, "estargz.go")
    if not os.path.exists(src):
        raise Unavailable("the reference sources are not installed (Debian package "
                          "golang-github-containerd-stargz-snapshotter-dev)")
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ)
    env.update(GO111MODULE="off", GOFLAGS="", GOPROXY="off",
               GOPATH=gopath() + os.pathsep + os.path.join(workdir, "gopath"),
               GOCACHE=os.path.join(workdir, "gocache"))
    binary = os.path.join(workdir, "refestargz")
    proc = subprocess.run([go, "build", "-o", binary, "."], cwd=TOOL_SOURCE, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout,
                                            proc.stderr)
    return binary


class RefTool:
    """Runs subcommands of a built refestargz binary."""

    def __init__(self, binary):
        self.binary = binary

    def run(self, *args, check=True, env=None):
        """Run a subcommand; return the CompletedProcess (text mode)."""
        proc = subprocess.run([self.binary, *map(str, args)], capture_output=True, text=True,
                              timeout=600, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"refestargz {' '.join(map(str, args))} failed "
                                 f"({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def json(self, *args, **kw):
        return json.loads(self.run(*args, **kw).stdout)

    def build(self, tar_path, out_path, chunk_size=None, prioritized=None, legacy=False,
              level=None, allow_missing=False, env=None):
        args = ["build", tar_path, out_path]
        if chunk_size:
            args += ["--chunk-size", chunk_size]
        if prioritized:
            args += ["--prioritized", ",".join(prioritized)]
        if level is not None:
            args += ["--level", level]
        if legacy:
            args.append("--legacy")
        if allow_missing:
            args.append("--allow-missing")
        return self.json(*args, env=env)

    def ls(self, blob):
        return self.json("ls", blob)

    def verify(self, blob, toc_digest, check=True):
        return self.run("verify", blob, toc_digest, check=check)

    def open(self, blob):
        return self.json("open", blob)
