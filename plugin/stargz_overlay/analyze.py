"""Infer the files an image reads at startup, statically, from its config.

Nothing is run.  The command line (Entrypoint + Cmd) is resolved through the
config's PATH and WorkingDir inside the image's merged filesystem; then, as
the kernel and the loaders would: ``#!`` interpreters (``/usr/bin/env NAME``
through PATH), ELF ``PT_INTERP`` and ``DT_NEEDED`` libraries found through the
image's own search paths (``DT_RPATH``/``DT_RUNPATH`` with ``$ORIGIN``,
``LD_LIBRARY_PATH``, ``/etc/ld.so.conf`` and its includes, the default
multiarch directories; musl's ``/etc/ld-musl-ARCH.path``), the first commands
of ``sh -c``, scripts ending in ``exec "$@"``, for Python the modules
imported at startup (see ``analyze_python``) and for a GCC driver what its
compile and link read (see ``analyze_gcc``).

Each file found carries the reason it is needed and the layer that holds it;
``Analysis.by_layer()`` turns the result into per-layer prioritized lists for
the converter.  Files that cannot be understood (a truncated ELF, a script
that does not parse) are reported as problems and the analysis goes on.
"""

import collections
import fnmatch
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field

from .analyze_gcc import GccCompile, is_driver
from .analyze_python import PYTHON_NAME, PythonStartup
from .elf import is_elf, parse_elf
from .errors import DigestMismatch, FormatError, StargzError
from .image_fs import LayerOpener, image_config, image_manifests
from .registry import TOC_DIGEST_ANNOTATION

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENGINE_FILES = ("/etc/passwd", "/etc/group")   # podman/runc resolve the user with them
MAX_EXEC_DEPTH = 8            # nested #! interpreters, env, sh -c, exec "$@"
MAX_ELF_OBJECTS = 2000
MAX_SCRIPT_BYTES = 1 << 20
SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh"}
SHELL_BUILTINS = {"cd", "set", "export", "echo", "true", "false", ":", "source", ".", "test",
                  "[", "trap", "umask", "ulimit", "unset", "wait", "printf", "shift", "read",
                  "local", "readonly", "if", "then", "fi", "else", "for", "do", "done", "while"}
_MUSL_RESERVED = {"libc", "libpthread", "librt", "libm", "libdl", "libutil", "libxnet"}
_REDIRECTIONS = {">", ">>", "<", ">|", "<>", ">&", "<&", "&>"}
_EXEC_ARGS_RE = re.compile(rb'exec\s+(?:"\$@"|"\$\{@\}"|\$@)')


@dataclass
class Finding:
    path: str                 # absolute path in the image, as read (symlinks resolved)
    layer: int                # index of the layer that provides it (0 = bottom)
    digest: str               # that layer's digest
    reason: str
    kind: str = "file"        # "file" or "symlink" (followed on the way to a file)


@dataclass
class LayerSummary:
    index: int
    digest: str
    kind: str                 # "estargz", "stargz", "gzip", "tar", "unreadable"
    fetched: int              # blob bytes read for the analysis
    annotated: bool           # carries a TOC digest annotation (the converter keeps it)


@dataclass
class Analysis:
    platform: str
    argv: list
    files: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    layers: list = field(default_factory=list)

    def by_layer(self):
        """``{layer digest: [path inside the layer, ...]}`` in access order."""
        out = {}
        for f in self.files:
            out.setdefault(f.digest, []).append(f.path.lstrip("/"))
        return out

    def as_dict(self):
        return {"platform": self.platform, "argv": self.argv,
                "files": [vars(f) for f in self.files], "problems": self.problems,
                "notes": self.notes, "layers": [vars(la) for la in self.layers]}


