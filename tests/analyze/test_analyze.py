"""Static startup analysis of an image made of this machine's python3.11, checked
against the host's own ``ldd`` and against what the real interpreter imports."""

import json
import os
import re

import pytest

from stargz_overlay import cli
from stargz_overlay.analyze import analyze_image
from stargz_overlay.image_convert import open_endpoint
from stargz_overlay.image_fs import LayerOpener, image_manifests

from .imagebuilder import (DIST, JSON_EXT, PROBES, PYTHON, STDLIB, TAG, ldd, write_image)

def analyze(spec, **kw):
    results = analyze_image(open_endpoint(spec), note=lambda text: None, **kw)
    assert len(results) == 1
    return results[0]


def regular(result):
    return [f.path for f in result.files if f.kind == "file"]


def loaded_by(result, program):
    """Files loaded because ``program`` names them (directly), ld.so included."""
    return {f.path for f in result.files if f.kind == "file" and (
        f.reason == f"ELF interpreter (PT_INTERP) of {program}"
        or (f.reason.startswith("DT_NEEDED ") and f" of {program} (" in f.reason))}


def test_elf_dependencies_match_ldd(image):
    spec, digests = image
    res = analyze(spec)
    assert res.argv == ["python3", "-c", "import json, mylib"]
    expected = {os.path.realpath(p) for p in ldd(PYTHON)}          # ld.so included
    assert loaded_by(res, PYTHON) == expected
    found = set(regular(res))
    assert {os.path.realpath(p) for p in ldd(JSON_EXT)} <= found
    order = regular(res)
    assert order[0] == PYTHON                                     # the binary, then ld.so
    assert order[1] == os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    libc = order.index(os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6"))
    assert libc < order.index(f"{STDLIB}/encodings/__pycache__/__init__.{TAG}.pyc")
    links = {f.path: f for f in res.files if f.kind == "symlink"}
    assert {"/usr/bin/python3", "/lib64", "/usr/lib64/ld-linux-x86-64.so.2"} <= set(links)
    assert all(f.layer == 0 and f.digest == digests[0] for f in links.values())
    reasons = {f.path: f.reason for f in res.files}
    assert reasons[PYTHON] == "entrypoint: 'python3' found as /usr/bin/python3 through PATH"
    assert "via /etc/ld.so.conf.d/x86_64-linux-gnu.conf" in \
        reasons[os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")]
    assert "/etc/ld.so.cache" in found
    # the hostile ELF files first in the search path are reported, and skipped
    bad = [p for p in res.problems if "not a valid ELF file" in p]
    assert len(bad) == 2
    assert any(p.startswith("/usr/local/lib/libz.so.1: not a valid ELF file: program header "
                            "table at offset 64") for p in bad)
    assert any(p.startswith("/usr/local/lib/libexpat.so.1: ") and "1152921504606846976" in p
               for p in bad)
    assert not any(f.startswith("/usr/local/lib/lib") for f in found)


def test_runpath_origin_matches_ldd(image, built):
    demo = built[2]["demo"]
    if demo is None:
        pytest.skip("gcc is not installed (it builds the $ORIGIN RUNPATH program)")
    res = analyze(image[0], entrypoint=["/opt/demo/bin/demo"])
    assert res.argv == ["/opt/demo/bin/demo"]                       # Cmd dropped
    root = os.path.realpath(demo)
    expected = set()
    for path in ldd(f"{demo}/bin/demo") + ldd(f"{demo}/lib/libdemo.so.1"):
        real = os.path.realpath(path)
        expected.add("/opt/demo" + real[len(root):] if real.startswith(root + "/") else real)
    got = {f.path for f in res.files if f.kind == "file" and f.path != "/opt/demo/bin/demo"}
    assert got == expected | {"/etc/ld.so.cache"}
    reasons = {f.path: f.reason for f in res.files}
    assert reasons["/opt/demo/lib/libdemo.so.1"] == (
        "DT_NEEDED libdemo.so.1 of /opt/demo/bin/demo (found in /opt/demo/lib via DT_RUNPATH "
        "of /opt/demo/bin/demo)")
    libm = os.path.realpath("/lib/x86_64-linux-gnu/libm.so.6")
    assert reasons[libm].startswith("DT_NEEDED libm.so.6 of /opt/demo/lib/libdemo.so.1")
    assert [f.layer for f in res.files if f.path.startswith("/opt/demo")] == [1, 1]


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_python_imports_match_the_real_interpreter(image, built, probe):
    """Exactly the stdlib files that python3.11 reads for the same command."""
    truth = built[2]["truth"][probe]
    res = analyze(image[0], args=["-S", *probe.split(" ", 1)])
    expected = set()
    for name, (origin, cached) in truth.items():
        if not origin or not origin.startswith(STDLIB + "/"):
            continue                      # built in or frozen
        if name == "encodings.aliases":
            expected.add(origin)          # rewritten in the upper layer: its .pyc is stale
        elif cached and os.path.exists(cached):
            expected.add(cached)
        else:
            expected.add(origin)
    if probe.startswith("-m "):           # runpy runs it without putting it in sys.modules
        expected.add(f"{STDLIB}/json/__pycache__/tool.{TAG}.pyc")
    got = {p for p in regular(res) if p.startswith(STDLIB + "/")}
    assert got == expected
    layers = {f.path: f.layer for f in res.files}
    assert layers[f"{STDLIB}/encodings/aliases.py"] == 1
    frozen = next(n for n in res.notes if "frozen into the interpreter" in n)
    assert "codecs" in frozen and "io" in frozen


def test_site_pth_whiteouts_and_script_imports(image):
    res = analyze(image[0])
    found = {f.path: f for f in res.files}
    assert found[f"/{DIST}/good.pth"].layer == 1
    assert found[f"/{DIST}/goodmod.py"].reason == (
        f"module goodmod, imported by .pth file /{DIST}/good.pth")
    assert f"{STDLIB}/__pycache__/keyword.{TAG}.pyc" in found      # imported by goodmod
    assert f"/{DIST}/extra_dir/from_extra.py" in found            # a dir added by good.pth
    assert f"/{DIST}/evil.pth" not in found                       # whited out in layer 1
    assert not any("hidden_mod" in p or "decoy" in p or "stale" in p for p in found)
    assert found["/app/mylib.py"].layer == 1                      # /app is opaque in layer 1
    assert found["/app/mylib.py"].reason == "module mylib, imported by -c code"
    assert found["/app/helper.py"].reason == "module helper, imported by /app/mylib.py"
    assert f"{STDLIB}/encodings/__pycache__/aliases.{TAG}.pyc" not in found
    assert found[f"{STDLIB}/encodings/aliases.py"].layer == 1
    order = regular(res)
    if os.path.exists("/usr/lib/locale/C.utf8/LC_CTYPE"):
        assert "Python coerces the C locale" in found["/usr/lib/locale/C.utf8/LC_CTYPE"].reason
        assert order.index("/usr/lib/locale/C.utf8/LC_CTYPE") < \
            order.index(f"{STDLIB}/encodings/__pycache__/__init__.{TAG}.pyc")
    assert order.index(f"/{DIST}/good.pth") < order.index(
        f"{STDLIB}/json/__pycache__/__init__.{TAG}.pyc") < order.index("/app/mylib.py")
    frozen = next(n for n in res.notes if "frozen into the interpreter" in n)
    assert "site" in frozen and "os" in frozen
    assert f"{STDLIB}/site.py" not in found and f"{STDLIB}/os.py" not in found
    # -X frozen_modules=off: site.py and os.py are read from disk
    res = analyze(image[0], args=["-X", "frozen_modules=off", "-c", "pass"])
    order = regular(res)
    for module in ("site", "os", "codecs", "posixpath", "_collections_abc", "_sitebuiltins"):
        assert f"{STDLIB}/__pycache__/{module}.{TAG}.pyc" in order, module
    assert order.index(f"{STDLIB}/encodings/__pycache__/__init__.{TAG}.pyc") < \
        order.index(f"{STDLIB}/__pycache__/site.{TAG}.pyc")


def test_merged_view_of_the_test_image(image):
    endpoint = open_endpoint(image[0])
    with LayerOpener(endpoint, note=lambda text: None) as opener:
        (_, manifest), = image_manifests(endpoint)
        fs = opener.open(manifest)
        assert fs.lookup("/app/stale.py") is None
        assert fs.lookup(f"/{DIST}/evil.pth") is None
        assert "good.pth" in fs.listdir(f"/{DIST}") and "evil.pth" not in fs.listdir(f"/{DIST}")
        assert fs.lookup(f"{STDLIB}/encodings/aliases.py").layer.index == 1
        node = fs.resolve("/lib64/ld-linux-x86-64.so.2")
        assert node.path == os.path.realpath("/lib64/ld-linux-x86-64.so.2")
        with open(node.path, "rb") as f:
            assert fs.read(node) == f.read()


def test_shebang_env_script(image):
    res = analyze(image[0], entrypoint=["/app/run"])
    reasons = {f.path: f.reason for f in res.files}
    order = regular(res)
    assert order[0] == "/app/run" and order[1] == "/usr/bin/env"
    assert reasons["/usr/bin/env"] == "#! interpreter of /app/run: /usr/bin/env"
    assert reasons[PYTHON] == "run by /usr/bin/env: 'python3' found as /usr/bin/python3 " \
                              "through PATH"
    assert order.index("/usr/bin/env") < order.index(PYTHON) < order.index("/app/mylib.py")
    assert "/app/fallback_mod.py" in reasons          # its try: import is missing
    assert "/app/helper.py" in reasons and "/app/decoy_lazy.py" not in reasons


def test_sh_c_and_exec_args(image):
    res = analyze(image[0], entrypoint=["/bin/sh", "-c", "cd /app && exec python3 main.py"])
    reasons = {f.path: f.reason for f in res.files}
    dash = os.path.realpath("/bin/dash")
    assert reasons[dash].startswith("entrypoint: /bin/sh")
    assert reasons[PYTHON].startswith(f"command run by {dash} -c")
    assert reasons["/app/main.py"] == f"script run by {PYTHON}"
    assert "/app/mylib.py" in reasons and "/app/fallback_mod.py" in reasons
    res = analyze(image[0], entrypoint=["/app/entry.sh"], args=["python3", "-c", "import helper"])
    reasons = {f.path: f.reason for f in res.files}
    assert reasons[PYTHON].startswith('run by exec "$@" in /app/entry.sh')
    assert "/app/helper.py" in reasons and "/app/mylib.py" not in reasons


def test_every_platform_of_an_index(built, tmp_path):
    low, up, _ = built
    spec, _ = write_image(str(tmp_path / "multi"), "multi", [low, up],
                          platforms=["amd64", "arm64"])
    results = analyze_image(open_endpoint(spec), all_platforms=True, note=lambda t: None)
    assert [r.platform for r in results] == ["linux/amd64", "linux/arm64"]
    assert regular(results[0]) == regular(results[1]) and PYTHON in regular(results[0])
    one = analyze_image(open_endpoint(spec), platform="linux/arm64", note=lambda t: None)
    assert [r.platform for r in one] == ["linux/arm64"]


def test_cli_text_json_paths_and_errors(image, tmp_path, capsys):
    spec = image[0]
    assert cli.main(["analyze", spec, "--json"]) == 0
    out, err = capsys.readouterr()
    doc, = json.loads(out)
    assert doc["platform"] == "linux/amd64" and doc["argv"][0] == "python3"
    assert {"path": PYTHON, "layer": 0, "digest": image[1][0], "kind": "file",
            "reason": "entrypoint: 'python3' found as /usr/bin/python3 through PATH"} \
        in doc["files"]
    assert [la["kind"] for la in doc["layers"]] == ["gzip", "gzip"]
    assert "plain gzip layer (not eStargz): downloading it once" in err
    assert cli.main(["analyze", spec, "--args", "-c 'import helper'"]) == 0
    out, _ = capsys.readouterr()
    assert "[linux/amd64] command: python3 -c import helper" in out
    assert re.search(r" L1  /app/helper\.py +module helper, imported by -c code\n", out)
    assert cli.main(["analyze", spec, "--paths", "--entrypoint", '["/app/run"]']) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[:2] == ["/app/run", "/usr/bin/env"]
    for argv, message in (
            (["analyze", f"oci:{tmp_path}/nothing"], "is not an OCI image layout"),
            (["analyze", "/etc/passwd"], "name images as docker://REF or oci:DIR[:TAG]"),
            (["analyze", spec, "--args", "'unclosed"], "cannot split"),
            (["convert", "/etc/passwd", str(tmp_path / "x"), "--analyze"],
             "--analyze needs an image")):
        assert cli.main(argv) == 1
        _, err = capsys.readouterr()
        assert err.count("\n") == 1 and message in err, err
    assert cli.main(["analyze", spec, "--entrypoint", "/no/such/program"]) == 0
    out, _ = capsys.readouterr()
    assert "problem: entrypoint: /no/such/program is not a file in the image" in out
