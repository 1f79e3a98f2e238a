"""Build and install stargz-overlay: the Python package and the plugin .so."""

import os
import sys
import sysconfig

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN_SO = "libstargz_plugin.so"


class build_py_with_plugin(build_py):
    """Also compile the fuse-overlayfs plugin (cstub/build_plugin.py) into the package.

    A regular build puts it into build_lib (so the wheel carries it); an editable
    install puts it next to the sources, and bakes the installing interpreter's
    site-packages into it so the plugin finds the dependencies of that environment.
    """

    def run(self):
        super().run()
        sys.path.insert(0, os.path.join(HERE, "cstub"))
        import build_plugin
        if getattr(self, "editable_mode", False):
            target = os.path.join(HERE, "plugin", "stargz_overlay", PLUGIN_SO)
            paths = sysconfig.get_paths()
            extra = sorted({paths["purelib"], paths["platlib"]})
        else:
            target = os.path.join(self.build_lib, "stargz_overlay", PLUGIN_SO)
            extra = []
        build_plugin.build(target, extra)


class BinaryDistribution(Distribution):
    """The wheel holds a compiled .so: tag it for this platform."""

    def has_ext_modules(self):
        return True


setup(
    cmdclass={"build_py": build_py_with_plugin},
    distclass=BinaryDistribution,
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
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "atheris>=2.3"],
                    "bench": ["matplotlib>=3.5"]},
    entry_points={"console_scripts": ["stargz-overlay = stargz_overlay.cli:main",
                                      "stargz-overlay-mount = stargz_overlay.mount_program:main"]},
)