def parse_command(text):
    """``--entrypoint``/``--args`` text: a JSON array, or words split like a shell."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            raise StargzError(f"{text!r} is not a JSON array of strings") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise StargzError(f"{text!r} is not a JSON array of strings")
        return value
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise StargzError(f"cannot split {text!r}: {exc}") from None


def command_line(cfg, entrypoint=None, args=None):
    """argv from the config's Entrypoint and Cmd, with overrides as podman applies them."""
    def as_list(value, what):
        if value is None:
            return []
        if isinstance(value, str):
            return ["/bin/sh", "-c", value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise StargzError(f"image config {what} is not a list of strings")
        return list(value)
    ep = as_list(cfg.get("Entrypoint"), "Entrypoint")
    cmd = as_list(cfg.get("Cmd"), "Cmd")
    if entrypoint is not None:
        ep = list(entrypoint)
        if args is None:
            cmd = []                  # a new entrypoint drops the image's Cmd
    if args is not None:
        cmd = list(args)
    return ep + cmd


def parse_env(items):
    env = {}
    for item in items or ():
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            if sep:
                env[key] = value
    return env


class Analyzer:
    """One static analysis of an image's startup (see the module docstring)."""

    def __init__(self, fs, config, platform="", entrypoint=None, args=None, env=None):
        cfg = (config or {}).get("config") or {}
        self.fs = fs
        self.env = parse_env(cfg.get("Env"))
        self.env.update(parse_env(env))
        self.cwd = cfg.get("WorkingDir") or "/"
        if not self.cwd.startswith("/"):
            self.cwd = "/" + self.cwd
        self.result = Analysis(platform, command_line(cfg, entrypoint, args))
        self._files = collections.OrderedDict()
        self._elf = {}                # real path -> ElfInfo or None (bad)
        self._problems = set()
        self.written = {}             # path -> text a sh -c command wrote (printf/echo > FILE)

    # -- bookkeeping -------------------------------------------------------
    def record(self, node, reason):
        """Add a file (and the symlinks followed to it) to the startup set."""
        for link, layer in node.via:
            key = (layer, link)
            if key not in self._files:
                self._files[key] = Finding(link, layer, self.fs.layers[layer].digest,
                                           f"symlink followed to {node.path}", "symlink")
        key = (node.layer.index, node.path)
        if key not in self._files:
            self._files[key] = Finding(node.path, node.layer.index, node.layer.digest, reason)

    def problem(self, text):
        if text not in self._problems:
            self._problems.add(text)
            self.result.problems.append(text)

    def note(self, text):
        self.result.notes.append(text)

    def read(self, node, offset=0, length=None):
        """File bytes; a file that cannot be read intact is a problem and reads as empty."""
        try:
            return self.fs.read(node, offset, length)
        except (FormatError, DigestMismatch) as exc:
            self.problem(f"{node.path}: cannot be read: {exc}")
            return b""

    def lookup(self, path):
        try:
            return self.fs.resolve(path)
        except StargzError as exc:
            self.problem(str(exc))
            return None

    def elf(self, node):
        """ElfInfo of a regular file, cached; None (and a problem) if it is not valid."""
        if node.path in self._elf:
            return self._elf[node.path]
        info = None
        try:
            info = parse_elf(lambda off, n: self.read(node, off, n), node.size, node.path)
        except StargzError as exc:
            self.problem(f"{exc} (skipped; the analysis goes on)")
        self._elf[node.path] = info
        return info

    # -- running commands ----------------------------------------------------
    def run(self):
        argv = self.result.argv
        if not argv:
            self.problem("the image config has no Entrypoint or Cmd; nothing to analyze")
        else:
            self.exec(argv, "entrypoint", 0)
        for path in ENGINE_FILES:
            node = self.lookup(path) if argv else None
            if node is not None and node.type == "reg":
                self.record(node, "read by the container engine (user and groups) before the "
                                  "command starts")
        self.result.files = list(self._files.values())
        return self.result

    def find_program(self, name):
        """``(node, path used, how)`` for argv[0], or ``(None, None, why not)``."""
        path_dirs = (self.env.get("PATH") or DEFAULT_PATH).split(":")
        if "/" in name:
            path = posixpath.normpath(posixpath.join(self.cwd, name))
            node = self.lookup(path)
            if node is None or node.type != "reg":
                return None, None, f"{path} is not a file in the image"
            return node, path, f"{path}"
        for d in path_dirs:
            if not d:
                d = self.cwd
            path = posixpath.normpath(posixpath.join(self.cwd, d, name))
            node = self.lookup(path)
            if node is not None and node.type == "reg" and node.entry.mode & 0o111:
                return node, path, f"{name!r} found as {path} through PATH"
        return None, None, f"{name!r} is not in any PATH directory of the image " \
                           f"({':'.join(path_dirs)})"

    def exec(self, argv, why, depth):
        if depth > MAX_EXEC_DEPTH:
            self.problem(f"{argv[0]}: more than {MAX_EXEC_DEPTH} nested interpreters; stopped")
            return
        node, path, how = self.find_program(argv[0])
        if node is None:
            self.problem(f"{why}: {how}")
            return
        self.record(node, f"{why}: {how}")
        head = self.read(node, 0, 256)
        if is_elf(head):
            self.exec_elf(node, path, argv, depth)
        elif head.startswith(b"#!"):
            self.exec_script(node, path, argv, head, depth)
        else:
            self.problem(f"{node.path}: neither an ELF executable nor a #! script; "
                         f"cannot tell what it runs")

    def exec_elf(self, node, path, argv, depth):
        info = self.elf(node)
        if info is None:
            return
        loader = Loader(self, node, info)
        loader.start()
        kind = _program_kind(posixpath.basename(argv[0])) or \
            _program_kind(posixpath.basename(node.path))
        if kind == "python":
            PythonStartup(self, loader, node, path, argv).run()
        elif kind == "shell":
            self.shell(node, argv, depth)
        elif kind == "env":
            self.env_command(node, argv[1:], depth)
        elif kind == "gcc":
            GccCompile(self, loader, node, argv, depth).run()

    def exec_script(self, node, path, argv, head, depth):
        line = head[2:].split(b"\n", 1)[0].strip(b" \t\r")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.problem(f"{node.path}: the #! line is not UTF-8")
            return
        interp, _, arg = text.replace("\t", " ").partition(" ")
        arg = arg.strip()
        if not interp:
            self.problem(f"{node.path}: empty #! line")
            return
        self.exec([interp] + ([arg] if arg else []) + [path] + list(argv[1:]),
                  f"#! interpreter of {node.path}", depth + 1)

    def _exec_args(self, script, args, depth):
        """A shell script ending in ``exec "$@"`` runs its arguments."""
        text = self.read(script, 0, min(script.size, MAX_SCRIPT_BYTES))
        if _EXEC_ARGS_RE.search(text):
            self.exec(list(args), f'run by exec "$@" in {script.path}', depth + 1)

    def shell(self, node, argv, depth):
        args = argv[1:]
        while args and args[0].startswith("-") and args[0] != "-c":
            args = args[1:]               # sh -e, sh -x ...
        if len(args) >= 2 and args[0] == "-c":
            self.shell_command(node, args[1], depth)
        elif args and not args[0].startswith("-"):
            script = self.lookup(posixpath.join(self.cwd, args[0]))
            if script is not None and script.type == "reg":
                self.record(script, f"script run by {node.path}")
                self._exec_args(script, args[1:], depth)

    def shell_command(self, shell, text, depth):
        """The commands of ``sh -c TEXT`` that name a program, in order (up to 4)."""
        lex = shlex.shlex(text, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        try:
            tokens = list(lex)
        except ValueError as exc:
            self.problem(f"cannot parse the {shell.path} -c command {text!r}: {exc}")
            return
        commands, current, redirect = [], [], None
        for token in tokens:
            if token in _REDIRECTIONS:
                redirect = token          # the next word is a file, not a command
            elif token and all(c in ";&|()<>" for c in token):
                if current:
                    commands.append(current)
                current, redirect = [], None
            elif redirect is not None:
                if redirect in (">", ">>") and current and current[0] in ("printf", "echo"):
                    path = posixpath.normpath(posixpath.join(self.cwd, token))
                    self.written[path] = _shell_output(current)
                redirect = None
            else:
                current.append(token)
        if current:
            commands.append(current)
        ran = 0
        for words in commands:
            while words and (re.match(r"[A-Za-z_][A-Za-z0-9_]*=", words[0])
                             or words[0] in ("exec", "command", "nohup")):
                words = words[1:]
            if not words or words[0] in SHELL_BUILTINS:
                continue
            if "$" in words[0] or "`" in words[0]:
                self.note(f"{shell.path} -c: cannot tell which program {words[0]!r} is")
                continue
            self.exec(words, f"command run by {shell.path} -c", depth + 1)
            ran += 1
            if ran == 4:
                break

    def env_command(self, node, args, depth):
        """``env [OPTION]... [NAME=VALUE]... PROGRAM [ARG]...`` runs PROGRAM through PATH."""
        args = list(args)
        i = 0
        while i < len(args):
            a = args[i]
            if a.startswith("-S") or a.startswith("--split-string"):
                rest = a[2:] if a.startswith("-S") else a.partition("=")[2]
                if not rest and i + 1 < len(args):
                    rest = args.pop(i + 1)
                args[i:i + 1] = rest.split()
                continue
            if a in ("-u", "--unset", "-C", "--chdir"):
                i += 2
            elif a.startswith("-") or re.match(r"[^=]+=", a):
                i += 1
            else:
                break
        if i < len(args):
            self.exec(args[i:], f"run by {node.path}", depth + 1)


def _shell_output(words):
    """The text ``printf FORMAT [ARG]...`` or ``echo [ARG]...`` writes (%s and escapes)."""
    if words[0] == "echo":
        text = " ".join(w for w in words[1:] if w not in ("-n", "-e")) + "\n"
    else:
        args = iter(words[2:])
        fmt = words[1] if len(words) > 1 else ""
        text = re.sub(r"%%|%[sb]", lambda m: "%" if m.group() == "%%" else next(args, ""), fmt)
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "r": "\r"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group()), text)


