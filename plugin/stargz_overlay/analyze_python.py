"""The files a Python interpreter of an image reads at startup, found statically.

Follows CPython's own startup: ``pyvenv.cfg`` and the prefix landmark
(``lib/pythonX.Y/os.py``) give ``sys.path`` (stdlib, ``lib-dynload``, then
the site directories: Debian's ``dist-packages`` or ``site-packages``, the
user site when enabled, ``.pth`` files and the directories they add); the
locale files glibc's ``setlocale`` opens for the UTF-8 locale Python coerces
to; ``encodings`` (+ ``aliases``, ``utf_8``), ``io``, ``abc``, ``codecs``;
``site`` with ``sitecustomize``/``usercustomize``; then the main code
(``-c CODE``, ``-m MODULE`` or a script) and everything it imports,
transitively.  Imports are read with ``ast`` from module-level code only
(function bodies run later, if at all); ``except ImportError`` fallbacks are
followed only when an import of their ``try`` is missing.  A module that
has a valid ``__pycache__`` file is listed by that file, as CPython reads it
instead of the source.  Modules frozen into the interpreter (3.11+: ``os``,
``site``, ``codecs``, ``io``, ``abc``, ``stat``, ``posixpath`` ...) are not
read from disk and so are not listed (``-X frozen_modules=off`` lists them).
Extension modules (``.cpython-*.so``) bring their ELF dependencies.
"""

import ast
import posixpath
import re
import struct

from .elf import parse_elf
from .errors import StargzError

PYTHON_NAME = re.compile(r"python(\d+(\.\d+)?)?\Z")
MAX_MODULES = 5000
MAX_SOURCE_BYTES = 4 << 20
MAX_IMPORT_DEPTH = 200
FROZEN_311 = frozenset({
    "abc", "codecs", "io", "_collections_abc", "_sitebuiltins", "genericpath", "ntpath",
    "posixpath", "os", "site", "stat", "importlib.util", "importlib.machinery", "runpy",
    "zipimport", "importlib._bootstrap", "importlib._bootstrap_external", "__hello__",
    "__phello__", "__phello__.spam", "__phello__.ham", "__phello__.ham.eggs",
})
CORE_BUILTINS = frozenset({"sys", "builtins", "marshal", "_warnings", "_imp", "_io", "_thread",
                           "_weakref", "posix", "_frozen_importlib",
                           "_frozen_importlib_external"})
# used when the interpreter exports no PyInit_ symbols to read them from
USUAL_BUILTINS = CORE_BUILTINS | {
    "_abc", "_codecs", "_collections", "_functools", "_operator", "_signal", "_sre", "_stat",
    "errno", "itertools", "time", "_locale", "pwd", "atexit", "gc", "_tracemalloc",
    "faulthandler", "_symtable", "_string", "_tokenize"}
# Python modules that C modules of the standard library import when they load
C_MODULE_IMPORTS = {
    "_decimal": ("collections", "collections.abc", "numbers"),
    "_pickle": ("copyreg", "_compat_pickle", "functools"),
    "_elementtree": ("copy", "xml.etree.ElementPath"),
    "_sqlite3": ("collections", "functools"),
    "_zoneinfo": ("datetime", "zoneinfo._common", "zoneinfo._tzpath"),
    "array": ("collections.abc",),
}
KNOWN_STRINGS = {("sys", "platform"): "linux", ("os", "name"): "posix"}
BEFORE_SITE = ("encodings", "encodings.aliases", "encodings.utf_8", "codecs", "io", "abc")
SITE = ("site", "os", "stat", "posixpath", "genericpath", "_collections_abc", "_sitebuiltins")


class Spec:
    """Where a module was found: kind is "source", "bytecode", "extension" or "namespace"."""

    __slots__ = ("name", "kind", "path", "search")

    def __init__(self, name, kind, path, search):
        self.name = name
        self.kind = kind
        self.path = path              # file, or None for a namespace package
        self.search = search          # __path__ of a package, None for a plain module


