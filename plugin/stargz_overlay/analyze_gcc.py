"""The files a GCC driver of an image reads to compile and link, found statically.

A ``gcc``/``cc``/``g++``/``c++`` driver (``gcc-12``, ``x86_64-linux-gnu-gcc-12``
...) is matched by name.  Its target triple and version come from the image,
not from running it: the ``usr/lib/gcc/<triple>/<version>/`` and
``usr/libexec/gcc/<triple>/<version>/`` directories that match the driver's
name (triple prefix, ``-N`` suffix) or its ELF machine.  From its options
(``-c``, ``-S``, ``-E``, ``-o``, ``-x``, ``-I``, ``-L``, ``-l``, ``-shared``,
``-static``, ``-nostdlib`` ...) and inputs it infers the stages it runs:

* compile: ``cc1`` (``cc1plus`` for C++) and its ELF closure; the source when it
  is in the image; the headers: ``stdc-predef.h`` and the ``#include`` lines
  of the source (the text a ``printf ... > FILE`` of the same ``sh -c`` wrote,
  or ``<stdio.h>`` when the text cannot be seen), followed transitively
  through the driver's include path (``-I``, gcc's ``include``,
  ``/usr/local/include``, ``include-fixed``, ``/usr/include/<triple>``,
  ``/usr/include``; libstdc++'s directories for C++), ``#include_next`` from
  the next directory on;
* assemble: ``as`` (gcc's own directories, the tool directory, then PATH);
* link: ``collect2``, ``ld`` (``-fuse-ld=``), ``liblto_plugin.so``; the start
  files (``crt1.o`` and ``Scrt1.o`` both, as whether the driver defaults to PIE
  is not known without running it, ``crti.o``, ``crtn.o``, ``crtbegin*.o``,
  ``crtend*.o``), the ``-l`` libraries and the default ones (``libgcc``,
  ``libgcc_s``, ``libc``; ``libstdc++`` and ``libm`` for C++) found as ``ld``
  would (``.so`` then ``.a`` in each ``-L`` and default directory), linker
  scripts (``libc.so``: ``GROUP``/``INPUT``/``AS_NEEDED`` names) and the
  ``DT_NEEDED`` libraries of the shared libraries linked against.

Programs run with their ELF dependencies through the analyzer's own loader.
Knowingly left out, to stay lean and bounded: ``#if`` is not evaluated (a
conditional include that exists is listed, one that does not is skipped), nor
are macro-named includes and ``-include``/``-imacros`` files; at most
``MAX_HEADERS`` headers; ``lto-wrapper`` and ``lto1`` only with ``-flto``;
message catalogs, locale files and ``specs`` (read only under a non-C locale
or when present); ``-B``, ``--sysroot``, ``-specs``, ``GCC_EXEC_PREFIX`` and
``COMPILER_PATH``; the program the command builds (it is not in the image).
"""

import posixpath
import re

MAX_HEADERS = 400
MAX_INCLUDE_DEPTH = 40
MAX_HEADER_BYTES = 1 << 20
MAX_SCRIPT_BYTES = 1 << 16
MAX_LINK_FILES = 200

GCC_NAME = re.compile(r"(?:(?P<triple>[\w.]+(?:-[\w.]+)*)-)?(?P<driver>gcc|cc|g\+\+|c\+\+)"
                      r"(?:-(?P<version>\d+(?:\.\d+)*))?\Z")
C_SUFFIXES = {".c", ".i", ".h"}
CXX_SUFFIXES = {".cc", ".cp", ".cxx", ".cpp", ".CPP", ".c++", ".C", ".ii", ".hh", ".hpp"}
ASM_SUFFIXES = {".s": False, ".S": True, ".sx": True}       # -> preprocessed first
LANGUAGES = {"c": "c", "c-header": "c", "cpp-output": "c", "c++": "c++", "c++-header": "c++",
             "c++-cpp-output": "c++", "assembler": "asm", "assembler-with-cpp": "asm-cpp"}