def _program_kind(name):
    """What a program name says it is (busybox applets go by argv[0])."""
    if PYTHON_NAME.match(name):
        return "python"
    if is_driver(name):
        return "gcc"
    if name == "env":
        return "env"
    if name in SHELLS:
        return "shell"
    return None


class Loader:
    """The dynamic loader's view of one process: libraries found, in load order."""

    def __init__(self, an, main_node, main_info):
        self.an = an
        self.fs = an.fs
        self.main_node = main_node
        self.main = main_info
        interp = main_info.interp or ""
        self.musl = posixpath.basename(interp).startswith("ld-musl-")
        self.loaded = {}              # DT_NEEDED name / soname -> real path
        self.loaded_paths = set()
        self._search_dirs = None
        self._cache_recorded = False
        self.libc_dir = None

    def start(self):
        """The interpreter, preloads and the DT_NEEDED closure of the main program."""
        info = self.main
        if info.interp:
            node = self.an.lookup(info.interp)
            if node is None or node.type != "reg":
                self.an.problem(f"{self.main_node.path}: its ELF interpreter {info.interp} "
                                f"is not in the image")
            else:
                self.an.record(node, f"ELF interpreter (PT_INTERP) of {self.main_node.path}")
                interp_info = self.an.elf(node)
                self._mark(node, posixpath.basename(info.interp),
                           interp_info.soname if interp_info else None)
        elif not info.dynamic:
            return                    # static executable
        if not self.musl:
            preload = self.an.lookup("/etc/ld.so.preload")
            if preload is not None and preload.type == "reg":
                self.an.record(preload, "read by the dynamic loader (/etc/ld.so.preload)")
                text = self.an.read(preload, 0, min(preload.size, 1 << 16))
                for name in text.decode("utf-8", "replace").split():
                    self._load_named(name, self.main_node, self.main, "/etc/ld.so.preload")
        for name in (self.an.env.get("LD_PRELOAD") or "").replace(":", " ").split():
            self._load_named(name, self.main_node, self.main, "LD_PRELOAD")
        self.load_closure([(self.main_node, self.main, self.main_node.path)])

    def load_library(self, node, reason):
        """A library opened with dlopen() (a Python extension module) and its closure."""
        info = self.an.elf(node)
        if info is None:
            return
        if not info.compatible(self.main):
            self.an.problem(f"{node.path}: a {info.bits}-bit {info.machine_name} object, "
                            f"which the {self.main_node.path} process cannot load")
            return
        self._mark(node, posixpath.basename(node.path), info.soname)
        self.load_closure([(node, info, node.path)])

    def _mark(self, node, *names):
        for name in names:
            if name:
                self.loaded[name] = node.path
        self.loaded_paths.add(node.path)

    def _load_named(self, name, requester, req_info, why):
        found = self.search(name, requester, req_info, requester.path)
        if found is None:
            self.an.problem(f"{name} ({why}) is not in the image")
            return
        node, info, where, loaded_as = found
        self.an.record(node, f"{why}: {name} ({where})")
        self._mark(node, name, info.soname)
        self.load_closure([(node, info, loaded_as)])

    def load_closure(self, start):
        """Breadth-first over DT_NEEDED, as ld.so loads them."""
        queue = collections.deque(start)
        while queue:
            node, info, loaded_as = queue.popleft()
            for name in info.needed:
                if name in self.loaded or self._reserved(name):
                    continue
                if len(self.loaded_paths) > MAX_ELF_OBJECTS:
                    self.an.problem(f"more than {MAX_ELF_OBJECTS} libraries; stopped")
                    return
                found = self.search(name, node, info, loaded_as)
                if found is None:
                    self.an.problem(f"{name} (DT_NEEDED of {node.path}) is not in the "
                                    f"image's library search path")
                    self.loaded[name] = None
                    continue
                lib, lib_info, where, lib_as = found
                self.loaded[name] = lib.path
                if lib_info.soname:
                    self.loaded.setdefault(lib_info.soname, lib.path)
                if lib.path in self.loaded_paths:
                    continue
                self.an.record(lib, f"DT_NEEDED {name} of {node.path} ({where})")
                self.loaded_paths.add(lib.path)
                if self.libc_dir is None and name.startswith("libc.so"):
                    self.libc_dir = posixpath.dirname(lib.path)
                queue.append((lib, lib_info, lib_as))

    def _reserved(self, name):
        if not self.musl:
            return False
        return name.split(".so")[0] in _MUSL_RESERVED or name.startswith("ld-musl-")

    # -- search ------------------------------------------------------------
    def search(self, name, requester, req_info, loaded_as):
        """``(node, info, where, path as found)`` of a library, or None."""
        if "/" in name:
            candidates = [(posixpath.dirname(posixpath.join(self.an.cwd, name)), "path")]
            name = posixpath.basename(name)
        else:
            candidates = self._dirs_for(requester, req_info, loaded_as)
        for d, source in candidates:
            if not self.musl and source == "CACHE":
                self._record_cache()
                continue
            path = posixpath.join(d, name)
            node = self.an.lookup(path)
            if node is None or node.type != "reg":
                continue
            info = self.an.elf(node)
            if info is None or not info.compatible(self.main):
                continue
            return node, info, f"found in {d} via {source}", path
        return None

    def _record_cache(self):
        if self._cache_recorded:
            return
        self._cache_recorded = True
        node = self.an.lookup("/etc/ld.so.cache")
        if node is not None and node.type == "reg":
            self.an.record(node, "read by the dynamic loader to find libraries "
                                 "(/etc/ld.so.cache)")

    def _expand(self, entry, origin):
        info = self.main
        lib = "lib64" if info.bits == 64 else "lib"
        if info.triplet and self.fs.is_dir(f"/lib/{info.triplet}"):
            lib = f"lib/{info.triplet}"
        platform = {"x86_64": "x86_64", "i386": "i686"}.get(info.machine_name,
                                                              info.machine_name)
        for token, value in (("ORIGIN", origin), ("LIB", lib), ("PLATFORM", platform)):
            entry = entry.replace("${" + token + "}", value).replace("$" + token, value)
        if not entry.startswith("/"):
            entry = posixpath.join(self.an.cwd, entry)
        return posixpath.normpath(entry)

    def _dirs_for(self, requester, req_info, loaded_as):
        origin = posixpath.dirname(loaded_as)
        dirs = []
        if self.musl:
            for d in req_info.rpath + req_info.runpath:
                dirs.append((self._expand(d, origin), f"DT_RPATH/DT_RUNPATH of {requester.path}"))
            for d in (self.an.env.get("LD_LIBRARY_PATH") or "").split(":"):
                if d:
                    dirs.insert(0, (d, "LD_LIBRARY_PATH"))
            return dirs + self.system_dirs()
        if not req_info.runpath:
            for d in req_info.rpath:
                dirs.append((self._expand(d, origin), f"DT_RPATH of {requester.path}"))
            if requester is not self.main_node and not self.main.runpath:
                main_origin = posixpath.dirname(self.main_node.path)
                for d in self.main.rpath:
                    dirs.append((self._expand(d, main_origin),
                                 f"DT_RPATH of {self.main_node.path}"))
        for d in (self.an.env.get("LD_LIBRARY_PATH") or "").replace(";", ":").split(":"):
            if d:
                dirs.append((d, "LD_LIBRARY_PATH"))
        for d in req_info.runpath:
            dirs.append((self._expand(d, origin), f"DT_RUNPATH of {requester.path}"))
        return dirs + self.system_dirs()

    def system_dirs(self):
        """ld.so.conf (glibc) or the musl path file, then the default directories."""
        if self._search_dirs is not None:
            return self._search_dirs
        info = self.main
        dirs = []
        if self.musl:
            arch = posixpath.basename(info.interp)[len("ld-musl-"):].split(".so")[0]
            path_file = f"/etc/ld-musl-{arch}.path"
            node = self.an.lookup(path_file)
            if node is not None and node.type == "reg":
                self.an.record(node, "read by the musl dynamic loader (library path)")
                text = self.an.read(node, 0, min(node.size, 1 << 16)).decode("utf-8", "replace")
                dirs = [(d, path_file) for d in re.split(r"[:\n]", text) if d.strip()]
            else:
                dirs = [(d, "musl default path") for d in ("/lib", "/usr/local/lib", "/usr/lib")]
        else:
            dirs.append(("", "CACHE"))        # ld.so.cache is opened before its directories
            dirs.extend(self._ld_so_conf("/etc/ld.so.conf", 0, set()))
            defaults = []
            if info.triplet:
                defaults += [f"/lib/{info.triplet}", f"/usr/lib/{info.triplet}"]
            if info.bits == 64:
                defaults += ["/lib64", "/usr/lib64"]
            defaults += ["/lib", "/usr/lib"]
            dirs.extend((d, "default library path") for d in defaults)
        self._search_dirs = dirs
        return dirs

    def _ld_so_conf(self, path, depth, seen):
        if depth > 8 or path in seen:
            return []
        seen.add(path)
        node = self.an.lookup(path)
        if node is None or node.type != "reg":
            return []
        text = self.an.read(node, 0, min(node.size, 1 << 20)).decode("utf-8", "replace")
        out = []
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("include") and line[7:8] in (" ", "\t"):
                for pattern in line[8:].split():
                    if not pattern.startswith("/"):
                        pattern = posixpath.join(posixpath.dirname(path), pattern)
                    for included in self._glob(pattern):
                        out.extend(self._ld_so_conf(included, depth + 1, seen))
            elif line.startswith("hwcap"):
                continue
            else:
                for d in re.split(r"[:,\s]+", line):
                    if d.startswith("/"):
                        out.append((posixpath.normpath(d), path))
        return out

    def _glob(self, pattern):
        """Paths matching a glob whose wildcards are in the last component."""
        directory, base = posixpath.split(pattern)
        if not any(c in base for c in "*?["):
            return [pattern]
        return [posixpath.join(directory, n) for n in self.fs.listdir(directory)
                if fnmatch.fnmatchcase(n, base)]


