"""stargz-overlay: lazy stargz/eStargz lower layers for fuse-overlayfs."""

__version__ = "0.1.0"
