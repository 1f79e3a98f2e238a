"""A small ELF reader: what the dynamic loader needs to start a program.

Only the program headers are used, as the loader does: ``PT_INTERP`` (the
dynamic loader), ``PT_DYNAMIC`` (``DT_NEEDED``, ``DT_RPATH``, ``DT_RUNPATH``,
``DT_SONAME``) and the ``PT_LOAD`` segments that map the dynamic string table
back to file offsets.  Files come through ``read(offset, length)``; every
offset and count is checked against the file size before it is used, so a
truncated or hostile file raises ``FormatError`` naming what is wrong.
"""

import re
import struct

from .errors import FormatError

ELF_MAGIC = b"\x7fELF"
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 14, 15, 29
MAX_PHNUM = 4096              # real files have a dozen; PN_XNUM (0xffff) is not supported
MAX_DYN_ENTRIES = 1 << 16
MAX_STRTAB = 16 << 20
MAX_INTERP = 4096

# e_machine -> (Debian multiarch triplet for 64-bit, for 32-bit); "" = none
MACHINES = {
    3: ("", "i386-linux-gnu"), 62: ("x86_64-linux-gnu", "x86_64-linux-gnux32"),
    183: ("aarch64-linux-gnu", ""), 40: ("", "arm-linux-gnueabihf"),
    21: ("powerpc64le-linux-gnu", "powerpc-linux-gnu"), 22: ("s390x-linux-gnu", ""),
    243: ("riscv64-linux-gnu", ""), 8: ("mips64el-linux-gnuabi64", "mipsel-linux-gnu"),
    258: ("loongarch64-linux-gnu", ""),
}
MACHINE_NAMES = {3: "i386", 62: "x86_64", 183: "aarch64", 40: "arm", 21: "ppc64",
                 22: "s390x", 243: "riscv64", 8: "mips", 258: "loongarch64"}


class ElfInfo:
    """The loader-relevant facts of one ELF file."""

    def __init__(self, bits, little, machine, etype):
        self.bits = bits              # 32 or 64
        self.little = little          # byte order
        self.machine = machine        # e_machine
        self.type = etype             # e_type (2 = EXEC, 3 = DYN)
        self.interp = None            # PT_INTERP path
        self.dynamic = False          # has PT_DYNAMIC
        self.needed = []              # DT_NEEDED names, in order
        self.rpath = []               # DT_RPATH entries
        self.runpath = []             # DT_RUNPATH entries
        self.soname = None
        self.symbols = []             # dynamic strings with the asked prefix

    @property
    def triplet(self):
        """Debian multiarch directory name, or ""."""
        pair = MACHINES.get(self.machine, ("", ""))
        return pair[0] if self.bits == 64 else pair[1]

    @property
    def machine_name(self):
        return MACHINE_NAMES.get(self.machine, f"machine {self.machine}")

    def compatible(self, other):
        """Could the loader of ``other`` load this object (class, byte order, machine)?"""
        return (self.bits, self.little, self.machine) == (other.bits, other.little, other.machine)


def is_elf(head):
    return head[:4] == ELF_MAGIC


