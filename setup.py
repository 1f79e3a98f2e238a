"""Build and install stargz-overlay: the Python package and the plugin .so."""

from setuptools import setup

setup(
    name="stargz-overlay",
    version="0.1.0",
    description="Lazy stargz/eStargz lower layers for fuse-overlayfs (Podman, CRI-O, Buildah)",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    python_requires=">=3.11",
    package_dir={"": "plugin"},
    packages=["stargz_overlay", "stargz_overlay.commands"],
    install_requires=["cffi>=1.15", "requests>=2.28"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["stargz-overlay = stargz_overlay.cli:main"]},
)
