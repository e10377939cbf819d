"""Times the header walk (:func:`integrations.dicom.walk.walk_header`) against pydicom's
``dcmread(path, specific_tags=..., stop_before_pixels=True)`` on the test corpus, in the same run,
for the keywords the index reads; and the ingest's whole header reader
(:func:`integrations.dicom.headers.read_headers`: the walk, or the full parse where the walk steps
aside) against its full-parse reference (:func:`read_headers_pydicom`).

    flock /tmp/taqrir-bench.lock .venv/bin/python bench/header_walk.py [--repeats 7] [--json OUT] [--folder DIR]

``--folder DIR`` times the files under DIR instead (e.g. a series written by
``tests.factories.studies.make_ct_series``, the shape of the ingest benchmarks' study).

Every file under tests/data/dicom is read once untimed (page cache, pydicom's lazy imports), then
each reader reads it ``--repeats`` times in turn; the best time per file counts (the machine is
shared: the minimum is the least noisy figure). The walk-versus-``specific_tags`` ratio is over
the files the walk answers (it steps aside for the others: implicit VR, big endian, deflate, UN
values... see test_headers_walk.py); the reader ratio is over every file the ingest accepts.
Both readers run under pydicom's default configuration (reading validation WARN, warnings
silenced), as a plain ``dcmread`` does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from integrations.dicom.errors import DicomInputError
from integrations.dicom.headers import (
    DEFAULT_MAX_SEQUENCE_DEPTH,
    INDEXED_KEYWORDS,
    read_headers,
    read_headers_pydicom,
)
from integrations.dicom.walk import NotWalkable, walk_header

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "dicom"


def _walk(path: Path) -> object:
    with open(path, "rb") as f:
        return walk_header(f, INDEXED_KEYWORDS, file_size=path.stat().st_size,
                           max_sequence_depth=DEFAULT_MAX_SEQUENCE_DEPTH)


def _specific_tags(path: Path) -> object:
    return dcmread(path, specific_tags=list(INDEXED_KEYWORDS), stop_before_pixels=True)


def _best(fn: Callable[[Path], object], path: Path, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(path)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _ok(fn: Callable[[Path], object], path: Path, errors: tuple[type[Exception], ...]) -> bool:
    try:
        fn(path)
    except errors:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--folder", type=Path, default=CORPUS, help="the files to read (default: the test corpus)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    files = sorted(p for p in args.folder.rglob("*") if p.is_file() and not p.name.endswith(".md"))
    walked = [p for p in files if _ok(_walk, p, (NotWalkable,))]
    walked = [p for p in walked if _ok(_specific_tags, p, (Exception,))]
    accepted = [p for p in files if _ok(read_headers, p, (DicomInputError,))]
    rows: dict[str, list[float]] = {"walk": [], "specific_tags": [], "read_headers": [], "read_headers_pydicom": []}
    for p in walked:
        rows["walk"].append(_best(_walk, p, args.repeats))
        rows["specific_tags"].append(_best(_specific_tags, p, args.repeats))
    for p in accepted:
        rows["read_headers"].append(_best(read_headers, p, args.repeats))
        rows["read_headers_pydicom"].append(_best(read_headers_pydicom, p, args.repeats))
    out: dict[str, Any] = {"files": len(files), "walked": len(walked), "accepted": len(accepted),
                           "repeats": args.repeats}
    for name, ms in rows.items():
        out[name] = {"total_ms": round(sum(ms), 2), "median_ms": round(statistics.median(ms), 4)}
    out["ratio_specific_tags_over_walk"] = round(sum(rows["specific_tags"]) / sum(rows["walk"]), 2)
    out["median_ratio_specific_tags_over_walk"] = round(statistics.median(
        s / w for s, w in zip(rows["specific_tags"], rows["walk"], strict=True)), 2)
    out["ratio_pydicom_over_read_headers"] = round(sum(rows["read_headers_pydicom"]) / sum(rows["read_headers"]), 2)
    print(f"{args.folder}: {len(files)} files; the walk answers {len(walked)}, the ingest accepts {len(accepted)}"
          f" (best of {args.repeats} per file)")
    print(f"{'reader':<24}{'total ms':>10}{'median ms':>11}")
    for name in rows:
        print(f"{name:<24}{out[name]['total_ms']:>10.2f}{out[name]['median_ms']:>11.4f}")
    print(f"dcmread(specific_tags) / walk: {out['ratio_specific_tags_over_walk']}x over the walked files "
          f"(median per file {out['median_ratio_specific_tags_over_walk']}x)")
    print(f"read_headers_pydicom / read_headers: {out['ratio_pydicom_over_read_headers']}x over the accepted files")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
