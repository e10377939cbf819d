"""Python side of the independent FHIR R4 validator (see validate.js and README.md).

Installs the pinned npm package (package-lock.json, ``npm ci``) on first use, so that a clean
clone needs nothing but node/npm on PATH.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def ensure_installed() -> None:
    """``npm ci`` once, when node_modules is missing."""
    if (HERE / "node_modules" / "@asymmetrik" / "fhir-json-schema-validator" / "fhir.schema.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not on PATH: the independent FHIR validator needs node and npm")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, capture_output=True, timeout=300)


def validate_r4(resources: list[dict[str, Any]]) -> list[list[str]]:
    """Errors per resource against the official R4 JSON schema (empty lists when valid)."""
    ensure_installed()
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not on PATH: the independent FHIR validator needs it")
    proc = subprocess.run(
        [node, str(HERE / "validate.js")], input=json.dumps(resources), capture_output=True,
        text=True, check=True, cwd=HERE, timeout=120,
    )
    result: list[list[str]] = json.loads(proc.stdout)
    return result


def assert_valid_r4(*resources: dict[str, Any]) -> None:
    """Fail with every schema error when any resource is not valid R4 JSON."""
    errors = validate_r4(list(resources))
    bad = {f"{r.get('resourceType')}/{r.get('id')}": e for r, e in zip(resources, errors, strict=True) if e}
    assert not bad, f"R4 JSON schema errors: {json.dumps(bad, indent=1)[:4000]}"