def parse_elf(read, size, name, symbol_prefix=None):
    """Parse the ELF file ``name`` of ``size`` bytes read through ``read(offset, length)``.

    With ``symbol_prefix``, ``info.symbols`` lists the dynamic strings starting
    with it (e.g. ``PyInit_`` for the modules built into a Python interpreter).
    """
    def bad(why):
        return FormatError(f"{name}: not a valid ELF file: {why}")

    def chunk(offset, length, what):
        if offset < 0 or length < 0 or offset + length > size:
            raise bad(f"{what} at offset {offset} (+{length}) lies outside the file "
                      f"({size} bytes)")
        data = read(offset, length)
        if len(data) != length:
            raise bad(f"short read of {what}")
        return data

    if size < 52:
        raise bad(f"only {size} bytes long")
    ident = chunk(0, 16, "ELF identification")
    if ident[:4] != ELF_MAGIC:
        raise bad("no ELF magic")
    if ident[4] not in (1, 2):
        raise bad(f"unknown ELF class {ident[4]}")
    if ident[5] not in (1, 2):
        raise bad(f"unknown byte order {ident[5]}")
    bits = 64 if ident[4] == 2 else 32
    end = "<" if ident[5] == 1 else ">"
    word = "Q" if bits == 64 else "I"
    ehdr_fmt = end + "HHI" + word * 3 + "IHHHHHH"
    ehdr = struct.unpack(ehdr_fmt, chunk(16, struct.calcsize(ehdr_fmt), "ELF header"))
    etype, machine, _version, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = ehdr[:10]
    info = ElfInfo(bits, end == "<", machine, etype)
    if phnum == 0:
        return info                  # relocatable objects and the like: nothing to load
    if bits == 64:
        ph_fmt = end + "IIQQQQQQ"
    else:
        ph_fmt = end + "IIIIIIII"
    want = struct.calcsize(ph_fmt)
    if phentsize != want:
        raise bad(f"program header entry size {phentsize}, expected {want}")
    if phnum > MAX_PHNUM:
        raise bad(f"{phnum} program headers (more than {MAX_PHNUM})")
    table = chunk(phoff, phnum * phentsize, "program header table")
    loads = []
    dynamic = None
    for i in range(phnum):
        fields = struct.unpack_from(ph_fmt, table, i * phentsize)
        if bits == 64:
            ptype, _pflags, poff, pvaddr, _paddr, pfilesz, _pmemsz, _align = fields
        else:
            ptype, poff, pvaddr, _paddr, pfilesz, _pmemsz, _pflags, _align = fields
        if ptype == PT_LOAD:
            loads.append((pvaddr, poff, pfilesz))
        elif ptype == PT_INTERP and info.interp is None:
            if pfilesz > MAX_INTERP:
                raise bad(f"PT_INTERP is {pfilesz} bytes long")
            raw = chunk(poff, pfilesz, "PT_INTERP")
            nul = raw.find(b"\0")
            if nul <= 0:
                raise bad("PT_INTERP is not a NUL-terminated path")
            info.interp = _text(raw[:nul], bad, "PT_INTERP")
        elif ptype == PT_DYNAMIC and dynamic is None:
            dynamic = (poff, pfilesz)
    if dynamic is None:
        return info
    info.dynamic = True
    dyn_fmt = end + ("qQ" if bits == 64 else "iI")
    dyn_size = struct.calcsize(dyn_fmt)
    count = min(dynamic[1] // dyn_size, MAX_DYN_ENTRIES)
    raw = chunk(dynamic[0], count * dyn_size, "PT_DYNAMIC")
    tags = []
    strtab = strsz = None
    for i in range(count):
        tag, value = struct.unpack_from(dyn_fmt, raw, i * dyn_size)
        if tag == DT_NULL:
            break
        if tag == DT_STRTAB:
            strtab = value
        elif tag == DT_STRSZ:
            strsz = value
        elif tag in (DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_SONAME):
            tags.append((tag, value))
    if not tags and symbol_prefix is None:
        return info
    if strtab is None:
        if not tags:
            return info
        raise bad("PT_DYNAMIC names libraries but has no DT_STRTAB")
    offset = _file_offset(loads, strtab)
    if offset is None:
        raise bad(f"DT_STRTAB address {strtab:#x} is in no PT_LOAD segment")
    if offset >= size:
        raise bad(f"DT_STRTAB at offset {offset} lies outside the file ({size} bytes)")
    length = min(size - offset, MAX_STRTAB if strsz is None else min(strsz, MAX_STRTAB))
    strings = chunk(offset, length, "dynamic string table")
    if symbol_prefix is not None:
        pattern = rb"(?<=\0)" + re.escape(symbol_prefix.encode()) + rb"[A-Za-z0-9_]+(?=\0)"
        info.symbols = sorted({m.decode("ascii") for m in re.findall(pattern, strings)})
    for tag, value in tags:
        if value >= len(strings):
            raise bad(f"dynamic string offset {value} is past the string table "
                      f"({len(strings)} bytes)")
        stop = strings.find(b"\0", value)
        if stop < 0:
            raise bad(f"dynamic string at {value} is not NUL-terminated")
        text = _text(strings[value:stop], bad, "dynamic string")
        if tag == DT_NEEDED:
            if text:
                info.needed.append(text)
        elif tag == DT_SONAME:
            info.soname = text
        elif tag == DT_RPATH:
            info.rpath.extend(p for p in text.split(":") if p)
        else:
            info.runpath.extend(p for p in text.split(":") if p)
    return info


def _file_offset(loads, vaddr):
    for seg_vaddr, seg_off, seg_filesz in loads:
        if seg_vaddr <= vaddr < seg_vaddr + seg_filesz:
            return seg_off + (vaddr - seg_vaddr)
    return None


def _text(raw, bad, what):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad(f"{what} is not UTF-8 text") from None