# options whose value is the next argument
TAKES_ARG = {"-o", "-x", "-I", "-L", "-l", "-include", "-imacros", "-isystem", "-idirafter",
             "-iquote", "-iprefix", "-iwithprefix", "-MF", "-MT", "-MQ", "-Xlinker",
             "-Xassembler", "-Xpreprocessor", "-u", "-T", "-e", "-aux-info", "-B", "-D", "-U",
             "-specs", "-isysroot", "-imultilib", "-dumpbase", "-dumpdir"}
INCLUDE_RE = re.compile(rb'^[ \t]*#[ \t]*(include_next|include|import)[ \t]*([<"])([^>"\n]+)[>"]',
                        re.M)
SCRIPT_GROUP_RE = re.compile(r"\b(?:GROUP|INPUT)\s*\(")


def is_driver(name):
    return GCC_NAME.match(name) is not None


class Options:
    """What the driver will do: stages, inputs and the options that change the files read."""

    def __init__(self, args):
        self.sources = []             # (path, language) compiled or assembled
        self.objects = []             # other inputs, handed to the linker
        self.libs = []                # -l NAME, in order
        self.include_dirs = []
        self.quote_dirs = []
        self.lib_dirs = []
        self.flags = set()
        self.fuse_ld = None
        language = None
        i = 0
        while i < len(args):
            a = args[i]
            i += 1
            opt, value = _split_option(a)
            if opt is not None and value is None:
                value = args[i] if i < len(args) else ""
                i += 1
            if opt == "-x":
                language = None if value == "none" else LANGUAGES.get(value, "other")
            elif opt in ("-I", "-isystem", "-idirafter"):
                self.include_dirs.append(value)
            elif opt == "-iquote":
                self.quote_dirs.append(value)
            elif opt == "-L":
                self.lib_dirs.append(value)
            elif opt == "-l":
                self.libs.append(value)
            elif a in TAKES_ARG:
                i += 1
            elif a.startswith("-fuse-ld="):
                self.fuse_ld = a.partition("=")[2]
            elif a.startswith("-") and a != "-":
                self.flags.add(a)
            else:
                lang = language or _language(a)
                if lang is None:
                    self.objects.append(a)
                else:
                    self.sources.append((a, lang))

    @property
    def links(self):
        return not self.flags & {"-c", "-S", "-E", "-M", "-MM", "-fsyntax-only"}

    @property
    def assembles(self):
        return not self.flags & {"-S", "-E", "-M", "-MM", "-fsyntax-only"}


def _split_option(a):
    """``(option, value)`` for the options this module reads; value None: the next word."""
    for opt in ("-iquote", "-isystem", "-idirafter"):
        if a == opt:
            return opt, None
    for opt in ("-I", "-L", "-l", "-x"):
        if a.startswith(opt):
            return opt, a[len(opt):] or None
    return None, None


def _language(path):
    suffix = posixpath.splitext(path)[1]
    if suffix in C_SUFFIXES:
        return "c"
    if suffix in CXX_SUFFIXES:
        return "c++"
    if suffix in ASM_SUFFIXES:
        return "asm-cpp" if ASM_SUFFIXES[suffix] else "asm"
    return None


def _version_key(name):
    return tuple(int(p) if p.isdigit() else -1 for p in name.split("."))


