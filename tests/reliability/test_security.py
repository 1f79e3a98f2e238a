"""Security defaults: TLS verification, secrets, file modes, rootless mounts.

- A TLS registry whose CA is unknown is refused by the plugin and the CLI
  unless the CA is configured (certs.d) or the registry is marked insecure.
- A known password (basic auth) and the bearer tokens a token server issues
  never appear in the plugin log (debug level, every call and read logged),
  in CLI output, in fuse-overlayfs's command line, nor in error messages.
- The cache, the layer directories, the state directory and the log are
  created private to their owner, whatever the umask.
- An unprivileged user mounts a layer through fusermount3 and reads it, with
  no privileges beyond its own (skipped, with the reason, where this machine's
  Python cannot be loaded by another user).
"""

import base64
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from stargz_overlay.layer_spec import decode

from ..plugin.fusehelp import FUSE_OVERLAYFS, _daemon_pids, blob_spec, plugin_lower
from ..registryfixture import Registry, TokenServer
from .helpers import cli_env, plugin_config, wait_until
from .regimage import push_files, registry_config

FILES = {"etc/motd": b"welcome\n" * 100, "bin/tool": os.urandom(70_000),
         "secret/data": os.urandom(20_000)}
PASSWORD = "Pw-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.")


def auth_json(path, host, user, password):
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    with open(path, "w") as f:
        json.dump({"auths": {host: {"auth": token}}}, f)
    return str(path)


def one_line(stderr):
    ours = [line for line in stderr.splitlines() if line.startswith("stargz-overlay:")]
    assert "Traceback" not in stderr and len(ours) == 1, stderr
    return ours[0]


# -- TLS ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, so):
    tmp = tmp_path_factory.mktemp("tls")
    reg = Registry(str(tmp), tls=True)
    try:
        yield reg, push_files(str(tmp), reg, FILES)
    finally:
        reg.stop()


