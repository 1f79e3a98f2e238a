"""Build test tar archives entry by entry with the standard library."""

import io
import tarfile


class TarBuilder:
    """Collects entries and returns the tar bytes."""

    def __init__(self, fmt=tarfile.PAX_FORMAT):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=fmt,
                                encoding="utf-8", errors="surrogateescape")

    def _add(self, name, type_, data=b"", **attrs):
        info = tarfile.TarInfo(name)
        info.type = type_
        info.size = len(data) if type_ == tarfile.REGTYPE else 0
        info.mode = attrs.pop("mode", 0o644)
        info.mtime = attrs.pop("mtime", 1700000000)
        xattrs = attrs.pop("xattrs", {})
        for key, value in attrs.items():
            setattr(info, key, value)
        if xattrs:
            info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                                for k, v in xattrs.items()}
        self.tar.addfile(info, io.BytesIO(data) if type_ == tarfile.REGTYPE else None)
        return self

    def file(self, name, data=b"", **attrs):
        return self._add(name, tarfile.REGTYPE, data, **attrs)

    def dir(self, name, **attrs):
        attrs.setdefault("mode", 0o755)
        return self._add(name, tarfile.DIRTYPE, **attrs)

    def symlink(self, name, target, **attrs):
        return self._add(name, tarfile.SYMTYPE, linkname=target, **attrs)

    def hardlink(self, name, target, **attrs):
        return self._add(name, tarfile.LNKTYPE, linkname=target, **attrs)

    def char(self, name, major, minor, **attrs):
        return self._add(name, tarfile.CHRTYPE, devmajor=major, devminor=minor, **attrs)

    def block(self, name, major, minor, **attrs):
        return self._add(name, tarfile.BLKTYPE, devmajor=major, devminor=minor, **attrs)

    def fifo(self, name, **attrs):
        return self._add(name, tarfile.FIFOTYPE, **attrs)

    def raw(self, data):
        """Append raw bytes (e.g. a hand-made header) to the archive."""
        self.tar.fileobj.write(data)
        self.tar.offset += len(data)
        return self

    def bytes(self):
        self.tar.close()
        return self.buf.getvalue()
