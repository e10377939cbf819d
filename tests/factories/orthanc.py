"""A real PACS for the tests: Debian's Orthanc, on free loopback ports, with its own storage.

:class:`OrthancServer` writes a minimal JSON configuration, starts ``Orthanc`` and waits for its
REST API; it can be stopped and started again on the same ports and storage (a PACS that goes
down and comes back), and configured to know only some calling AE titles (a PACS that refuses
us). The DICOMweb plugin (Debian ``orthanc-dicomweb``) is loaded when asked for, without the
Debian default ``Host`` setting that breaks bulk-data links (see INTEGRATION-NOTES).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

DICOMWEB_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin library, when installed."""
    for d in DICOMWEB_PLUGIN_DIRS:
        for p in sorted(d.glob("libOrthancDicomWeb.so*")) if d.is_dir() else []:
            return p
    return None


class OrthancServer:
    """One Orthanc process (restartable) with its configuration and storage under ``root``."""

    def __init__(self, root: Path, *, aet: str = "ORTHANC", known_aes: Mapping[str, tuple[str, int]] | None = None,
                 refuse_unknown: bool = False, dicomweb: bool = False) -> None:
        exe = shutil.which("Orthanc")
        assert exe, "Orthanc is needed (Debian package orthanc; tests/run.sh installs it)"
        self.exe = exe
        self.root = root
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.known_aes = dict(known_aes or {})
        self.refuse_unknown = refuse_unknown
        self.dicomweb = dicomweb
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "Name": f"taqrir-test-{self.aet}", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": self.aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [], "DicomModalities": {name.lower(): [ae, "127.0.0.1", port]
                                               for name, (ae, port) in self.known_aes.items()},
            "DicomCheckCalledAet": True, "StableAge": 1, "ConcurrentJobs": 1,
        }
        if self.refuse_unknown:
            # Unknown calling AE titles are refused at association (Orthanc accepts anyone by
            # default for C-ECHO and C-STORE).
            cfg.update({"DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False,
                        "DicomAlwaysAllowFind": False, "DicomAlwaysAllowMove": False})
        if self.dicomweb:
            plugin = dicomweb_plugin()
            assert plugin, "the DICOMweb plugin is needed (Debian package orthanc-dicomweb)"
            cfg["Plugins"] = [str(plugin)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                               "Ssl": False}
        return cfg

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config()))
        self.proc = subprocess.Popen([self.exe, f"--logdir={self.root}", str(path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}; see {self.root}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("Orthanc did not start")

    def stop(self, *, kill: bool = False) -> None:
        """Stop Orthanc (gracefully by default, as a PACS restart; ``kill`` for teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    # -- REST helpers -------------------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> Any:
        r = httpx.get(f"{self.url}{path}", timeout=30, **kwargs)
        r.raise_for_status()
        return r.json()

    def upload(self, data: bytes) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/instances", content=data, timeout=30)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def find_instance(self, sop_instance_uid: str) -> list[str]:
        """Orthanc ids of instances with this SOP Instance UID (a list, to count duplicates)."""
        r = httpx.post(f"{self.url}/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
                       timeout=30)
        r.raise_for_status()
        ids: list[str] = r.json()
        return ids

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        tags: dict[str, Any] = self.get(f"/instances/{orthanc_id}/simplified-tags")
        return tags

    def instance_file(self, orthanc_id: str) -> bytes:
        r = httpx.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30)
        r.raise_for_status()
        return r.content