class GccCompile:
    """Adds what one run of a GCC driver reads to an Analyzer."""

    def __init__(self, an, loader, node, argv, depth):
        self.an = an
        self.fs = an.fs
        self.loader = loader          # the driver's Loader (liblto_plugin.so is dlopened)
        self.node = node
        self.argv = argv
        self.depth = depth
        name = GCC_NAME.match(posixpath.basename(argv[0])) or \
            GCC_NAME.match(posixpath.basename(node.path))
        self.name = name
        self.cxx = "++" in name.group("driver")
        self.triple = self.version = None
        self.lib = self.libexec = None
        self.headers = 0
        self.missing_headers = 0
        self.dirs = []                # the linker's search path
        self.linked = set()

    def run(self):
        opts = Options(self.argv[1:])
        if not opts.sources and not opts.objects:
            return                    # --version, -dumpmachine ...: the driver alone
        if not self._find_dirs():
            return
        self.an.note(f"{self.node.path}: GCC {self.version} for {self.triple} "
                     f"({self.lib}, {self.libexec})")
        for path, lang in opts.sources:
            if lang in ("c", "c++", "asm-cpp"):
                self._compile(path, lang, opts)
            if opts.assembles and lang != "other":
                self._program(self._tool("as"), "assembler run by gcc")
        if opts.links:
            self._link(opts)
        if self.missing_headers:
            self.an.note(f"gcc: {self.missing_headers} #include names not found in the "
                         f"image (conditional includes are not evaluated)")

    # -- where the driver's files are -----------------------------------------
    def _find_dirs(self):
        info = self.an.elf(self.node)
        arch = (info.triplet if info else "").split("-")[0]
        wanted_triple = self.name.group("triple")
        best = None
        for top in ("/usr/libexec/gcc", "/usr/lib/gcc"):
            for triple in self.fs.listdir(top):
                if wanted_triple and triple != wanted_triple:
                    continue
                if not wanted_triple and arch and not triple.startswith(arch):
                    continue
                for version in self.fs.listdir(f"{top}/{triple}"):
                    if not self._version_matches(version):
                        continue
                    rank = (triple == (info.triplet if info else None), _version_key(version))
                    if best is None or rank > best[0]:
                        best = (rank, triple, version)
        if best is None:
            self.an.problem(f"{self.node.path}: no usr/lib/gcc/<triple>/<version> directory "
                            f"in the image for this driver; its compile cannot be followed")
            return False
        _, self.triple, self.version = best
        self.lib = f"/usr/lib/gcc/{self.triple}/{self.version}"
        libexec = f"/usr/libexec/gcc/{self.triple}/{self.version}"
        self.libexec = libexec if self.fs.is_dir(libexec) else self.lib
        return True

    def _version_matches(self, version):
        wanted = self.name.group("version")
        if not re.match(r"\d", version):
            return False
        return not wanted or version == wanted or version.startswith(wanted + ".")

    def _tool(self, name, *alternatives):
        """A program as the driver finds it: its own directories, the tool directory, PATH."""
        dirs = [self.libexec, posixpath.dirname(self.libexec), self.lib,
                posixpath.dirname(self.lib), f"/usr/{self.triple}/bin"]
        for candidate in alternatives + (name,):
            for d in dirs:
                node = self.fs.lookup(f"{d}/{candidate}")
                if node is not None and node.type == "reg" and node.entry.mode & 0o111:
                    return f"{d}/{candidate}"
        return name

    def _program(self, path, why):
        self.an.exec([path], why, self.depth + 1)

    # -- compile ------------------------------------------------------------
    def _compile(self, source, lang, opts):
        cxx = lang == "c++" or (self.cxx and source.endswith(".c"))    # g++ x.c is C++
        cc1 = "cc1plus" if cxx else "cc1"
        self._program(f"{self.libexec}/{cc1}", f"compiler proper run by gcc for {source}")
        path = posixpath.normpath(posixpath.join(self.an.cwd, source))
        text = self.an.written.get(path)
        if text is not None:
            text = text.encode("utf-8", "surrogateescape")
            where = f"{path} (written by the command)"
        else:
            node = self.fs.lookup(path)
            if node is not None and node.type == "reg":
                self.an.record(node, "source compiled by gcc")
                text = self.an.read(node, 0, min(node.size, MAX_HEADER_BYTES))
                where = path
            else:
                self.an.note(f"gcc: cannot see the text of {path}; assuming it includes "
                             f"<stdio.h>")
                text, where = b"#include <stdio.h>\n", path
        dirs = self._include_dirs(opts, cxx)
        quote = [posixpath.normpath(posixpath.join(self.an.cwd, d)) for d in opts.quote_dirs]
        seen = set()
        if "-nostdinc" not in opts.flags and "-ffreestanding" not in opts.flags:
            self._include(b"#include <stdc-predef.h>\n", "gcc (implicit -include)", None,
                          quote, dirs, None, seen, 0)
        self._include(text, where, posixpath.dirname(path), quote, dirs, None, seen, 0)

    def _include_dirs(self, opts, cxx):
        dirs = [posixpath.normpath(posixpath.join(self.an.cwd, d)) for d in opts.include_dirs]
        if "-nostdinc" in opts.flags:
            return dirs
        if cxx and "-nostdinc++" not in opts.flags:
            major = self.version.split(".")[0]
            for version in dict.fromkeys((self.version, major)):
                dirs += [f"/usr/include/c++/{version}",
                         f"/usr/include/{self.triple}/c++/{version}",
                         f"/usr/include/c++/{version}/backward"]
        dirs += [f"{self.lib}/include", "/usr/local/include", f"{self.lib}/include-fixed",
                 f"/usr/include/{self.triple}", "/usr/include"]
        return [d for d in dict.fromkeys(dirs) if self.fs.is_dir(d)]

    def _include(self, text, where, here, quote, dirs, after, seen, depth):
        """Follow the #include lines of ``text``, a file in directory ``here`` (found in
        ``dirs[after]`` when it is a header on the include path)."""
        if depth > MAX_INCLUDE_DEPTH:
            self.an.problem(f"gcc: #include nesting deeper than {MAX_INCLUDE_DEPTH} at {where}")
            return
        for m in INCLUDE_RE.finditer(text):
            if self.headers >= MAX_HEADERS:
                self.an.problem(f"gcc: more than {MAX_HEADERS} headers; stopped")
                return
            name = m.group(3).decode("utf-8", "replace").strip()
            if m.group(1) == b"include_next" and after is not None:
                candidates = list(enumerate(dirs))[after + 1:]
            else:
                candidates = list(enumerate(dirs))
                if m.group(2) == b'"':
                    local = ([here] if here else []) + quote
                    candidates = [(None, d) for d in local] + candidates
            for index, d in candidates:
                path = posixpath.normpath(posixpath.join(d, name))
                node = self.fs.lookup(path)
                if node is None or node.type != "reg":
                    continue
                if node.path not in seen:
                    seen.add(node.path)
                    self.headers += 1
                    self.an.record(node, f"header #included by {where} (gcc)")
                    body = self.an.read(node, 0, min(node.size, MAX_HEADER_BYTES))
                    self._include(body, path, posixpath.dirname(path), quote, dirs, index,
                                  seen, depth + 1)
                break
            else:
                self.missing_headers += 1

    # -- link ---------------------------------------------------------------
    def _link(self, opts):
        self._program(self._tool("collect2"), "linker wrapper run by gcc")
        ld = f"ld.{opts.fuse_ld}" if opts.fuse_ld else "ld"
        self._program(self._tool(ld, "real-ld", "collect-ld"), "linker run by collect2")
        if "-fno-use-linker-plugin" not in opts.flags:
            plugin = self.fs.lookup(f"{self.libexec}/liblto_plugin.so")
            if plugin is not None and plugin.type == "reg":
                self.an.record(plugin, "linker plugin loaded by ld (gcc)")
                self.loader.load_library(plugin, "linker plugin loaded by ld (gcc)")
        if any(f.startswith("-flto") for f in opts.flags):
            self._program(self._tool("lto-wrapper"), "LTO driver run by collect2")
            self._program(f"{self.libexec}/lto1", "LTO compiler run by lto-wrapper")
        self.dirs = [posixpath.normpath(posixpath.join(self.an.cwd, d)) for d in opts.lib_dirs]
        self.dirs += [d for d in dict.fromkeys(posixpath.normpath(d) for d in (
            self.lib, f"{self.lib}/../../../{self.triple}", f"{self.lib}/../../../../lib64",
            f"/lib/{self.triple}", "/lib64", f"/usr/lib/{self.triple}", "/usr/lib64",
            f"{self.lib}/../../..", "/lib", "/usr/lib", "/usr/local/lib")) if self.fs.is_dir(d)]
        nostart = opts.flags & {"-nostdlib", "-nostartfiles"}
        static = "-static" in opts.flags
        shared = "-shared" in opts.flags
        if not nostart:
            starts = ["crti.o"]
            if shared:
                starts += ["crtbeginS.o"]
            elif static:
                starts[:0] = ["crt1.o"]
                starts += ["crtbeginT.o"]
            else:
                starts[:0] = ["Scrt1.o", "crt1.o"]
                starts += ["crtbeginS.o", "crtbegin.o"]
            for name in starts:
                self._link_file(name, "start file linked by gcc")
        for obj in opts.objects:
            node = self.fs.lookup(posixpath.normpath(posixpath.join(self.an.cwd, obj)))
            if node is not None and node.type == "reg":
                self._linked(node, f"linked by gcc ({obj})", 0)
        libs = list(opts.libs)
        if not opts.flags & {"-nostdlib", "-nodefaultlibs"}:
            if self.cxx:
                libs += ["stdc++", "m"]
            gcc_s = [] if static or "-static-libgcc" in opts.flags else ["gcc_s"]
            libs += ["gcc"] + (["gcc_eh"] if static else gcc_s) + ["c"]
        for name in dict.fromkeys(libs):
            self._library(name, static, "library linked by gcc")
        if not nostart:
            ends = ["crtendS.o"] if shared or not static else []
            ends += [] if shared else ["crtend.o"]
            for name in ends + ["crtn.o"]:
                self._link_file(name, "end file linked by gcc")

    def _search(self, *names):
        """The first regular file of ``names`` in the linker's search path (each
        directory in turn, the names in the order given), or None."""
        for d in self.dirs:
            for name in names:
                node = self.fs.lookup(f"{d}/{name}")
                if node is not None and node.type == "reg":
                    return node
        return None

    def _link_file(self, name, why):
        node = self._search(name)
        if node is not None:
            self._linked(node, f"{why} ({name})", 0)
        return node

    def _library(self, name, static, why):
        """``-lNAME`` as ld searches it: each directory, ``.so`` then ``.a``."""
        if name.startswith(":"):
            if self._link_file(name[1:], why) is None:
                self.an.note(f"gcc: -l{name} is not in the linker's search path")
            return
        node = self._search(*(f"lib{name}{suffix}"
                              for suffix in ((".a",) if static else (".so", ".a"))))
        if node is None:
            self.an.problem(f"gcc: -l{name} is not in the linker's search path of the image")
            return
        self._linked(node, f"{why} (-l{name})", 0)

    def _linked(self, node, why, depth):
        """A file ld reads: an object, archive, shared library or linker script."""
        if node.path in self.linked or len(self.linked) >= MAX_LINK_FILES or depth > 4:
            return
        self.linked.add(node.path)
        self.an.record(node, why)
        head = self.an.read(node, 0, min(node.size, 64))
        if head.startswith(b"\x7fELF"):
            info = self.an.elf(node)
            if info is None or not info.dynamic or info.type != 3:
                return
            for needed in info.needed:       # ld opens them to resolve symbols
                lib = self._search(needed)
                if lib is not None:
                    self._linked(lib, f"DT_NEEDED {needed} of {node.path}, read by ld",
                                 depth + 1)
        elif not head.startswith(b"!<arch>") and node.size <= MAX_SCRIPT_BYTES:
            text = self.an.read(node, 0, node.size).decode("utf-8", "replace")
            for name in linker_script_inputs(text):
                if name.startswith("-l"):
                    self._library(name[2:], False, f"named by the linker script {node.path}")
                elif name.startswith("/"):
                    target = self.fs.lookup(name)
                    if target is not None and target.type == "reg":
                        self._linked(target, f"named by the linker script {node.path}",
                                     depth + 1)
                    else:
                        self.an.problem(f"{name} (named by the linker script {node.path}) "
                                        f"is not in the image")
                else:
                    found = self._link_file(name, f"named by the linker script {node.path}")
                    if found is None:
                        self.an.problem(f"{name} (named by the linker script {node.path}) "
                                        f"is not in the linker's search path")


def linker_script_inputs(text):
    """File names and ``-l`` options in the ``GROUP``/``INPUT`` commands of a linker script."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    names = []
    for m in SCRIPT_GROUP_RE.finditer(text):
        level, i = 1, m.end()
        while i < len(text) and level:
            level += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        body = text[m.end():i - 1]
        names += [w for w in re.split(r"[\s(),]+", body) if w and w != "AS_NEEDED"]
    return names
