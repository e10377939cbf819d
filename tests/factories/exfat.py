"""A real filesystem without hard links for tests: an exFAT image on a loop device, mounted
through FUSE (Debian's exfat-fuse and exfatprogs). exFAT, like vfat and many SMB shares, answers
link(2) with EPERM. Mounting needs root, a loop device and /dev/fuse; where any is missing the
test is skipped with the reason."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_exfat(workdir: Path, size_mib: int = 256) -> Iterator[Path]:
    """An empty exFAT filesystem of ``size_mib`` MiB mounted under ``workdir``; unmounted after."""
    for tool in ("mkfs.exfat", "mount.exfat-fuse", "losetup", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: exfatprogs, exfat-fuse, mount)")
    image, mountpoint = workdir / "exfat.img", workdir / "exfat"
    mountpoint.mkdir()
    with image.open("wb") as f:
        f.truncate(size_mib << 20)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, check=False)

    made = run("mkfs.exfat", str(image))
    if made.returncode:
        pytest.skip(f"mkfs.exfat failed: {made.stderr.strip()}")
    loop = run("losetup", "--find", "--show", str(image))
    if loop.returncode:
        pytest.skip(f"no loop device here: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    try:
        mounted = run("mount.exfat-fuse", device, str(mountpoint))
        if mounted.returncode:
            pytest.skip(f"cannot mount FUSE here: {mounted.stderr.strip()}")
        try:
            yield mountpoint
        finally:
            run("umount", "--lazy", str(mountpoint))
    finally:
        run("losetup", "-d", device)
