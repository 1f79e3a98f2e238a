"""Python import rules: module-level imports only, Linux-only branches, try/except
fallbacks, built-in modules; and the whole standard library against the real interpreter."""

import ast
import os

import pytest

from stargz_overlay.analyze import analyze_image
from stargz_overlay.analyze_python import collect_imports, evaluate
from stargz_overlay.image_convert import open_endpoint

from .imagebuilder import DYNLOAD, PYTHON, STDLIB, Tree, ldd, require_host, truth_modules, \
    write_image


def imports(code, main=False, version=(3, 11)):
    out = []

    def flat(items):
        for item in items:
            if item[0] == "try":
                for part in item[1:]:
                    flat(part)
            else:
                out.append(item[2])
    flat(collect_imports(ast.parse(code), main, version))
    return out


@pytest.mark.parametrize("test,value", [
    ("sys.platform == 'win32'", False), ("sys.platform != 'win32'", True),
    ("_sys.platform.startswith('linux')", True), ("sys.platform in ('darwin', 'win32')", False),
    ("os.name == 'nt'", False), ("os.name == 'posix' and sys.platform == 'linux'", True),
    ("os.name == 'nt' or something()", None), ("not TYPE_CHECKING", True),
    ("typing.TYPE_CHECKING", False), ("sys.version_info >= (3, 11)", True),
    ("sys.version_info < (3, 11)", False), ("sys.version_info >= (3, 12)", False),
    ("sys.version_info[:2] == (3, 11)", None), ("sys.version_info >= (3, 11, 2)", None),
    ("sys.version_info > (2,)", True), ("HAVE_THING", None)])
def test_conditions_known_on_linux(test, value):
    assert evaluate(ast.parse(test, mode="eval").body, (3, 11)) is value


def test_only_code_run_at_import_counts():
    code = """
import a, b.c
from . import d
from e import f as g
if sys.platform == "win32":
    import winreg
else:
    import posix_only
if TYPE_CHECKING:
    import typing_only
try:
    import fast
except ImportError:
    import slow
class K:
    import in_class
def f():
    import in_function
lazy = lambda: __import__("in_lambda")
plugin = __import__("dynamic_const")
with open(x) as h:
    import in_with
if __name__ == "__main__":
    import main_only
"""
    assert imports(code) == ["a", "b.c", None, "e", "posix_only", "fast", "slow", "in_class",
                             "dynamic_const", "in_with"]
    assert imports(code, main=True)[-1] == "main_only"


@pytest.fixture(scope="module")
def stdlib_image(tmp_path_factory):
    """One uncompressed layer: python3.11, its libraries and the whole standard library."""
    require_host()
    tree = Tree()
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        tree.symlink(link, target)
    tree.host(PYTHON)
    tree.symlink("usr/bin/python3", "python3.11")
    libs = set(ldd(PYTHON))
    for root, dirs, files in os.walk(STDLIB):
        dirs[:] = [d for d in dirs if d not in ("test", "site-packages", "dist-packages",
                                                "idlelib", "tkinter", "lib2to3")]
        for name in files:
            path = os.path.join(root, name)
            if os.path.exists(path):
                tree.host(path)
    for name in os.listdir(DYNLOAD):
        libs.update(ldd(os.path.join(DYNLOAD, name)))
    for lib in libs:
        tree.host(lib)
    path = str(tmp_path_factory.mktemp("stdlib"))
    spec, _ = write_image(path, "v1", [tree.tar()], gzip_layers=False)
    return spec


CODE = ("import asyncio, email.message, email.mime.text, http.client, json, logging, "
        "subprocess, ssl, urllib.request, xml.etree.ElementTree, sqlite3, decimal, "
        "dataclasses, argparse, unittest, concurrent.futures, zipfile, tarfile, csv, uuid, "
        "pickle, shelve, tomllib, smtplib, xmlrpc.client, configparser, statistics")


def test_whole_stdlib_matches_the_real_interpreter(stdlib_image):
    """The files python3.11 -S reads for a wide import list, no more and no fewer."""
    truth = truth_modules(CODE)
    result, = analyze_image(open_endpoint(stdlib_image), note=lambda text: None,
                            entrypoint=["python3"], args=["-S", "-c", CODE])
    expected = set()
    for name, (origin, cached) in truth.items():
        if origin and origin.startswith(STDLIB + "/"):
            expected.add(cached if cached and os.path.exists(cached) else origin)
    assert result.problems == []
    got = {f.path for f in result.files if f.kind == "file" and f.path.startswith(STDLIB + "/")}
    assert len(expected) > 150
    assert got - expected == set()
    assert expected - got == set()
