"""The ELF reader: real binaries, hand-made ELF32/ELF64 in both byte orders, hostile files."""

import os
import re
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from stargz_overlay.elf import parse_elf
from stargz_overlay.errors import FormatError

from .imagebuilder import PYTHON


def parse_bytes(data, name="test.elf"):
    return parse_elf(lambda off, n: data[off:off + n], len(data), name)


def make_elf(bits=64, little=True, interp="/lib/ld.so.1", needed=("libc.so.6",),
             runpath=None, rpath=None, soname=None, machine=62):
    """A minimal valid ELF: headers, PT_INTERP, one PT_LOAD, PT_DYNAMIC and .dynstr."""
    end = "<" if little else ">"
    word = "Q" if bits == 64 else "I"
    ehsize = 64 if bits == 64 else 52
    phentsize = 56 if bits == 64 else 32
    strings = b"\0"
    offsets = {}
    for text in [interp or "", *needed, runpath or "", rpath or "", soname or ""]:
        if text and text not in offsets:
            offsets[text] = len(strings)
            strings += text.encode() + b"\0"
    dyn = [(1, offsets[n]) for n in needed]
    if runpath:
        dyn.append((29, offsets[runpath]))
    if rpath:
        dyn.append((15, offsets[rpath]))
    if soname:
        dyn.append((14, offsets[soname]))
    phnum = 3 if interp else 2
    phoff = ehsize
    interp_off = phoff + phnum * phentsize
    interp_bytes = (interp.encode() + b"\0") if interp else b""
    str_off = interp_off + len(interp_bytes)
    vaddr = 0x400000
    dyn_fmt = end + ("qQ" if bits == 64 else "iI")
    dyn.insert(0, (5, vaddr + str_off))                 # DT_STRTAB
    dyn.insert(1, (10, len(strings)))                   # DT_STRSZ
    dyn.append((0, 0))
    dyn_off = str_off + len(strings)
    dyn_bytes = b"".join(struct.pack(dyn_fmt, t, v) for t, v in dyn)
    total = dyn_off + len(dyn_bytes)

    def phdr(ptype, off, filesz):
        if bits == 64:
            return struct.pack(end + "IIQQQQQQ", ptype, 4, off, vaddr + off, vaddr + off,
                               filesz, filesz, 8)
        return struct.pack(end + "IIIIIIII", ptype, off, vaddr + off, vaddr + off, filesz,
                           filesz, 4, 4)
    phdrs = phdr(1, 0, total)                           # one PT_LOAD maps the whole file
    if interp:
        phdrs += phdr(3, interp_off, len(interp_bytes))
    phdrs += phdr(2, dyn_off, len(dyn_bytes))
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    header = ident + struct.pack(end + "HHI" + word * 3 + "IHHHHHH", 3, machine, 1, 0, phoff,
                                 0, 0, ehsize, phentsize, phnum, 0, 0, 0)
    return header + phdrs + interp_bytes + strings + dyn_bytes


@pytest.mark.parametrize("bits,little", [(64, True), (64, False), (32, True), (32, False)])
def test_hand_made_elf_every_class_and_byte_order(bits, little):
    data = make_elf(bits, little, interp="/lib/ld-linux.so.3",
                    needed=("libfoo.so.1", "libc.so.6"), runpath="$ORIGIN/../lib:/opt/x",
                    soname="libme.so.2", machine=40)
    info = parse_elf(lambda off, n: data[off:off + n], len(data), "x")
    assert (info.bits, info.little, info.machine) == (bits, little, 40)
    assert info.interp == "/lib/ld-linux.so.3"
    assert info.needed == ["libfoo.so.1", "libc.so.6"]
    assert info.runpath == ["$ORIGIN/../lib", "/opt/x"] and info.rpath == []
    assert info.soname == "libme.so.2"


def test_real_interpreter_matches_readelf():
    if not os.path.exists(PYTHON):
        pytest.skip(f"{PYTHON} is missing")
    with open(PYTHON, "rb") as f:
        data = f.read()
    info = parse_bytes(data, PYTHON)
    assert info.bits == 64 and info.interp and info.interp.startswith("/")
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed to compare with")
    out = subprocess.run(["readelf", "-d", "-l", PYTHON], capture_output=True, text=True,
                         check=True).stdout
    assert info.needed == re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out)
    assert info.interp == re.search(r"program interpreter: (\S+?)\]", out).group(1)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:40], "only 40 bytes long"),
    (lambda d: b"\x7fELX" + d[4:], "no ELF magic"),
    (lambda d: d[:4] + b"\x07" + d[5:], "unknown ELF class 7"),
    (lambda d: d[:32] + struct.pack("<Q", 1 << 60) + d[40:],
     "program header table at offset 1152921504606846976"),
    (lambda d: d[:56] + struct.pack("<H", 60000) + d[58:], "60000 program headers"),
    (lambda d: d[:54] + struct.pack("<H", 40) + d[56:], "program header entry size 40"),
    (lambda d: d[:200], "lies outside the file"),
])
def test_hostile_headers_give_clear_errors(mutate, message):
    with pytest.raises(FormatError) as exc:
        parse_bytes(mutate(make_elf()), "/usr/lib/evil.so")
    assert "/usr/lib/evil.so: not a valid ELF file" in str(exc.value)
    assert message in str(exc.value)


def test_dynamic_strings_out_of_range():
    data = bytearray(make_elf(needed=("libc.so.6",)))
    info = parse_bytes(bytes(data))
    assert info.needed == ["libc.so.6"]
    # point DT_NEEDED far past the string table
    dyn_tail = data.rfind(struct.pack("<qQ", 1, 1 + len("/lib/ld.so.1") + 1))
    assert dyn_tail > 0
    data[dyn_tail + 8:dyn_tail + 16] = struct.pack("<Q", 1 << 40)
    with pytest.raises(FormatError, match="past the string table"):
        parse_bytes(bytes(data))
    # DT_STRTAB at an address no PT_LOAD maps
    data = bytearray(make_elf())
    pos = data.find(struct.pack("<q", 5))
    data[pos + 8:pos + 16] = struct.pack("<Q", 0x10)
    with pytest.raises(FormatError, match="in no PT_LOAD segment"):
        parse_bytes(bytes(data))


def test_every_truncation_is_an_error_or_a_parse():
    data = make_elf(interp="/lib64/ld-linux-x86-64.so.2", needed=("a.so", "b.so"))
    for n in range(len(data)):
        try:
            parse_bytes(data[:n])
        except FormatError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_corruption_never_escapes_as_another_exception(data):
    elf = bytearray(make_elf(bits=data.draw(st.sampled_from([32, 64])),
                             little=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(elf) - 1))
        elf[pos] = data.draw(st.integers(0, 255))
    try:
        parse_bytes(bytes(elf))
    except FormatError:
        pass
