"""write_render_output: PNG files plus provenance.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from workers.render import instances_from_files, render_study, write_render_output
from workers.render_config import RenderSettings

from .conftest import png_array


def test_written_files_match_provenance(corpus: Path, tmp_path: Path) -> None:
    paths = [
        *sorted((corpus / "ct/series_dcmqi_ct3slice").glob("*.dcm")),
        corpus / "other/pydicom_test-SR.dcm",
    ]
    rendered = render_study(instances_from_files(paths), RenderSettings())
    out = tmp_path / "out"
    path = write_render_output(rendered, out)
    assert path == out / "provenance.json"
    prov = json.loads(path.read_text("utf-8"))
    assert len(prov["key_images"]) == len(rendered.key_images) == 4  # 3 slices + lung window
    for entry, key in zip(prov["key_images"], rendered.key_images, strict=True):
        data = (out / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] == key.sha256
        assert png_array(data).shape[:2] == (entry["height"], entry["width"])
        assert entry["series_instance_uid"] == key.series_instance_uid
        assert entry["sop_instance_uids"] == list(key.sop_instance_uids) and entry["frames"] == [1]
        assert entry["window"] in ("C40/W400 soft tissue", "C-600/W1500 lung")
    assert {d["chosen"] for d in prov["decisions"]} == {True, False}
    assert prov["failures"] == []
    assert min(p.name for p in out.iterdir()).startswith("01-ct-axial-slice-1-3")
