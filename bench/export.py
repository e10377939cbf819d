"""Export benchmark: the outbox (C-STORE SCU) to Orthanc against DCMTK ``storescu`` sending the
same files, in the same run.

    .venv/bin/python bench/export.py [--drafts 40] [--runs 3] [--database-url URL]

One draft's SR, PDF and KOS are built with the real builders (``reporting/dicom``; the build time
is reported too), then copied ``--drafts`` times with new SOP Instance UIDs (same bytes otherwise)
into /dev/shm. Every sender gets its own copies, so Orthanc (Debian, on loopback, its storage under
/dev/shm) stores new instances each time. Senders:

- ``storescu``: DCMTK, all files over one association (``TCP_NODELAY=1``).
- ``outbox, 1 association per object``: each outbox row alone: claim (compare-and-set + audit
  record), one association, C-STORE, result row + audit record.
- ``outbox, export tasks``: what the ``export`` task does for each row: the row and the due rows
  of its draft and destination (SR, PDF, KOS) on one association; the siblings' own tasks then
  find them sent.
- ``outbox, batch``: :func:`integrations.dicom.export.deliver` with every row at once (one
  association per destination), the same bookkeeping per row.

Prints objects/s and MB/s (median of runs) and the ratio to storescu.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pydicom
from pydicom.uid import generate_uid

from ground.db import make_engine, session_scope, upgrade
from integrations.dicom.destinations import Destination, ExportSettings, ObjectKind
from integrations.dicom.export import deliver
from integrations.dicom.outbox import OutboxObject, enqueue_objects, with_siblings
from reporting.dicom import Equipment, SourceAttributes
from reporting.dicom.objects import build_draft_objects, part10
from tests.factories.db import reset_postgres_schema
from tests.factories.drafts import CT_3SLICE, sample_draft
from tests.factories.key_images import with_key_image_pngs
from tests.factories.orthanc import OrthancServer

ENV = {**os.environ, "TCP_NODELAY": "1"}
KINDS = {"1.2.840.10008.5.1.4.1.1.88.22": ObjectKind.sr, "1.2.840.10008.5.1.4.1.1.104.1": ObjectKind.pdf,
         "1.2.840.10008.5.1.4.1.1.88.59": ObjectKind.kos}


def build_once(runs: int) -> tuple[list[bytes], list[float]]:
    """The draft's three objects as Part 10 bytes, and the build times (s) of ``runs`` builds."""
    draft, pngs = with_key_image_pngs(sample_draft(), CT_3SLICE, ["Axial CT, slice 1", "Axial CT, slice 2"])
    source = SourceAttributes.from_study_ref(draft.study)
    times, objs = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        objs = build_draft_objects(draft, source, Equipment(software_version="bench"), pngs)
        datasets = [objs.sr, objs.pdf_document, *([objs.kos] if objs.kos is not None else [])]
        blobs = [part10(ds) for ds in datasets]
        times.append(time.perf_counter() - t0)
    return blobs, times


def copies(blobs: list[bytes], n: int, folder: Path) -> list[Path]:
    """``n`` copies of each object with fresh SOP Instance UIDs."""
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        for j, blob in enumerate(blobs):
            ds = pydicom.dcmread(io.BytesIO(blob))
            uid = generate_uid()
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            path = folder / f"{i:04d}-{j}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
    return out


def storescu(port: int, files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["storescu", "-aec", "PACS", "-aet", "TAQRIR", "127.0.0.1", str(port), *map(str, files)],
                   env=ENV, check=True, capture_output=True)
    return time.perf_counter() - t0


def outbox(db_url: str, port: int, files: list[Path], *, mode: str) -> float:
    """Queue ``files`` (three per draft) and deliver them as ``mode`` says: ``object`` (one
    association per object), ``task`` (what the export task does: the row and the due rows of its
    draft and destination together) or ``batch`` (every row in one call)."""
    if db_url.startswith("postgresql"):
        reset_postgres_schema(db_url)
    engine = make_engine(db_url)
    upgrade(engine)
    settings = ExportSettings(destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)])
    ids: list[int] = []
    for start in range(0, len(files), 3):
        objects = []
        for f in files[start:start + 3]:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            objects.append(OutboxObject(kind=KINDS[str(ds.SOPClassUID)], sop_class_uid=str(ds.SOPClassUID),
                                        sop_instance_uid=str(ds.SOPInstanceUID), location=str(f)))
        with session_scope(engine) as s:
            ids += enqueue_objects(s, draft_id=f"bench-{start // 3}", study_instance_uid="1.2.3", objects=objects,
                                   destinations=settings.destinations)
    t0 = time.perf_counter()
    done = []
    if mode == "batch":
        done = deliver(engine, settings, ids)
    else:
        for i in ids:
            with session_scope(engine) as s:
                rows = with_siblings(s, i) if mode == "task" else [i]
            done += deliver(engine, settings, rows)
    elapsed = time.perf_counter() - t0
    bad = [d for d in done if d.state.value != "sent"]
    assert len(done) == len(ids) and not bad, bad[:3]
    engine.dispose()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafts", type=int, default=40, help="copies of the draft's SR+PDF+KOS per sender and run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--database-url", default=None, help="outbox database (default: a SQLite file in /dev/shm)")
    args = ap.parse_args()
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    work = Path(tempfile.mkdtemp(prefix="taqrir-export-bench-", dir=shm))
    pacs = OrthancServer(work / "orthanc", aet="PACS")
    try:
        blobs, build = build_once(max(args.runs, 3))
        print(f"build SR+PDF+KOS for one draft: median {statistics.median(build) * 1000:.0f} ms "
              f"(min {min(build) * 1000:.0f}, {len(build)} builds; sizes {[len(b) for b in blobs]} bytes)")
        pacs.start()
        senders: dict[str, Callable[[list[Path], int], float]] = {
            "storescu (1 association)": lambda files, _r: storescu(pacs.dicom_port, files),
            "outbox, 1 association per object": lambda files, r: outbox(
                args.database_url or f"sqlite:///{work}/outbox-object-{r}.db", pacs.dicom_port, files, mode="object"),
            "outbox, export tasks": lambda files, r: outbox(
                args.database_url or f"sqlite:///{work}/outbox-task-{r}.db", pacs.dicom_port, files, mode="task"),
            "outbox, batch (1 association)": lambda files, r: outbox(
                args.database_url or f"sqlite:///{work}/outbox-batch-{r}.db", pacs.dicom_port, files, mode="batch"),
        }
        times: dict[str, list[float]] = {k: [] for k in senders}
        files_n, mb = 0, 0.0
        for r in range(args.runs):
            for label, send in senders.items():  # interleaved, so drift hits every sender alike
                files = copies(blobs, args.drafts, work / f"{r}-{label.split()[0]}-{len(times[label])}")
                files_n, mb = len(files), sum(f.stat().st_size for f in files) / 1e6
                times[label].append(send(files, r))
                shutil.rmtree(files[0].parent)
        print(f"\n{files_n} objects ({args.drafts} drafts x SR+PDF+KOS, {mb:.1f} MB) to Orthanc "
              f"{pacs.get('/system')['Version']}, median of {args.runs}; database "
              f"{(args.database_url or 'sqlite (/dev/shm)').split('@')[-1]}:")
        print(f"{'sender':<34}{'obj/s':>8}{'MB/s':>8}{'/storescu':>11}")
        base = statistics.median(times["storescu (1 association)"])
        for label, ts in times.items():
            t = statistics.median(ts)
            print(f"{label:<34}{files_n / t:>8.1f}{mb / t:>8.2f}{base / t:>11.2f}")
    finally:
        pacs.stop(kill=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