class Options:
    def __init__(self):
        self.flags = set()
        self.xoptions = []
        self.code = None
        self.module = None
        self.script = None
        self.script_args = []


def parse_options(args):
    """The interpreter options CPython would see in ``args`` (argv[1:])."""
    opts = Options()
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            if i + 1 < len(args):
                opts.script = args[i + 1]
            break
        if a == "-" or not a.startswith("-"):
            if a != "-":
                opts.script = a
                opts.script_args = args[i + 1:]
            break
        if a.startswith("--"):
            i += 2 if a == "--check-hash-based-pycs" else 1
            continue
        j = 1
        done = False
        while j < len(a):
            c = a[j]
            if c in "cmWX":
                value = a[j + 1:]
                if not value:
                    i += 1
                    value = args[i] if i < len(args) else ""
                if c == "c":
                    opts.code, done = value, True
                elif c == "m":
                    opts.module, done = value, True
                elif c == "X":
                    opts.xoptions.append(value)
                break
            opts.flags.add(c)
            j += 1
        if done:
            break
        i += 1
    return opts


class PythonStartup:
    """Adds a Python interpreter's startup reads to an Analyzer."""

    def __init__(self, an, loader, exe, invoked, argv):
        self.an = an
        self.fs = an.fs
        self.loader = loader
        self.exe = exe                # Node of the real executable
        self.invoked = invoked        # path it was executed as (before symlinks)
        self.argv = argv
        self.modules = {}             # name -> Spec or None (missing)
        self.missing = []
        self.frozen_seen = []
        self._listing = {}
        self._stopped = False

    # -- entry ---------------------------------------------------------------
    def run(self):
        an = self.an
        opts = parse_options(self.argv[1:])
        self.opts = opts
        flags = opts.flags
        isolated = "I" in flags
        self.ignore_env = isolated or "E" in flags
        env = {} if self.ignore_env else an.env
        self.version = self._version()
        if self.version is None:
            an.problem(f"{self.exe.path}: cannot tell which Python version it is")
            return
        major, minor = self.version
        self.xy = f"{major}.{minor}"
        self.tag = f"cpython-{major}{minor}"
        triplet = self.loader.main.triplet or "linux-gnu"
        if self.loader.musl:
            triplet = triplet.replace("-gnu", "-musl")
        self.ext_suffixes = [f".{self.tag}-{triplet}.so", ".abi3.so", ".so"]
        frozen_off = "frozen_modules=off" in opts.xoptions
        self.frozen = FROZEN_311 if self.version >= (3, 11) and not frozen_off else frozenset()
        self.builtins = self._builtin_modules()
        self._paths(env)
        if not self.prefix:
            an.problem(f"{self.exe.path}: no Python {self.xy} standard library "
                       f"(lib/python{self.xy}/os.py) found in the image")
            return
        self._locale()
        for name in BEFORE_SITE:
            self.import_module(name, "imported by the interpreter at startup")
        user_site = not (isolated or "s" in flags or env.get("PYTHONNOUSERSITE"))
        if "S" not in flags:
            for name in SITE:
                self.import_module(name, "imported at startup by site")
            self._site(user_site)
        self._main(opts, isolated or "P" in flags or bool(env.get("PYTHONSAFEPATH")))
        self._summary()

    # -- locating the interpreter's files ----------------------------------
    def _version(self):
        for name in (posixpath.basename(self.exe.path), posixpath.basename(self.invoked)):
            m = re.match(r"python(\d)\.(\d+)", name)
            if m:
                return int(m.group(1)), int(m.group(2))
        for name in self.loader.main.needed:
            m = re.match(r"libpython(\d)\.(\d+)", name)
            if m:
                return int(m.group(1)), int(m.group(2))
        found = []
        for prefix in self._ancestors(posixpath.dirname(self.exe.path)) + ["/usr/local", "/usr"]:
            for name in self.fs.listdir(posixpath.join(prefix, "lib")):
                m = re.fullmatch(r"python(\d)\.(\d+)", name)
                if m and self.fs.is_file(posixpath.join(prefix, "lib", name, "os.py")):
                    found.append((int(m.group(1)), int(m.group(2))))
            if found:
                return max(found)
        return None

    def _builtin_modules(self):
        """Modules compiled into the interpreter: its (or libpython's) PyInit_ symbols."""
        names = set()
        nodes = [self.exe] + [self.an.lookup(path) for name, path in self.loader.loaded.items()
                              if path and name.startswith("libpython")]
        for node in nodes:
            if node is None or node.type != "reg":
                continue
            try:
                info = parse_elf(lambda off, n, node=node: self.an.read(node, off, n),
                                 node.size, node.path, symbol_prefix="PyInit_")
            except StargzError:
                continue
            names.update(sym[len("PyInit_"):] for sym in info.symbols)
        if not names:
            self.an.note(f"{self.exe.path} exports no PyInit_ symbols; assuming the usual "
                         f"built-in modules")
            return USUAL_BUILTINS
        return frozenset(names) | CORE_BUILTINS

    @staticmethod
    def _ancestors(path):
        out = []
        while True:
            out.append(path)
            if path == "/":
                return out
            path = posixpath.dirname(path)

    def _paths(self, env):
        fs = self.fs
        xy = self.xy
        self.venv = None
        home = None
        include_system = True
        invoked_dir = posixpath.dirname(self.invoked)
        for d in (invoked_dir, posixpath.dirname(invoked_dir)):
            node = fs.lookup(posixpath.join(d, "pyvenv.cfg"))
            if node is not None and node.type == "reg":
                self.an.record(node, f"virtual environment of {self.invoked} (pyvenv.cfg)")
                text = self._text(node)
                for line in text.splitlines():
                    key, sep, value = line.partition("=")
                    if not sep:
                        continue
                    key, value = key.strip().lower(), value.strip()
                    if key == "home":
                        home = value
                    elif key == "include-system-site-packages":
                        include_system = value.lower() == "true"
                self.venv = d
                break
        self.include_system = include_system
        starts = self._ancestors(home or posixpath.dirname(self.exe.path))
        pythonhome = env.get("PYTHONHOME")
        if pythonhome:
            starts = [pythonhome.split(":")[0]]
        self.prefix = None
        self.libdir = "lib"
        for d in starts + ["/usr/local", "/usr"]:
            for libdir in ("lib", "lib64"):
                stdlib = posixpath.join(d, libdir, f"python{xy}")
                if fs.is_file(f"{stdlib}/os.py") or fs.is_file(f"{stdlib}/os.pyc"):
                    self.prefix, self.libdir = d, libdir
                    break
            if self.prefix:
                break
        if not self.prefix:
            return
        self.stdlib = posixpath.join(self.prefix, self.libdir, f"python{xy}")
        path = []
        if not self.ignore_env:
            for d in (env.get("PYTHONPATH") or "").split(":"):
                if d:
                    path.append(posixpath.normpath(posixpath.join(self.an.cwd, d)))
        major, minor = self.version
        path.append(posixpath.join(self.prefix, self.libdir, f"python{major}{minor}.zip"))
        path.append(self.stdlib)
        for libdir in (self.libdir, "lib64", "lib"):
            dynload = posixpath.join(self.prefix, libdir, f"python{xy}", "lib-dynload")
            if fs.is_dir(dynload):
                path.append(dynload)
                break
        self.sys_path = [p for p in path if fs.is_dir(p)]

    def _text(self, node, limit=MAX_SOURCE_BYTES):
        data = self.an.read(node, 0, min(node.size, limit))
        return data.decode("utf-8", "replace")

    def _locale(self):
        """glibc's setlocale(LC_CTYPE, "") for the locale Python ends up with; the zone."""
        an, fs, env = self.an, self.fs, self.an.env
        if not self.loader.musl:
            name = env.get("LC_ALL") or env.get("LC_CTYPE") or env.get("LANG") or ""
            if name in ("", "C", "POSIX"):
                names = [] if env.get("PYTHONCOERCECLOCALE") == "0" else \
                    ["C.UTF-8", "C.utf8", "UTF-8"]
                why = "Python coerces the C locale to C.UTF-8"
            else:
                names = [name]
                why = f"locale {name} from the environment"
            for locale_name in names:
                node = None
                for candidate in self._locale_variants(locale_name):
                    node = fs.lookup(f"/usr/lib/locale/{candidate}/LC_CTYPE")
                    if node is not None and node.type == "reg":
                        break
                    node = None
                if node is None and fs.is_file("/usr/lib/locale/locale-archive"):
                    node = fs.lookup("/usr/lib/locale/locale-archive")
                if node is not None:
                    alias = fs.lookup("/usr/share/locale/locale.alias")
                    if alias is not None and alias.type == "reg":
                        an.record(alias, f"read by glibc setlocale() ({why})")
                    an.record(node, f"LC_CTYPE data for setlocale() ({why})")
                    self._gconv(why)
                    break
        if "TZ" not in env:
            node = fs.lookup("/etc/localtime")
            if node is not None and node.type == "reg":
                an.record(node, "time zone, read when the interpreter initialises time")

    @staticmethod
    def _locale_variants(name):
        out = [name]
        lang, dot, rest = name.partition(".")
        if dot:
            codeset, at, modifier = rest.partition("@")
            norm = re.sub(r"[^a-z0-9]", "", codeset.lower())
            if norm.isdigit():
                norm = "iso" + norm
            out.append(f"{lang}.{norm}{at}{modifier}")
        return out

    def _gconv(self, why):
        triplet = self.loader.main.triplet
        dirs = [posixpath.join(self.loader.libc_dir, "gconv")] if self.loader.libc_dir else []
        if triplet:
            dirs.append(f"/usr/lib/{triplet}/gconv")
        dirs += ["/usr/lib64/gconv", "/usr/lib/gconv"]
        for d in dirs:
            node = self.fs.lookup(f"{d}/gconv-modules.cache")
            if node is not None and node.type == "reg":
                self.an.record(node, f"glibc character set conversion cache ({why})")
                return

    # -- site ----------------------------------------------------------------
    def _site_dirs(self, user_site):
        fs, xy = self.fs, self.xy
        dirs = []
        if self.venv:
            dirs.append(posixpath.join(self.venv, "lib", f"python{xy}", "site-packages"))
            if not self.include_system:
                return [d for d in dirs if fs.is_dir(d)]
            user_site = False
        if user_site:
            home = self.an.env.get("HOME") or "/root"
            dirs.append(posixpath.join(home, ".local", "lib", f"python{xy}", "site-packages"))
        site_py = fs.lookup(posixpath.join(self.stdlib, "site.py"))
        debian = site_py is not None and site_py.type == "reg" and \
            "dist-packages" in self._text(site_py)
        if debian:
            dirs += [f"/usr/local/lib/python{xy}/dist-packages", "/usr/lib/python3/dist-packages",
                     f"/usr/lib/python{xy}/dist-packages"]
        else:
            for libdir in dict.fromkeys((self.libdir, "lib")):
                dirs.append(posixpath.join(self.prefix, libdir, f"python{xy}", "site-packages"))
        out = []
        for d in dirs:
            node = fs.lookup(d)
            if node is not None and node.type == "dir" and node.path not in out:
                out.append(d)
        return out

    def _site(self, user_site):
        for d in self._site_dirs(user_site):
            if d not in self.sys_path:
                self.sys_path.append(d)
            for name in self.fs.listdir(d):
                if not name.endswith(".pth") or name.startswith("."):
                    continue
                node = self.fs.lookup(posixpath.join(d, name))
                if node is None or node.type != "reg":
                    continue
                self.an.record(node, f".pth file processed by site in {d}")
                for line in self._text(node, 1 << 20).splitlines():
                    if not line.strip() or line.startswith("#"):
                        continue
                    if line.startswith(("import ", "import\t")):
                        self._run_code(line, f".pth file {node.path}", node.path)
                        continue
                    extra = posixpath.normpath(posixpath.join(d, line.rstrip()))
                    if self.fs.is_dir(extra) and extra not in self.sys_path:
                        self.sys_path.append(extra)
        self.import_module("sitecustomize", "imported by site (sitecustomize)")
        if user_site:
            self.import_module("usercustomize", "imported by site (usercustomize)")

    # -- the main program -------------------------------------------------------
    def _main(self, opts, safe_path):
        an = self.an
        if opts.code is not None:
            if not safe_path:
                self.sys_path.insert(0, an.cwd)
            self._run_code(opts.code, "-c code", None, main=True)
        elif opts.module is not None:
            if not safe_path:
                self.sys_path.insert(0, an.cwd)
            self.import_module("runpy", f"runs -m {opts.module}")
            self._run_module(opts.module)
        elif opts.script is not None:
            path = posixpath.normpath(posixpath.join(an.cwd, opts.script))
            node = an.lookup(path)
            if node is None or node.type != "reg":
                an.problem(f"{self.exe.path}: script {path} is not in the image")
                return
            if not safe_path:
                self.sys_path.insert(0, posixpath.dirname(node.path))
            an.record(node, f"script run by {self.exe.path}")
            self._run_source(node, None, node.path, main=True)
        else:
            an.note(f"{self.exe.path} runs interactively or from stdin: only its startup "
                    f"modules are known")

    def _run_module(self, name):
        """``-m NAME``: its parents are imported, then it runs as ``__main__``."""
        an = self.an
        parent = name.rpartition(".")[0]
        search = self.sys_path
        if parent:
            pspec = self.import_module(parent, f"parent of the -m module {name}")
            if pspec is None or pspec.search is None:
                an.problem(f"{self.exe.path} -m {name}: no package {parent} in the image")
                return
            search = pspec.search
        spec = self.find_spec(name, search)
        package = parent
        if spec is not None and spec.search is not None:       # a package: its __main__
            self.import_module(name, "package run with -m")
            package = name
            spec = self.find_spec(name + ".__main__", spec.search)
        if spec is None or spec.kind not in ("source", "bytecode"):
            an.problem(f"{self.exe.path} -m {name}: no such module in the image")
            return
        self.modules.setdefault(spec.name, spec)
        node = self._record_module(spec, f"module {spec.name}, run with -m")
        if node is not None and spec.kind == "source":
            self._run_source(node, package, spec.path, main=True)

    def _run_code(self, code, label, path, main=False):
        try:
            tree = ast.parse(code, filename=label)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            self.an.problem(f"cannot parse the Python {label}: {exc}")
            return
        self._follow(collect_imports(tree, main, self.version), None, label, 0)

    # -- modules ---------------------------------------------------------------
    def _names(self, directory):
        names = self._listing.get(directory)
        if names is None:
            names = self._listing[directory] = set(self.fs.listdir(directory))
        return names

    def _is_file(self, directory, name):
        return name in self._names(directory) and \
            self.fs.is_file(posixpath.join(directory, name))

    def find_spec(self, fullname, search):
        base = fullname.rpartition(".")[2]
        suffixes = self.ext_suffixes + [".py", ".pyc"]
        portions = []
        for d in search:
            names = self._names(d)
            if base in names:
                pkg = posixpath.join(d, base)
                for suffix in suffixes:
                    if self._is_file(pkg, "__init__" + suffix):
                        return Spec(fullname, _kind(suffix), posixpath.join(pkg, "__init__" + suffix),
                                    [pkg])
                if self.fs.is_dir(pkg):
                    portions.append(pkg)
            for suffix in suffixes:
                if base + suffix in names and self._is_file(d, base + suffix):
                    return Spec(fullname, _kind(suffix), posixpath.join(d, base + suffix), None)
        if portions:
            return Spec(fullname, "namespace", None, portions)
        return None

    def import_module(self, fullname, reason, depth=0):
        """Import ``fullname`` (and its parents); returns its Spec or None."""
        if fullname in self.modules:
            return self.modules[fullname]
        if len(self.modules) >= MAX_MODULES or depth > MAX_IMPORT_DEPTH:
            if not self._stopped:
                self._stopped = True
                self.an.problem(f"{self.exe.path}: more than {MAX_MODULES} modules or "
                                f"{MAX_IMPORT_DEPTH} nested imports; stopped following imports")
            return None
        if fullname in self.builtins:
            spec = self.modules[fullname] = Spec(fullname, "builtin", None, None)
            for name in C_MODULE_IMPORTS.get(fullname, ()):
                self.import_module(name, f"imported by the built-in module {fullname}", depth + 1)
            return spec
        self.modules[fullname] = None
        parent = fullname.rpartition(".")[0]
        if parent:
            pspec = self.import_module(parent, reason, depth + 1)
            if pspec is None or pspec.search is None:
                return None
            search = pspec.search
        else:
            search = self.sys_path
        spec = self.find_spec(fullname, search)
        if spec is None and fullname in self.frozen:
            spec = Spec(fullname, "frozen", None, None)        # no source in the image
        if spec is None:
            self.missing.append(fullname)
            return None
        self.modules[fullname] = spec
        self._load(spec, f"module {fullname}, {reason}", depth)
        return spec

    def _load(self, spec, reason, depth):
        node = self._record_module(spec, reason)
        if node is None:
            return
        if spec.kind == "extension":
            self.loader.load_library(node, f"extension module {spec.name}")
            for name in C_MODULE_IMPORTS.get(spec.name, ()):
                self.import_module(name, f"imported by the extension module {spec.name}",
                                   depth + 1)
        elif spec.kind == "source":
            package = spec.name if spec.search is not None else spec.name.rpartition(".")[0]
            self._run_source(node, package, spec.path, depth=depth)

    def _record_module(self, spec, reason):
        """Record the file CPython reads for a module; returns the module's Node."""
        an = self.an
        frozen = spec.name in self.frozen
        if frozen:
            self.frozen_seen.append(spec.name)
        if spec.kind in ("namespace", "builtin", "frozen"):
            return None
        node = an.lookup(spec.path)
        if node is None or frozen:
            return node
        if spec.kind == "extension":
            an.record(node, reason)
        elif spec.kind == "bytecode":
            an.record(node, reason + " (bytecode only: its imports are not followed)")
        else:
            directory, base = posixpath.split(spec.path)
            pyc_path = posixpath.join(directory, "__pycache__", f"{base[:-3]}.{self.tag}.pyc")
            pyc = self._valid_pyc(pyc_path, node)
            if pyc is not None:
                an.record(pyc, reason)
                if self._pyc_checks_source(pyc):
                    an.record(node, reason + " (its hash-checked .pyc reads it too)")
            else:
                an.record(node, reason)
        return node

    def _valid_pyc(self, path, source):
        """The Node of a cached .pyc that CPython would use instead of ``source``, or None."""
        node = self.fs.lookup(path)
        if node is None or node.type != "reg" or node.size < 16:
            return None
        try:
            header = self.an.read(node, 0, 16)
        except StargzError as exc:     # a layer read failing is reported, not fatal
            self.an.problem(f"{path}: {exc}")
            return None
        flags, mtime, size = struct.unpack("<III", header[4:16])
        if flags & 1:
            return node               # hash-based: valid unless the source changed
        if mtime == int(source.entry.mtime) & 0xFFFFFFFF and size == source.size & 0xFFFFFFFF:
            return node
        return None

    def _pyc_checks_source(self, pyc):
        flags = struct.unpack("<I", self.an.read(pyc, 4, 4))[0]
        return bool(flags & 1) and bool(flags & 2)

    def _run_source(self, node, package, label, main=False, depth=0):
        if node.size > MAX_SOURCE_BYTES:
            self.an.note(f"{node.path}: larger than {MAX_SOURCE_BYTES} bytes; its imports "
                         f"are not followed")
            return
        source = self.an.read(node)
        try:
            tree = ast.parse(source, filename=node.path)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            self.an.problem(f"cannot parse {node.path} ({exc}); its imports are not followed")
            return
        self._follow(collect_imports(tree, main, self.version), package, label, depth)

    def _follow(self, items, package, label, depth):
        """Import what ``collect_imports`` found; True if every import was found."""
        all_found = True
        for item in items:
            if item[0] == "try":
                _, body, handlers, orelse, final = item
                ok = self._follow(body, package, label, depth)
                if not ok:
                    self._follow(handlers, package, label, depth)
                else:
                    self._follow(orelse, package, label, depth)
                self._follow(final, package, label, depth)
                continue
            _, level, module, names = item
            reason = f"imported by {label}"
            if level:
                if not package:
                    continue          # relative import outside a package
                parts = package.split(".")
                if level - 1 >= len(parts):
                    continue
                base = ".".join(parts[:len(parts) - (level - 1)])
                target = ".".join(x for x in (base, module) if x)
                if not target:
                    continue
            else:
                target = module
            spec = self.import_module(target, reason, depth + 1)
            if spec is None:
                all_found = False
                continue
            if names and spec.search is not None:
                for n in names:
                    if n != "*" and self.find_spec(f"{target}.{n}", spec.search) is not None:
                        self.import_module(f"{target}.{n}", reason, depth + 1)
        return all_found

    def _summary(self):
        an = self.an
        if self.frozen_seen:
            an.note(f"Python {self.xy}: frozen into the interpreter, not read from disk: "
                    f"{', '.join(sorted(set(self.frozen_seen)))}")
        if self.missing:
            shown = sorted(set(self.missing))
            text = ", ".join(shown[:30]) + (f" and {len(shown) - 30} more" if len(shown) > 30
                                            else "")
            an.note(f"Python {self.xy}: imports with no file in the image (built into the "
                    f"interpreter, or optional and absent): {text}")


