"""Shared helpers: filesystem snapshots, process memory, bounded waits."""

import hashlib
import os
import stat
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tree_state(root, allowed=()):
    """{relpath: (type, mode, size, mtime_ns)} under ``root``, skipping ``allowed`` subtrees.

    Comparing two states shows anything created, removed or modified outside
    the directories a mount may write to.
    """
    allowed = {os.path.abspath(a) for a in allowed}
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.join(dirpath, d) not in allowed)
        for name in sorted(filenames) + dirnames:
            path = os.path.join(dirpath, name)
            if path in allowed:
                continue
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            kind = stat.S_IFMT(st.st_mode)
            state[os.path.relpath(path, root)] = (
                kind, stat.S_IMODE(st.st_mode),
                st.st_size if kind == stat.S_IFREG else 0,
                st.st_mtime_ns if kind != stat.S_IFDIR else 0)
    return state


def diff_states(before, after):
    out = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            out.append(f"{name}: {before.get(name)} -> {after.get(name)}")
    return out


def find_marker(marker, roots=("/", "/tmp", "/etc", "/var/tmp", "/root")):
    """Names containing ``marker`` directly under well-known directories."""
    hits = []
    for root in roots:
        try:
            hits += [os.path.join(root, n) for n in os.listdir(root) if marker in n]
        except OSError:
            pass
    return hits


def proc_status(pid, key):
    """A /proc/PID/status value in KiB (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


_MEASURE = r"""
import os, resource, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\n@@maxrss_kib=%d\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(cmd, timeout=180, env=None, input=None):
    """Run ``cmd`` under a tiny wrapper that reports the child's own peak RSS.

    Returns (returncode, stdout bytes, stderr text without the report, peak MiB).
    """
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True,
                          timeout=timeout, env=env, input=input)
    err = proc.stderr.decode("utf-8", "replace")
    text, _, tail = err.rpartition("\n@@maxrss_kib=")
    peak = int(tail.strip()) / 1024 if tail.strip().isdigit() else None
    return proc.returncode, proc.stdout, text, peak


def cli_env():
    """The environment for CLI subprocesses: the same stargz_overlay as this process."""
    import stargz_overlay
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(stargz_overlay.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(
        [here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def cli(*args, timeout=180):
    """``python -m stargz_overlay ARGS`` measured: (rc, stdout, stderr, peak MiB)."""
    return measured([sys.executable, "-m", "stargz_overlay", *args], timeout=timeout,
                    env=cli_env())


def wait_until(predicate, timeout, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def unread_requests(port):
    """Connections to 127.0.0.1:``port`` holding bytes its server has not read yet (a
    request sent to a SIGSTOPped registry), from /proc/net/tcp."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if (local == f"0100007F:{port:04X}" and state == "01"
                    and int(queues.split(":")[1], 16) > 0):
                count += 1
    return count


def plugin_config(directory, registry=None, **extra):
    """A plugin config.toml under ``directory`` (cache, log, metrics all inside it).

    Returns (config path, {"cache": ..., "log": ..., "metrics": ...}); the
    metrics directory is only configured when this version has the key.
    """
    from stargz_overlay.config import Config

    from ..plugin.fusehelp import write_config
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {"cache": str(extra.pop("cache_dir", os.path.join(directory, "cache"))),
             "log": os.path.join(directory, "plugin.log"),
             "metrics": os.path.join(directory, "metrics")}
    if hasattr(Config(), "metrics_dir"):
        extra.setdefault("metrics_dir", paths["metrics"])
    extra.setdefault("log_calls", False)
    path = write_config(os.path.join(directory, "config.toml"), paths["cache"], paths["log"],
                        registry=registry, **extra)
    return path, paths


def check_cache(cache):
    """Every published cache file (``sha256/xx/<hex>``) hashes to its name."""
    bad = []
    top = os.path.join(cache, "sha256")
    for dirpath, _, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != name:
                bad.append(f"{path}: content does not hash to its name")
    return bad
