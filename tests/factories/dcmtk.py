"""Real DICOM peers for tests: DCMTK's storescu/echoscu, and a pynetdicom sender that streams a
file's bytes exactly as they are (for malformed files DCMTK refuses to send)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_preamble
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.dsutils import create_file_meta

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def require_dcmtk() -> None:
    missing = [t for t in ("storescu", "echoscu", "dcmsend") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(f"{missing} not found: install Debian's dcmtk package (.ci/run does)")


def echoscu(port: int, *, called: str = "TAQRIR", calling: str = "ECHOSCU", timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-to", "5", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


@dataclass
class StoreRun:
    returncode: int
    output: str

    def statuses(self) -> list[str]:
        """The status names storescu reported, one per file sent."""
        return re.findall(r"Received Store Response \(([^)]*)\)", self.output)


def storescu(port: int, files: Sequence[Path], *, called: str = "TAQRIR", calling: str = "STORESCU",
             timeout: float = 120) -> StoreRun:
    """Send files in one association, proposing each file's own transfer syntax (-R): a PACS
    forwards what it stores, as it stores it."""
    cmd = ["storescu", "-v", "-R", "-nh", "-to", "10", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
           *[str(f) for f in files]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)
    return StoreRun(p.returncode, p.stdout + p.stderr)


def send_raw(port: int, path: Path, *, called: str = "TAQRIR", calling: str = "RAWSCU") -> int | None:
    """C-STORE a file's encoded dataset byte for byte (no re-encoding). Returns the status, or
    None when the association failed. Needs the file's meta for SOP class and transfer syntax."""
    with open(path, "rb") as f:
        read_preamble(f, force=True)
    ds = dcmread(path, stop_before_pixels=True, force=True)
    meta = ds.file_meta
    sop_class = meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID
    ts = meta.TransferSyntaxUID
    if "MediaStorageSOPClassUID" not in meta or "MediaStorageSOPInstanceUID" not in meta:
        # pynetdicom streams from a file only with complete meta: give it one, dataset untouched
        fixed = tempfile.NamedTemporaryFile(suffix=".dcm", delete=False)  # noqa: SIM115 - closed below, after DCMTK wrote it
        raw = path.read_bytes()
        start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
        with fixed:
            fixed.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(fixed, create_file_meta(sop_class_uid=sop_class,
                                 sop_instance_uid=ds.SOPInstanceUID, transfer_syntax=ts))
            fixed.write(raw[start:])
        path = Path(fixed.name)
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class, [ts])
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            return None
        try:
            rsp = assoc.send_c_store(path)
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return int(rsp.Status) if rsp and "Status" in rsp else None


def dcmsend(port: int, files: Sequence[Path], *, called: str = "TAQRIR", calling: str = "DCMSEND",
            timeout: float = 120) -> StoreRun:
    """Send files with DCMTK's dcmsend, which proposes each file's own transfer syntax (storescu
    in DCMTK 3.6.7 proposes only uncompressed syntaxes for a compressed file unless told which)."""
    cmd = ["dcmsend", "-v", "-nh", "-dn", "-to", "10", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
           *[str(f) for f in files]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)
    out = p.stdout + p.stderr
    return StoreRun(p.returncode, out.replace("Received C-STORE Response", "Received Store Response"))


def send_raw_many(port: int, paths: Sequence[Path], *, called: str = "TAQRIR",
                  calling: str = "RAWSCU") -> list[tuple[int | None, str]]:
    """C-STORE each file's encoded dataset byte for byte, all in one association, each announced
    with its file meta's SOP class and instance. Returns (status, Error Comment) per file."""
    metas = [dcmread(p, stop_before_pixels=True, force=True).file_meta for p in paths]
    ae = AE(ae_title=calling)
    for sop_class, ts in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(sop_class, [ts])
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    out: list[tuple[int | None, str]] = []
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        assert assoc.is_established, "association refused"
        try:
            for path in paths:
                rsp = assoc.send_c_store(path)
                status = int(rsp.Status) if rsp and "Status" in rsp else None
                out.append((status, str(rsp.get("ErrorComment", "")) if rsp else ""))
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return out
