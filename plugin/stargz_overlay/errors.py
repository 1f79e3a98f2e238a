"""Exceptions shared by every part of stargz-overlay.

Each carries a message meant for a user: the CLI prints it on one line and
the plugin logs it with the path that failed.
"""


class StargzError(Exception):
    """Base class of every error stargz-overlay reports to a user."""


class FormatError(StargzError):
    """The blob is not a well-formed stargz/eStargz layer (footer, TOC, tar)."""


class DigestMismatch(StargzError):
    """Bytes did not match the digest that the TOC or an annotation promised."""


class SourceError(StargzError):
    """A blob source (file, registry) could not deliver the bytes asked for."""


class ConfigError(StargzError):
    """A configuration file (registries.conf, auth.json, ...) is malformed."""


class InvalidReference(StargzError):
    """An image reference could not be parsed."""


class RegistryError(SourceError):
    """A registry refused, failed or could not be reached."""


class AuthError(RegistryError):
    """A registry wants credentials that are missing or were rejected."""


class NotFoundError(RegistryError):
    """The registry has no such repository, manifest or blob."""


class RangeNotSupported(RegistryError):
    """The registry answered a Range request with the whole blob."""
