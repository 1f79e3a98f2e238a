"""Image references as Podman reads them: ``[host[:port]/]repo[:tag][@digest]``.

A reference whose first path component has a ``.`` or a ``:`` or is
``localhost`` names its registry; anything else is a *short name*, which
``registries_conf`` expands through aliases and ``unqualified-search-registries``.
``docker.io`` references get the ``library/`` namespace for one-component
repositories; the registry's API host for ``docker.io`` is ``registry-1.docker.io``.
"""

import re
from dataclasses import dataclass, replace

from .errors import InvalidReference

DOCKER_IO = "docker.io"
DOCKER_IO_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"
TRANSPORT = "docker://"

_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?\Z")
_PATH_COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*\Z")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST_RE = re.compile(
    r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}\Z")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
_MAX_NAME = 255
_OTHER_TRANSPORT_RE = re.compile(
    r"(oci|oci-archive|dir|containers-storage|docker-archive|docker-daemon|sif|tarball):")


@dataclass(frozen=True)
class Reference:
    """A parsed reference; ``registry`` is "" for a short name."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def is_short(self):
        return not self.registry

    @property
    def name(self):
        """``registry/repository`` (just the repository for a short name)."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    @property
    def locator(self):
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_name(self, name):
        """The same tag/digest under another ``registry/repository`` (mirrors, aliases)."""
        other = parse_reference(name)
        if other.is_short:
            raise InvalidReference(f"{name!r} does not name a registry")
        return normalize(replace(self, registry=other.registry, repository=other.repository))

    def __str__(self):
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + self.digest
        return text


def api_host(registry):
    """The host:port the registry API is served from."""
    return DOCKER_IO_API_HOST if registry == DOCKER_IO else registry


def is_sha256_digest(text):
    """Whether ``text`` is ``sha256:`` and 64 lower-case hex digits (a layer's name)."""
    return bool(_SHA256_RE.match(text or ""))


def check_digest(digest):
    """Raise InvalidReference unless ``digest`` is a well-formed ``algo:hex``."""
    if not _DIGEST_RE.match(digest or ""):
        raise InvalidReference(f"invalid digest {digest!r}")
    if digest.startswith("sha256:") and not _SHA256_RE.match(digest):
        raise InvalidReference(f"invalid sha256 digest {digest!r}: want 64 lower-case hex digits")
    return digest


def _looks_like_host(component):
    return "." in component or ":" in component or component == "localhost"


def normalize(ref):
    """Apply Docker Hub's rules: ``index.docker.io`` -> ``docker.io``, ``library/``."""
    registry = ref.registry
    repository = ref.repository
    if registry == "index.docker.io":
        registry = DOCKER_IO
    if registry == DOCKER_IO and "/" not in repository:
        repository = "library/" + repository
    if ref.tag is None and ref.digest is None:
        ref = replace(ref, tag=DEFAULT_TAG)
    return replace(ref, registry=registry, repository=repository)


def parse_reference(text):
    """Parse ``text`` (optionally prefixed ``docker://``) into a Reference.

    A missing tag becomes ``latest`` unless a digest is given; the result
    of a qualified reference is normalised (``docker.io/library/...``).
    """
    original = text
    if not isinstance(text, str) or not text:
        raise InvalidReference("empty image reference")
    if text.startswith(TRANSPORT):
        text = text[len(TRANSPORT):]
    elif "://" in text or _OTHER_TRANSPORT_RE.match(text):
        raise InvalidReference(f"{original!r}: only the docker:// transport is supported here")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        check_digest(digest)
    tag = None
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"{original!r}: invalid tag {tag!r}")
    registry = ""
    repository = text
    first, sep, rest = text.partition("/")
    if sep and _looks_like_host(first):
        if not _HOST_RE.match(first):
            raise InvalidReference(f"{original!r}: invalid registry host {first!r}")
        registry, repository = first, rest
    if not repository:
        raise InvalidReference(f"{original!r}: no repository name")
    for component in repository.split("/"):
        if not _PATH_COMPONENT_RE.match(component):
            if component.lower() != component and _PATH_COMPONENT_RE.match(component.lower()):
                raise InvalidReference(f"{original!r}: repository name must be lowercase")
            raise InvalidReference(f"{original!r}: invalid repository name component "
                                   f"{component!r}")
    if len(f"{registry}/{repository}") > _MAX_NAME:
        raise InvalidReference(f"{original!r}: name longer than {_MAX_NAME} characters")
    ref = Reference(registry, repository, tag, digest)
    if ref.is_short:
        if ref.tag is None and ref.digest is None:
            ref = replace(ref, tag=DEFAULT_TAG)
        return ref
    return normalize(ref)
