"""The inference room imports no FHIR, DICOM networking or database code (DESIGN.md, rooms)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

MODULES = ("backend", "checkpoint", "cli", "config", "constraints", "drafting", "images", "prompt_format",
           "prompts", "scripts", "sections", "server", "sglang", "tiny", "transformers_backend", "types")
FORBIDDEN = ("pynetdicom", "fhir", "fhirclient", "sqlalchemy", "sqlmodel", "integrations", "reporting",
             "workers", "ground.db", "celery")


def test_no_forbidden_imports() -> None:
    code = (
        "import sys\n"
        + "".join(f"import inference.{m}\n" for m in MODULES)
        + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