def test_unknown_ca_is_refused_by_default(tmp_path, so, mounts, tls_registry):
    reg, layer = tls_registry
    empty_certs = tmp_path / "no-certs"
    empty_certs.mkdir()
    config, _ = registry_config(tmp_path / "conf", [], registry={"certs_dir": str(empty_certs)})
    m = mounts(tmp_path / "mnt", [layer.lower(reg.host, config, tmp_path / "l")], so=so)
    result = m.mount(check=False)
    assert result.returncode != 0 and not m.mounted
    line = one_line(result.stderr)
    assert "certificate" in line and reg.host in line, line

    env = cli_env()
    env.update(STARGZ_OVERLAY_CERTS_DIR=str(empty_certs),
               CONTAINERS_REGISTRIES_CONF=str(tmp_path / "conf" / "registries.conf"),
               REGISTRY_AUTH_FILE=str(tmp_path / "conf" / "auth.json"))
    r = subprocess.run([sys.executable, "-m", "stargz_overlay", "ls",
                        f"docker://{layer.ref}", "--layer", "0"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1 and "certificate" in one_line(r.stderr)


def test_known_ca_or_insecure_is_accepted(tmp_path, so, mounts, tls_registry):
    reg, layer = tls_registry
    config, _ = registry_config(tmp_path / "ca", [], registry={"certs_dir": reg.certs_dir})
    m = mounts(tmp_path / "mnt", [layer.lower(reg.host, config, tmp_path / "l")], so=so)
    m.mount()
    assert open(os.path.join(m.mnt, "etc/motd"), "rb").read() == FILES["etc/motd"]
    config2, _ = registry_config(tmp_path / "insecure", [reg.host])     # explicit opt-out
    m2 = mounts(tmp_path / "mnt2", [layer.lower(reg.host, config2, tmp_path / "l2")], so=so)
    m2.mount()
    assert open(os.path.join(m2.mnt, "bin/tool"), "rb").read() == FILES["bin/tool"]


# -- secrets -------------------------------------------------------------------------

def leaks(text, secrets):
    found = [s for s in secrets if s and s in text]
    found += JWT_RE.findall(text)
    return found


def daemon_cmdlines(mnt):
    out = []
    for pid in _daemon_pids(str(mnt)):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode("utf-8", "replace").split("\0")
        out.append(" ".join(argv))
        for item in " ".join(argv).split("//stargz/")[1:]:
            out.append(json.dumps(decode(item.split("/", 1)[0]).to_dict()))
    return "\n".join(out)


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory, so):
    tmp = tmp_path_factory.mktemp("basic")
    reg = Registry(str(tmp), users={"alice": PASSWORD})
    try:
        auth = auth_json(tmp / "push-auth.json", reg.host, "alice", PASSWORD)
        yield reg, push_files(str(tmp), reg, FILES, auth_files=[auth])
    finally:
        reg.stop()


def test_password_never_in_logs_output_or_process_titles(tmp_path, so, mounts, basic_registry):
    reg, layer = basic_registry
    conf = tmp_path / "conf"
    conf.mkdir()
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    auth_json(conf / "auth.json", reg.host, "alice", PASSWORD)
    config, paths = registry_config(conf, [reg.host], log_calls=True)
    m = mounts(tmp_path / "mnt", [layer.lower(reg.host, config, tmp_path / "l")], so=so)
    result = m.mount()
    for name, data in FILES.items():
        assert open(os.path.join(m.mnt, name), "rb").read() == data
    titles = daemon_cmdlines(m.mnt)
    m.unmount()
    # a wrong password: the error path must not echo what was sent
    bad = tmp_path / "bad"
    bad.mkdir()
    auth_json(bad / "auth.json", reg.host, "alice", PASSWORD + "-wrong")
    bad_config, bad_paths = registry_config(bad, [reg.host], log_calls=True)
    mb = mounts(tmp_path / "mnt-bad", [layer.lower(reg.host, bad_config, tmp_path / "lb")],
                so=so)
    bad_result = mb.mount(check=False)
    assert bad_result.returncode != 0
    assert "rejected" in one_line(bad_result.stderr)
    # the CLI, with the good and the bad credentials
    outputs = []
    for auth_dir in (conf, bad):
        env = cli_env()
        env.update(REGISTRY_AUTH_FILE=str(auth_dir / "auth.json"),
                   CONTAINERS_REGISTRIES_CONF=str(conf / "registries.conf"))
        for args in (["ls", f"docker://{layer.ref}", "--layer", "0", "-l"],
                     ["inspect", f"docker://{layer.ref}"],
                     ["cat", f"docker://{layer.ref}", "--layer", "0", "etc/motd"]):
            r = subprocess.run([sys.executable, "-m", "stargz_overlay", *args], env=env,
                               capture_output=True, text=True, timeout=60)
            outputs.append(r.stdout + r.stderr)
    secrets = [PASSWORD, basic, PASSWORD + "-wrong",
               base64.b64encode(f"alice:{PASSWORD}-wrong".encode()).decode()]
    texts = {"plugin log": open(paths["log"]).read(), "bad plugin log":
             open(bad_paths["log"]).read(), "mount stderr": result.stderr + bad_result.stderr,
             "process titles": titles, "CLI output": "\n".join(outputs)}
    assert "Authorization" not in texts["plugin log"]
    assert {k: leaks(v, secrets) for k, v in texts.items()} == {k: [] for k in texts}
    assert "blob-read" in texts["plugin log"]         # the log did record the reads


def test_bearer_tokens_never_in_logs(tmp_path, so, mounts):
    token_server = TokenServer(str(tmp_path), users={"bob": PASSWORD})
    reg = Registry(str(tmp_path), token=token_server)
    try:
        auth = auth_json(tmp_path / "push-auth.json", reg.host, "bob", PASSWORD)
        layer = push_files(str(tmp_path), reg, FILES, auth_files=[auth])
        conf = tmp_path / "conf"
        conf.mkdir()
        auth_json(conf / "auth.json", reg.host, "bob", PASSWORD)
        config, paths = registry_config(conf, [reg.host, token_server.host], log_calls=True,
                                        log_level="debug")
        m = mounts(tmp_path / "mnt", [layer.lower(reg.host, config, tmp_path / "l")], so=so)
        m.mount()
        for name, data in FILES.items():
            assert open(os.path.join(m.mnt, name), "rb").read() == data
        titles = daemon_cmdlines(m.mnt)
        m.unmount()
        assert token_server.issued >= 1
        log = open(paths["log"]).read()
        assert "token" in log                   # it did log about tokens, not the tokens
        secrets = [PASSWORD, base64.b64encode(f"bob:{PASSWORD}".encode()).decode()]
        assert leaks(log, secrets) == [] and leaks(titles, secrets) == []
    finally:
        reg.stop()


# -- modes -------------------------------------------------------------------------------

def modes_under(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode):
                out[os.path.relpath(path, root)] = stat.S_IMODE(st.st_mode)
    return out


def test_private_file_modes_whatever_the_umask(tmp_path, so, mounts):
    from ..format.tarbuild import TarBuilder
    from stargz_overlay.writer import convert
    tar = TarBuilder().dir("d", mode=0o777).file("d/f", b"x" * 5000, mode=0o666).bytes()
    blob = tmp_path / "layer.blob"
    with open(blob, "wb") as out:
        import io
        convert(io.BytesIO(tar), out)
    old = os.umask(0)            # the most permissive umask a caller could have
    try:
        config, paths = plugin_config(tmp_path / "conf")
        m = mounts(tmp_path / "mnt", [plugin_lower(blob_spec(str(blob), config),
                                                   tmp_path / "state" / "l")], so=so)
        m.mount()
        assert open(os.path.join(m.mnt, "d/f"), "rb").read() == b"x" * 5000
        os.listdir(os.path.join(m.mnt, "d"))
        cache_modes = modes_under(paths["cache"])
        layer_modes = modes_under(tmp_path / "state" / "l")
        log_mode = stat.S_IMODE(os.stat(paths["log"]).st_mode)
        m.unmount()
    finally:
        os.umask(old)
    loose = {p: oct(mode) for p, mode in cache_modes.items() if mode & 0o077}
    assert loose == {}, f"cache entries readable by others: {loose}"
    assert layer_modes["."] & 0o077 == 0, oct(layer_modes["."])
    assert log_mode & 0o077 == 0, f"plugin log is {oct(log_mode)}"


# -- rootless --------------------------------------------------------------------------------

TEST_USER = "stargz-rootless"
SYSTEM_PYTHON = "/usr/bin/python3"


def _unreadable_for(user, paths):
    """The first of ``paths`` that ``user`` cannot read and traverse, or None."""
    for path in filter(None, paths):
        r = subprocess.run(["runuser", "-u", user, "--", "test", "-r", path, "-a", "-x", path],
                           capture_output=True)
        if r.returncode != 0:
            return path
    return None


def _python_paths(python):
    code = ("import sysconfig; print(sysconfig.get_paths()['stdlib']); "
            "print(sysconfig.get_config_var('LIBDIR') or '')")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return r.stdout.split("\n")[:2] if r.returncode == 0 else None


def rootless_plugin(user, top):
    """A plugin .so (and its package) that ``user`` can load; (so, None) or (None, why).

    The plugin embeds the Python that built it.  When that one is out of the
    user's reach (e.g. under /root), the package is copied next to the test and
    built with the system Python, if it has cffi (Debian: python3-cffi).
    """
    import stargz_overlay
    from ..plugin.fusehelp import REPO, plugin_so
    pkg = os.path.dirname(os.path.abspath(stargz_overlay.__file__))
    blocked = _unreadable_for(user, [pkg] + _python_paths(sys.executable))
    if blocked is None:
        return plugin_so(), None
    why = f"{blocked} is not readable by an unprivileged user"
    paths = _python_paths(SYSTEM_PYTHON) if os.path.exists(SYSTEM_PYTHON) else None
    if paths is None or _unreadable_for(user, paths):
        return None, why + f", and there is no usable {SYSTEM_PYTHON}"
    check = subprocess.run([SYSTEM_PYTHON, "-c", "import cffi"], capture_output=True)
    if check.returncode != 0:
        return None, why + f", and {SYSTEM_PYTHON} has no cffi (Debian: python3-cffi)"
    copy = os.path.join(top, "pkg", "stargz_overlay")
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    so = os.path.join(copy, "libstargz_plugin.so")
    build = subprocess.run([SYSTEM_PYTHON, os.path.join(REPO, "cstub", "build_plugin.py"), so],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        return None, why + f"; building with {SYSTEM_PYTHON} failed: {build.stderr[-300:]}"
    print(f"rootless: {why}; using a copy built with {SYSTEM_PYTHON}", file=sys.stderr)
    return so, None


@pytest.fixture
def rootless_user():
    if os.geteuid() != 0:
        pytest.skip("creating the test user needs root")
    if shutil.which("runuser") is None or shutil.which("useradd") is None:
        pytest.skip("runuser/useradd are not installed")
    created = False
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        TEST_USER], check=True, capture_output=True)
        created = True
    try:
        yield pwd.getpwnam(TEST_USER)
    finally:
        if created:
            subprocess.run(["userdel", TEST_USER], capture_output=True)


