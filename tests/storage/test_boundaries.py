"""The storage room imports only the ground (DESIGN.md, rooms: it must not know what a study is)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

ROOMS = ("integrations", "workers", "reporting", "inference", "audit", "taqrir", "sqlalchemy", "sqlmodel", "pydicom")


def test_storage_imports_no_room() -> None:
    code = (
        "import sys\n"
        "import storage\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {ROOMS!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