def _kind(suffix):
    if suffix == ".py":
        return "source"
    if suffix == ".pyc":
        return "bytecode"
    return "extension"


def collect_imports(tree, main, version=None):
    """Imports run when a module's top level executes, as a nested item list.

    Items: ``("import", level, module, names)`` and ``("try", body, handlers,
    orelse, finalbody)``.  Function bodies are skipped; ``if TYPE_CHECKING``
    bodies too; ``if __name__ == "__main__"`` bodies only for the main module;
    tests on ``sys.platform``, ``os.name`` and ``sys.version_info`` (for
    ``version``, ``(major, minor)``) take only the branch they would take on Linux.
    ``__import__("x")`` and ``importlib.import_module("x")`` with a constant count.
    """
    def visit(stmts):
        out = []
        for st in stmts:
            if isinstance(st, ast.Import):
                out.extend(("import", 0, a.name, ()) for a in st.names)
            elif isinstance(st, ast.ImportFrom):
                out.append(("import", st.level or 0, st.module, tuple(a.name for a in st.names)))
            elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for decorator in st.decorator_list:
                    out.extend(_calls(decorator))
            elif isinstance(st, ast.If):
                out.extend(_calls(st.test))
                if _is_main_check(st.test):
                    out.extend(visit(st.body if main else st.orelse))
                    continue
                value = evaluate(st.test, version)
                if value is not False:
                    out.extend(visit(st.body))
                if value is not True:
                    out.extend(visit(st.orelse))
            elif isinstance(st, ast.Try) or type(st).__name__ == "TryStar":
                out.append(("try", visit(st.body),
                            [i for h in st.handlers for i in visit(h.body)],
                            visit(st.orelse), visit(st.finalbody)))
            elif isinstance(st, (ast.With, ast.For, ast.While)):
                out.extend(_calls_of(st))
                out.extend(visit(st.body))
                out.extend(visit(getattr(st, "orelse", [])))
            elif isinstance(st, ast.ClassDef):
                out.extend(visit(st.body))
            elif type(st).__name__ == "Match":
                for case in st.cases:
                    out.extend(visit(case.body))
            else:
                out.extend(_calls(st))
        return out
    return visit(tree.body)