def test_rootless_mount(so, rootless_user):
    """An unprivileged user mounts a layer with fuse-overlayfs (FUSE through the setuid
    fusermount3) and reads it; the daemon runs as that user with no capabilities and
    everything it writes belongs to the user."""
    uid, gid = rootless_user.pw_uid, rootless_user.pw_gid
    dev = os.stat("/dev/fuse")
    if dev.st_mode & 0o006 != 0o006:
        # libfuse opens /dev/fuse itself and only falls back to fusermount3 when mount(2)
        # is refused, not when the device cannot be opened
        msg = (f"rootless mount not tested: /dev/fuse is mode {oct(stat.S_IMODE(dev.st_mode))} "
               f"here (distributions ship 0666); an unprivileged fuse-overlayfs cannot open it")
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    top = tempfile.mkdtemp(prefix="stargz-rootless-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        user_so, why = rootless_plugin(TEST_USER, top)
        if why:
            msg = f"rootless mount not tested: {why}"
            print(msg, file=sys.stderr)
            pytest.skip(msg)
        home = os.path.join(top, "home")
        os.mkdir(home)
        import io
        from stargz_overlay.writer import convert
        from ..format.tarbuild import TarBuilder
        blob = os.path.join(home, "layer.blob")
        with open(blob, "wb") as out:
            convert(io.BytesIO(TarBuilder().dir("d").file("d/f", b"rootless\n" * 100).bytes()),
                    out)
        config, paths = plugin_config(home)
        mnt = os.path.join(home, "mnt")
        os.mkdir(mnt)
        for dirpath, dirnames, filenames in os.walk(home):
            for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                os.chown(name, uid, gid)
        lower = plugin_lower(blob_spec(blob, config), os.path.join(home, "l"))
        cmd = [FUSE_OVERLAYFS, "-o", f"plugins={user_so},fast_ino=1,lowerdir={lower}", mnt]
        r = subprocess.run(["runuser", "-u", TEST_USER, "--", *cmd], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        try:
            # (root itself cannot stat a FUSE mount of another user without allow_other)
            assert wait_until(lambda: _in_proc_mounts(mnt), 10)
            pids = _daemon_pids(mnt)
            with open(f"/proc/{pids[0]}/status") as f:
                status = f.read()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
            caps = re.search(r"^CapEff:\s+(\w+)$", status, re.M).group(1)
            assert set(uids) == {str(uid)}, uids          # real, effective, saved, fs
            assert int(caps, 16) == 0, f"the daemon holds capabilities {caps}"
            r = subprocess.run(["runuser", "-u", TEST_USER, "--", "cat",
                                os.path.join(mnt, "d/f")], capture_output=True, timeout=30)
            assert r.returncode == 0 and r.stdout == b"rootless\n" * 100, r.stderr
            owners = {os.lstat(os.path.join(dp, n)).st_uid
                      for dp, dn, fn in os.walk(home) for n in dn + fn
                      if os.path.join(dp, n) != mnt}
            assert owners == {uid}, f"files owned by {owners} under the user's directory"
        finally:
            subprocess.run(["runuser", "-u", TEST_USER, "--", "fusermount3", "-u", mnt],
                           capture_output=True)
            if _in_proc_mounts(mnt):
                subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _in_proc_mounts(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)
