"""Content digests as OCI descriptors and TOCs write them: ``sha256:<hex>``."""

import hashlib


def sha256_digest(data):
    """The digest of a bytes-like object."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hasher_digest(hasher):
    """The digest accumulated in a ``hashlib.sha256()`` object."""
    return "sha256:" + hasher.hexdigest()
