"""libFuzzer (atheris) driver for the targets in ``fuzz_targets``.

    python -m tests.reliability.atheris_fuzz TARGET [libFuzzer flags, e.g. -max_total_time=60]

TARGET is footer, toc_json, toc_member, blob or tar_input.  The package
stargz_overlay is instrumented for coverage; the corpus starts from real
inputs (a converted blob, its TOC, a tar) in a temporary directory.  Any
exception other than a StargzError, or an accepted input that breaks an
invariant, is a crash; libFuzzer writes the input to ``-artifact_prefix``.
"""

import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["stargz_overlay"]):
    from . import fuzz_targets


def main(argv):
    name = argv[1]
    target = fuzz_targets.TARGETS[name]
    corpus = tempfile.mkdtemp(prefix=f"stargz-fuzz-{name}-")
    for i, seed in enumerate(fuzz_targets.seeds(name)):
        with open(f"{corpus}/seed{i}", "wb") as f:
            f.write(seed)
    atheris.Setup([argv[0]] + argv[2:] + [corpus], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
