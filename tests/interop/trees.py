"""Generated tar layers together with the filesystem a reader must see.

``Layer`` writes tar entries with the standard library and, independently
of any stargz code, records what each path must look like afterwards
(names cleaned, last definition wins, hardlinks resolved, implied parent
directories, landmark files hidden).  ``view_*`` turn a reader's tree into
the same shape so tests compare meaning, not bytes.
"""

import base64
import hashlib
import io
import math
import posixpath
import random
import tarfile

FIELDS = ("type", "mode", "uid", "gid", "mtime", "size", "link", "dev", "xattrs", "digest",
          "content", "nlink")
LANDMARKS = (".prefetch.landmark", ".no.prefetch.landmark")


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def clean(name):
    """``path.Clean("/"+name)`` without the leading slash (FORMAT.md §3.6)."""
    return posixpath.normpath("/" + name.lstrip("/")).lstrip("/")


def go_round(mtime):
    """Go's ``time.Round(time.Second)``: halves away from zero."""
    return int(math.floor(mtime + 0.5)) if mtime >= 0 else -int(math.floor(-mtime + 0.5))


class Layer:
    """A tar archive under construction plus its expected meaning."""

    def __init__(self, global_pax=None):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT,
                                encoding="utf-8", errors="surrogateescape",
                                pax_headers=global_pax or {})
        self.records = []        # (cleaned name, attrs) in input order
        self.owners = {}         # uid -> user name, gid -> group name (consistent per id)

    # -- writing -----------------------------------------------------------
    def _add(self, name, type_, data=b"", mode=0o644, uid=0, gid=0, uname="root",
             gname="root", mtime=1700000000, xattrs=None, linkname="", devmajor=0,
             devminor=0):
        info = tarfile.TarInfo(name)
        info.type = type_
        info.size = len(data) if type_ == tarfile.REGTYPE else 0
        info.mode, info.uid, info.gid = mode, uid, gid
        info.uname, info.gname, info.mtime = uname, gname, mtime
        info.linkname, info.devmajor, info.devminor = linkname, devmajor, devminor
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                for k, v in xattrs.items()}
        self.tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)
        self.records.append((clean(name), dict(
            tartype=type_, data=data, mode=mode & 0o7777, uid=uid, gid=gid, uname=uname,
            gname=gname, mtime=go_round(mtime), xattrs=dict(xattrs or {}), linkname=linkname,
            dev=(devmajor, devminor))))
        return self

    def file(self, name, data=b"", **kw):
        return self._add(name, tarfile.REGTYPE, data, **kw)

    def dir(self, name, mode=0o755, **kw):
        return self._add(name, tarfile.DIRTYPE, mode=mode, **kw)

    def symlink(self, name, target, **kw):
        return self._add(name, tarfile.SYMTYPE, linkname=target, mode=0o777, **kw)

    def hardlink(self, name, target, **kw):
        return self._add(name, tarfile.LNKTYPE, linkname=target, **kw)

    def char(self, name, major, minor, **kw):
        return self._add(name, tarfile.CHRTYPE, devmajor=major, devminor=minor, **kw)

    def block(self, name, major, minor, **kw):
        return self._add(name, tarfile.BLKTYPE, devmajor=major, devminor=minor, **kw)

    def fifo(self, name, **kw):
        return self._add(name, tarfile.FIFOTYPE, **kw)

    def bytes(self):
        if not self.tar.closed:
            self.tar.close()
        return self.buf.getvalue()

    def write(self, path):
        with open(path, "wb") as f:
            f.write(self.bytes())
        return path

    # -- the meaning -------------------------------------------------------
    def expected(self):
        """``{path: fields}`` a correct reader shows for this layer."""
        kinds = {tarfile.REGTYPE: "reg", tarfile.DIRTYPE: "dir", tarfile.SYMTYPE: "symlink",
                 tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
                 tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo"}
        defs = {}
        for name, rec in self.records:
            if name in LANDMARKS or name == "stargz.index.json":
                continue
            if (kinds[rec["tartype"]] == "hardlink" and clean(rec["linkname"]) == name
                    and name in defs):
                continue                      # "f" then hardlink f->f keeps the file
            defs.pop(name, None)
            defs[name] = rec

        def node(rec):
            kind = kinds[rec["tartype"]]
            data = rec["data"] if kind == "reg" else b""
            return {
                "type": kind, "mode": rec["mode"], "uid": rec["uid"], "gid": rec["gid"],
                "user": rec["uname"], "group": rec["gname"],
                "mtime": rec["mtime"], "size": len(data),
                "link": rec["linkname"] if kind == "symlink" else "",
                "dev": rec["dev"] if kind in ("char", "block") else (0, 0),
                "xattrs": rec["xattrs"],
                "digest": sha(data) if kind == "reg" else None,
                "content": sha(data) if kind == "reg" else None,
                "nlink": 2 if kind == "dir" else 1,
            }

        implied = {"type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "user": "", "group": "",
                   "mtime": 0, "size": 0, "link": "", "dev": (0, 0), "xattrs": {},
                   "digest": None, "content": None, "nlink": 2}
        out = {"": dict(implied)}
        links = {}
        for name, rec in defs.items():
            if kinds[rec["tartype"]] == "hardlink":
                links[name] = clean(rec["linkname"])
            else:
                out[name] = node(rec)
        for name in list(out) + list(links):
            parent = posixpath.dirname(name)
            while name and parent not in out:
                out[parent] = dict(implied)
                name, parent = parent, posixpath.dirname(parent)
        for name, target in links.items():
            while target in links:
                target = links[target]
            out[name] = out[target]               # the same object: shared metadata
            out[target]["nlink"] += 1
        for name, fields in out.items():
            if name and fields["type"] == "dir":
                out[posixpath.dirname(name)]["nlink"] += 1
        return {name: {k: v for k, v in fields.items()} for name, fields in out.items()}


# -- readers' views --------------------------------------------------------
def view_ours(reader, with_content=True):
    """``{path: fields}`` of a stargz_overlay StargzReader."""
    out = {}
    for path, e in reader.toc.walk():
        content = None
        if e.type == "reg" and with_content:
            content = sha(reader.read_file(e))
        out[path] = {
            "type": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid,
            "user": e.user_name, "group": e.group_name, "mtime": e.mtime, "size": e.size,
            "link": e.link_name, "dev": (e.dev_major, e.dev_minor), "xattrs": dict(e.xattrs),
            "digest": e.digest, "content": content, "nlink": e.nlink,
        }
    return out


def view_go(ls_json, keep_landmarks=False):
    """``{path: fields}`` of ``refestargz ls`` output."""
    out = {}
    for e in ls_json["entries"]:
        if e["path"] in LANDMARKS and not keep_landmarks:
            continue
        out[e["path"]] = {
            "type": e["type"], "mode": e["mode"] & 0o7777, "uid": e["uid"], "gid": e["gid"],
            "user": e["userName"], "group": e["groupName"], "mtime": e["modtime"],
            "size": e["size"], "link": e["linkName"] if e["type"] == "symlink" else "",
            "dev": (e["devMajor"], e["devMinor"]),
            "xattrs": {k: base64.b64decode(v) for k, v in e["xattrs"].items()},
            "digest": e["digest"] or None, "content": e.get("contentSha256"),
            "nlink": e["NumLink"],
        }
    return out


def diff(got, want, fields=FIELDS, skip_paths=()):
    """Human-readable differences between two views (empty list when equal)."""
    problems = []
    for path in sorted(set(got) | set(want)):
        if path in skip_paths:
            continue
        if path not in got:
            problems.append(f"{path!r}: missing")
            continue
        if path not in want:
            problems.append(f"{path!r}: unexpected entry {got[path]['type']}")
            continue
        for f in fields:
            if got[path][f] != want[path][f]:
                problems.append(f"{path!r}: {f} is {got[path][f]!r}, expected {want[path][f]!r}")
    return problems


# -- the standard tree -----------------------------------------------------
CHUNK = 64 << 10


def every_kind(seed=7):
    """A layer with every entry type and the awkward cases of FORMAT.md §5."""
    rnd = random.Random(seed)
    big_random = rnd.randbytes(3 * CHUNK + 100)
    compressible = (b"stargz-overlay " * 20000)[:3 * CHUNK]       # exact multiple
    lay = Layer()
    lay.dir("./", mode=0o750, mtime=1690000000)
    lay.dir("files/")
    lay.file("files/a", b"hello\n", uid=1000, gid=1000, uname="alice", gname="alice")
    lay.file("files/empty", b"")
    lay.file("./files/dotslash", b"x" * 700)
    lay.file("files/setuid", b"#!/bin/sh\n", mode=0o4755)
    lay.file("files/setgid", b"#!/bin/sh\n", mode=0o2711)
    lay.file("files/nothing", b"no perms", mode=0o000)
    lay.file("files/all", b"all perms", mode=0o7777)
    lay.file("files/half-second", b"t", mtime=1700000000.5)
    lay.file("files/pre-epoch", b"old", mtime=-100)
    lay.file("files/epoch", b"zero", mtime=0)
    lay.dir("tmp/", mode=0o1777)
    lay.dir("big/")
    lay.file("big/random", big_random, uid=1001, gid=1000, uname="bob", gname="alice")
    lay.file("big/compressible", compressible)
    lay.file("big/exact", rnd.randbytes(CHUNK))
    lay.file("big/one-less", rnd.randbytes(CHUNK - 1))
    lay.file("big/one-more", rnd.randbytes(CHUNK + 1))
    lay.dir("owners/", uid=1002, gid=2000, uname="carol", gname="staff")
    lay.file("owners/f1", b"1", uid=1002, gid=2000, uname="carol", gname="staff")
    lay.file("owners/f2", b"2", uid=1002, gid=2000, uname="carol", gname="staff")
    # gid 1001 belongs to group "bobgrp" while uid 1001 is "bob": the 0.12 reader
    # back-fills the group from the user map and reports "bob".
    lay.file("owners/g1", b"3", uid=1000, gid=1001, uname="alice", gname="bobgrp")
    lay.file("owners/g2", b"4", uid=1000, gid=1001, uname="alice", gname="bobgrp")
    lay.file("owners/huge-ids", b"5", uid=3000000, gid=3000001, uname="huge", gname="hugegrp")
    lay.dir("links/")
    lay.symlink("links/rel", "../files/a")
    lay.symlink("links/abs", "/etc/passwd")
    lay.symlink("links/dangling", "nowhere")
    lay.symlink("links/outside", "../../../../x")
    lay.symlink("links/long", "t/" + "y" * 200)
    lay.hardlink("links/hard1", "files/a")
    lay.hardlink("links/hard2", "./files/a")
    lay.hardlink("links/hardbig", "big/random")
    lay.hardlink("links/hardempty", "files/empty")
    lay.dir("dev/")
    lay.char("dev/null", 1, 3, mode=0o666)
    lay.block("dev/sda", 8, 0, mode=0o660, gid=6, gname="disk")
    lay.char("dev/whiteout", 0, 0, mode=0)
    lay.block("dev/big-numbers", 259, 65536)
    lay.fifo("dev/fifo", mode=0o600)
    lay.dir("xattr/")
    lay.file("xattr/f", b"attrs", xattrs={
        "user.foo": b"bar", "security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00",
        "user.empty-ish": b"\x00", "user.binary": bytes(range(256))})
    lay.dir("xattr/opaque-dir", xattrs={"trusted.overlay.opaque": b"y"})
    lay.dir("wh/")
    lay.file("wh/.wh.gone", b"")
    lay.dir("wh/opq/")
    lay.file("wh/opq/.wh..wh..opq", b"")
    lay.file("wh/opq/kept", b"kept")
    long_dir = "long/" + "d" * 120
    lay.file(long_dir + "/" + "f" * 200, b"long name")
    lay.hardlink("long/hard", long_dir + "/" + "f" * 200)
    lay.file("names/sp ace/a<b>&c", b"html-ish")
    lay.file("names/ünï/日本.txt", "unicode".encode())
    lay.file("names/ctl/tab\tname", b"tab")
    lay.file("names/ctl/new\nline", b"newline")
    lay.file("names/quote\"back\\slash", b"quoted")
    lay.file("implied/deep/er/f", b"parents are not in the tar")
    return lay


PRIORITIZED = ["files/a", "big/random", "links/hardbig", "wh/opq/kept"]
