"""Benchmark: building one draft's DICOM objects (SR, report PDF, KOS), with same-run baselines.

Run with::

    .venv/bin/python bench/dicom_objects.py            # --repeat N to change the number of timed runs

For one draft of the corpus CT (2 key images rendered to 512 x 512 PNGs, the English/Arabic sample text) it
times, on one core, the median of N runs after one warm-up:

* sr:        build_draft_sr + Part 10 bytes (highdicom content items, pydicom modules)
* kos:       build_kos + Part 10 bytes (highdicom ko)
* pdf:       render_report_pdf (WeasyPrint: HTML -> Pango/HarfBuzz layout -> PDF, thumbnails)
* pdf-dicom: build_encapsulated_pdf + Part 10 bytes of that PDF
* all:       build_draft_objects + Part 10 bytes of the three datasets (what publishing does)

Baselines of the same run:

* pydicom write: dcmwrite of the already built SR dataset (the floor of any SR writer: the cost
  of building the tree is the difference)
* pdf bytes: the PDF library alone (pydyf via WeasyPrint) re-serialising the laid-out document
  (``document.write_pdf()`` on an already rendered document): layout cost is the difference
* weasyprint text-only: the same page without thumbnails (what the key images add)
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom.filewriter import dcmwrite

from reporting.dicom import (
    Equipment,
    SourceAttributes,
    build_draft_objects,
    build_draft_sr,
    build_encapsulated_pdf,
    build_kos,
    part10,
    render_report_pdf,
)
from reporting.dicom.pdf import report_html
from reporting.draft import Draft
from tests.factories.drafts import CT_3SLICE, draft_from_dicom
from tests.factories.key_images import with_key_image_pngs


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up (imports, font loading, caches)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def build_all(draft: Draft, source: SourceAttributes, equipment: Equipment, pngs: dict[str, bytes]) -> list[bytes]:
    objects = build_draft_objects(draft, source, equipment, pngs)
    return [part10(ds) for ds in (objects.sr, objects.pdf_document, objects.kos) if ds is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    base = draft_from_dicom(CT_3SLICE)
    draft, pngs = with_key_image_pngs(base, CT_3SLICE, ["Axial CT, slice 1", "Axial CT, slice 2"])
    source = SourceAttributes.from_study_ref(draft.study)
    equipment = Equipment(software_version="bench")
    sr = build_draft_sr(draft, source, equipment)
    pdf = render_report_pdf(draft, source, pngs)

    def write_sr() -> None:
        dcmwrite(io.BytesIO(), sr, enforce_file_format=True)

    from weasyprint import HTML

    laid_out = HTML(string=report_html(draft, source, pngs)).render()
    results = {
        "sr (build + bytes)": timed(lambda: part10(build_draft_sr(draft, source, equipment)), args.repeat),
        "kos (build + bytes)": timed(lambda: part10(build_kos(draft, source, equipment)), args.repeat),
        "pdf (render)": timed(lambda: render_report_pdf(draft, source, pngs), args.repeat),
        "pdf-dicom (wrap + bytes)": timed(lambda: part10(build_encapsulated_pdf(draft, source, equipment, pdf)),
                                          args.repeat),
        "all three (publish's build)": timed(lambda: build_all(draft, source, equipment, pngs), args.repeat),
        "baseline: pydicom dcmwrite of the built SR": timed(write_sr, args.repeat),
        "baseline: write_pdf of the laid-out page": timed(lambda: laid_out.write_pdf(), args.repeat),
        "baseline: pdf without thumbnails": timed(lambda: render_report_pdf(draft, source, {}), args.repeat),
    }
    print(f"one draft, {len(draft.key_images)} key images, median of {args.repeat} runs, one core:")
    for name, seconds in results.items():
        print(f"  {name:<45} {seconds * 1000:8.1f} ms")
    print(f"  PDF size {len(pdf) / 1024:.0f} KiB, SR size {len(part10(sr)) / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
