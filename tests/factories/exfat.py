"""A real filesystem without hard links for tests: an exFAT image on a loop device, mounted
through FUSE (Debian's exfat-fuse and exfatprogs). exFAT, like vfat and many SMB shares, answers
link(2) with EPERM; its FUSE daemon (libfuse 2) does not implement FUSE_SYNCFS. Mounting needs
root, a loop device and /dev/fuse; where any is missing the test is skipped with the reason."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.local import filesystem_type


@contextlib.contextmanager
def mounted_exfat(workdir: Path, size_mib: int = 256, *, log: Path | None = None) -> Iterator[Path]:
    """An empty exFAT filesystem of ``size_mib`` MiB mounted under ``workdir``; unmounted after.
    With ``log``, the FUSE daemon runs in debug mode and writes every request it gets there
    (``opcode: FSYNC (20)``...)."""
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
    daemon: subprocess.Popen[bytes] | None = None
    try:
        if log is None:
            mounted = run("mount.exfat-fuse", device, str(mountpoint))
            if mounted.returncode:
                pytest.skip(f"cannot mount FUSE here: {mounted.stderr.strip()}")
        else:  # in the foreground, as debug mode keeps it
            with log.open("wb") as out:
                daemon = subprocess.Popen(["mount.exfat-fuse", "-d", device, str(mountpoint)], stdout=out,
                                          stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 10
            while not filesystem_type(mountpoint).startswith("fuse"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    daemon.kill()
                    pytest.skip(f"cannot mount FUSE here: {log.read_text(errors='replace')[-500:]}")
                time.sleep(0.05)
        try:
            yield mountpoint
        finally:
            # lazily only if busy (a file left open by a failed test: detached now, gone with it)
            if run("umount", str(mountpoint)).returncode:
                run("umount", "--lazy", str(mountpoint))
            if daemon is not None:
                try:
                    daemon.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    daemon.kill()
    finally:
        run("losetup", "-d", device)