def _dynamic(node):
    """``("import", 0, name, ())`` for ``__import__("x")``/``import_module("x")``, else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.id if isinstance(func, ast.Name) else \
        func.attr if isinstance(func, ast.Attribute) else None
    arg = node.args[0]
    if name in ("__import__", "import_module") and isinstance(arg, ast.Constant) \
            and isinstance(arg.value, str) and arg.value and not arg.value.startswith("."):
        return ("import", 0, arg.value, ())
    return None


def _calls(node):
    """Dynamic imports in an expression or simple statement (not inside lambdas)."""
    out = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        found = _dynamic(n)
        if found:
            out.append(found)
        stack.extend(ast.iter_child_nodes(n))
    return out


def _calls_of(st):
    out = []
    for item in getattr(st, "items", []):
        out.extend(_calls(item.context_expr))
    for attr in ("iter", "test"):
        if getattr(st, attr, None) is not None:
            out.extend(_calls(getattr(st, attr)))
    return out


def evaluate(test, version):
    """True/False for conditions known on Linux (platform, os.name, version, TYPE_CHECKING),
    None when the analysis cannot tell."""
    if isinstance(test, ast.BoolOp):
        values = [evaluate(v, version) for v in test.values]
        decisive = isinstance(test.op, ast.And) is False
        if decisive in values:
            return decisive
        return None if None in values else not decisive
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        value = evaluate(test.operand, version)
        return None if value is None else not value
    if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
            (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
        return False
    if isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute) and \
            test.func.attr in ("startswith", "endswith") and len(test.args) == 1:
        subject = _known_string(test.func.value)
        arg = _constant(test.args[0])
        if subject is not None and isinstance(arg, (str, tuple)):
            return getattr(subject, test.func.attr)(arg)
        return None
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        op = test.ops[0]
        left, right = test.left, test.comparators[0]
        subject = _known_string(left)
        if subject is not None:
            other = _constant(right)
            if isinstance(other, (str, tuple, list, set, frozenset)):
                return _compare(op, subject, other)
            return None
        if version is not None and _is_version_info(left):
            other = _constant(right)
            if isinstance(other, tuple) and other and all(isinstance(x, int) for x in other):
                return _compare_version(op, version, other)
    return None


def _known_string(node):
    """The value of ``sys.platform`` or ``os.name`` (also as ``_sys``/``_os``) on Linux."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return KNOWN_STRINGS.get((node.value.id.lstrip("_"), node.attr))
    return None


def _is_version_info(node):
    return isinstance(node, ast.Attribute) and node.attr == "version_info" and \
        isinstance(node.value, ast.Name) and node.value.id.lstrip("_") == "sys"


def _constant(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _compare(op, a, b):
    table = {ast.Eq: lambda: a == b, ast.NotEq: lambda: a != b,
             ast.In: lambda: a in b, ast.NotIn: lambda: a not in b}
    fn = table.get(type(op))
    try:
        return fn() if fn else None
    except TypeError:
        return None


def _compare_version(op, version, other):
    """sys.version_info (major, minor, unknown micro...) against a constant tuple."""
    head = tuple(other[:2])
    if version[:len(head)] != head:
        a, b = version[:len(head)], head
    elif len(other) <= 2:
        a, b = (0, 1), (0, 0)       # the real version_info is longer: it compares greater
    else:
        return None
    table = {ast.Lt: a < b, ast.LtE: a <= b, ast.Gt: a > b, ast.GtE: a >= b,
             ast.Eq: a == b, ast.NotEq: a != b}
    return table.get(type(op))


def _is_main_check(test):
    if not isinstance(test, ast.Compare) or len(test.ops) != 1 or \
            not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and \
        any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)
