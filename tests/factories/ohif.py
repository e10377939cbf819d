"""OHIF v3 served against Orthanc on one origin, for the viewer test.

OHIF's npm build (``@ohif/app``'s prebuilt ``dist/``) expects to be served at ``/``; this small
server serves it, answers page routes (``/viewer?...``) with ``index.html``, serves our own
``app-config.js``, and forwards ``/dicom-web`` and ``/wado`` to Orthanc so the browser sees one
origin (no CORS). What it took is in INTEGRATION-NOTES ("OHIF against Orthanc").
"""

from __future__ import annotations

import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx

VIEWER_DIR = Path(__file__).resolve().parent.parent / "viewer"
OHIF_DIST = VIEWER_DIR / "ohif" / "package" / "dist"
PUPPETEER = VIEWER_DIR / "node_modules" / "puppeteer-core"

APP_CONFIG = """
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (test PACS)',
      name: 'orthanc',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      wadoUriRoot: '/wado',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""

_FORWARD = ("/dicom-web", "/wado")
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-encoding", "content-length"}


class OhifServer:
    """Serves ``dist`` on a free loopback port, forwarding DICOMweb/WADO to ``orthanc_url``."""

    def __init__(self, orthanc_url: str, dist: Path = OHIF_DIST) -> None:
        self.dist = dist
        self.orthanc_url = orthanc_url.rstrip("/")
        client = httpx.Client(timeout=60)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # the http.server interface
                path = urlsplit(self.path).path
                if path.startswith(_FORWARD):
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
                    # Orthanc builds bulk-data links from the Host it is asked for: keep ours.
                    headers["Host"] = self.headers.get("Host", f"127.0.0.1:{outer.port}")
                    r = client.get(outer.orthanc_url + self.path, headers=headers)
                    outer.requests.append((self.path, headers.get("Accept", ""), r.status_code))
                    extra = {k: v for k, v in r.headers.items() if k.lower() not in _HOP | {"content-type"}}
                    self._send(r.status_code, r.content, r.headers.get("content-type", "application/octet-stream"),
                               extra)
                    return
                if path == "/app-config.js":
                    self._send(200, APP_CONFIG.encode(), "application/javascript")
                    return
                file = (outer.dist / path.lstrip("/")).resolve()
                if not file.is_file() or outer.dist.resolve() not in file.parents:
                    file = outer.dist / "index.html"
                ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                if file.suffix == ".wasm":
                    ctype = "application/wasm"
                self._send(200, file.read_bytes(), ctype)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-static", daemon=True)
        self._client = client
        #: (path, Accept, status) of every forwarded request, to explain a failure.
        self.requests: list[tuple[str, str, int]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OhifServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._client.close()
