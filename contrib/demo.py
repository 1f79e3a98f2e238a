"""The main job: convert a real tree to eStargz, then read it back lazily.

Run through ``contrib/run demo`` (which installs everything first).  Uses the
``stargz-overlay`` CLI exactly as a user would and prints what each step took.
"""

import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time

CLI = [sys.executable, "-m", "stargz_overlay"]


def step(title, argv, **kwargs):
    start = time.monotonic()
    result = subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)
    print(f"[{time.monotonic() - start:6.2f} s] {title}")
    return result.stdout


def main():
    stdlib = sysconfig.get_paths()["stdlib"]
    with tempfile.TemporaryDirectory(prefix="stargz-demo-") as tmp:
        layer = os.path.join(tmp, "layer.tar")
        start = time.monotonic()
        with tarfile.open(layer, "w") as tar:
            tar.add(stdlib, arcname="usr/lib/python3", filter=lambda i: None
                    if "__pycache__" in i.name or "site-packages" in i.name else i)
        size = os.path.getsize(layer)
        print(f"[{time.monotonic() - start:6.2f} s] packed {stdlib} into a "
              f"{size / 1e6:.1f} MB tar layer")
        prio = os.path.join(tmp, "startup-files")
        with open(prio, "w") as f:
            f.write("usr/lib/python3/os.py\nusr/lib/python3/site.py\n")
        blob = os.path.join(tmp, "layer.esgz")
        out = step("converted it to eStargz (os.py and site.py prioritized)",
                   CLI + ["convert", layer, blob, "--prioritized-files", prio])
        print("    " + out.strip().replace("\n", "\n    "))
        listing = step("listed the layer from its TOC only", CLI + ["ls", blob])
        print(f"    {len(listing.splitlines())} entries, e.g.:")
        for line in listing.splitlines()[1:4]:
            print("    " + line)
        text = step("read one file, verified against its chunk digests",
                    CLI + ["cat", blob, "usr/lib/python3/this.py"])
        print(f"    usr/lib/python3/this.py: {len(text)} characters")
        out = step("verified every chunk and file digest", CLI + ["verify", blob])
        print("    " + out.strip())
        with tarfile.open(blob, "r:gz") as tar:
            print(f"    still a plain tar.gz: {len(tar.getnames())} tar entries")


if __name__ == "__main__":
    main()
