"""Subcommands of ``stargz-overlay``, one module per group.

Every module here has ``register(subparsers)``, which adds its subcommands
and sets ``func`` on each to a callable taking the parsed arguments.
"""

from . import analyze, blob, cache, integration, registry, plugin

COMMAND_MODULES = (blob, registry, plugin, cache, analyze, integration)