# -- whole images ------------------------------------------------------------

def analyze_image(endpoint, platform=None, all_platforms=False, entrypoint=None, args=None,
                  env=None, note=None, workdir=None):
    """Analyze one platform (or every platform of an index) of an image endpoint.

    Returns a list of Analysis, one per platform.
    """
    results = []
    with LayerOpener(endpoint, note, workdir) as opener:
        for plat, manifest in image_manifests(endpoint, platform, all_platforms):
            config = image_config(endpoint, manifest)
            if not plat:
                plat = "/".join(x for x in (config.get("os"), config.get("architecture"),
                                            config.get("variant")) if x)
            fs = opener.open(manifest)
            result = Analyzer(fs, config, plat, entrypoint, args, env).run()
            descs = manifest.get("layers") or []
            for layer, desc in zip(fs.layers, descs):
                annotated = TOC_DIGEST_ANNOTATION in (desc.get("annotations") or {})
                result.layers.append(LayerSummary(layer.index, layer.digest, layer.kind,
                                                  layer.fetched, annotated))
            results.append(result)
    return results


def prioritized_by_layer(analyses):
    """Merge the per-layer lists of several analyses (platforms): digest -> paths."""
    merged = {}
    for analysis in analyses:
        for digest, paths in analysis.by_layer().items():
            have = merged.setdefault(digest, [])
            seen = set(have)
            have.extend(p for p in paths if p not in seen)
    return merged
