"""What the viewer test needs around a real OHIF: the pinned OHIF build, an Orthanc with its
DICOMweb plugin, and one same-origin HTTP server in front of both.

* ``ohif_dist``: OHIF 3.13.2's prebuilt ``dist/`` from the npm package ``@ohif/app`` (``npm pack``;
  where npm is not installed, the same tarball from the registry's tarball URL), checked against
  its pinned SHA-1 and extracted once into ``.cache/ohif/`` (git-ignored). OHIF is never committed.
* ``start_orthanc_dicomweb``: Orthanc 1.10 (Debian ``orthanc``) with ``orthanc-dicomweb`` on a
  free loopback port, its own storage in a temp folder.
* ``ViewerServer``: written by hand on ``http.server`` because OHIF's build is served at ``/``
  (``PUBLIC_URL="/"``, so Orthanc's ServeFolders, which serves under a prefix, cannot host it), its
  client-side routes (``/viewer?...``) must fall back to ``index.html``, and the browser must see
  DICOMweb on the same origin (no CORS set-up). It serves ``dist/``, answers ``/app-config.js``
  with a configuration whose one data source is this Orthanc, and forwards ``/dicom-web/*`` to it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import mimetypes
import os
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.ingest import free_port, stop

REPO = Path(__file__).resolve().parents[2]
OHIF_VERSION = "3.13.2"
#: SHA-1 of ``npm pack @ohif/app@3.13.2`` (the registry's ``dist.shasum``)
OHIF_SHA1 = "26a51ffcc1704c30fff403258a1d7392e9a991f3"
OHIF_TARBALL_URL = f"https://registry.npmjs.org/@ohif/app/-/app-{OHIF_VERSION}.tgz"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ohif_dist(cache: Path = REPO / ".cache" / "ohif") -> Path:
    """OHIF's ``dist/`` folder, fetched and extracted on first use (needs the npm registry)."""
    dist = cache / OHIF_VERSION / "dist"
    if (dist / "index.html").exists():
        return dist
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / f"ohif-app-{OHIF_VERSION}.tgz"
    if not tgz.exists() or _sha1(tgz) != OHIF_SHA1:
        npm = shutil.which("npm")
        if npm:
            subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(cache)],
                           check=True, capture_output=True, timeout=600)
        else:
            with urllib.request.urlopen(OHIF_TARBALL_URL, timeout=300) as r, tgz.open("wb") as f:
                shutil.copyfileobj(r, f)
    got = _sha1(tgz)
    if got != OHIF_SHA1:
        raise RuntimeError(f"{tgz}: SHA-1 {got}, expected {OHIF_SHA1} for @ohif/app@{OHIF_VERSION}")
    tmp = cache / f"{OHIF_VERSION}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tgz) as t:
        members = [m for m in t.getmembers() if m.name.startswith("package/dist/")]
        t.extractall(tmp, members=members, filter="data")
    shutil.rmtree(cache / OHIF_VERSION, ignore_errors=True)
    (tmp / "package").rename(cache / OHIF_VERSION)
    shutil.rmtree(tmp, ignore_errors=True)
    return dist


def start_orthanc_dicomweb(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Orthanc with the DICOMweb plugin on loopback; returns (process, HTTP port)."""
    http_port, dicom_port = free_port(), free_port()
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"Name": "viewer-test", "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
           "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
           "Plugins": [str(DICOMWEB_PLUGIN)],
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                        "StudiesMetadata": "Full", "SeriesMetadata": "Full"}}
    (root / "orthanc.json").write_text(json.dumps(cfg))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/dicom-web/studies", timeout=5):
                return proc, http_port
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"Orthanc with DICOMweb did not start: see {root / 'orthanc.log'}")
            time.sleep(0.2)


def upload(files: list[Path], http_port: int) -> list[dict[str, Any]]:
    """POST each file to Orthanc's REST ``/instances``; returns Orthanc's answers."""
    out = []
    for f in files:
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/instances", data=f.read_bytes(),
                                     headers={"Content-Type": "application/dicom"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            out.append(json.loads(r.read()))
    return out


def app_config() -> str:
    """OHIF's ``window.config``: one DICOMweb data source, Orthanc behind the same origin."""
    return """window.config = {
  routerBasename: null, extensions: [], modes: [], customizationService: {},
  showStudyList: true, maxNumberOfWebWorkers: 2, showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false, showLoadingIndicator: true, strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (viewer test)', name: 'orthanc',
      wadoUriRoot: window.location.origin + '/dicom-web',
      qidoRoot: window.location.origin + '/dicom-web',
      wadoRoot: window.location.origin + '/dicom-web',
      qidoSupportsIncludeField: false, supportsReject: false, imageRendering: 'wadors',
      thumbnailRendering: 'wadors', enableStudyLazyLoad: true, supportsFuzzyMatching: false,
      supportsWildcard: true, dicomUploadEnabled: false, omitQuotationForMultipartRequest: true,
      bulkDataURI: { enabled: true },
    },
  }],
};
"""


class ViewerServer:
    """``dist/`` at ``/``, ``/app-config.js`` from :func:`app_config`, ``/dicom-web/*`` to Orthanc."""

    def __init__(self, dist: Path, orthanc_port: int) -> None:
        dist = dist.resolve()
        config = app_config().encode()
        upstream = f"http://127.0.0.1:{orthanc_port}"

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # the test reads no access log
                pass

            def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/"):
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")}
                    req = urllib.request.Request(upstream + self.path, headers=headers)
                    try:
                        with urllib.request.urlopen(req, timeout=60) as r:
                            body, code, hdrs = r.read(), r.status, r.headers
                    except urllib.error.HTTPError as e:
                        body, code, hdrs = e.read(), e.code, e.headers
                    self._send(code, body, hdrs.get("Content-Type", "application/octet-stream"))
                    return
                if path == "/app-config.js":
                    self._send(200, config, "application/javascript")
                    return
                f = (dist / path.lstrip("/")).resolve()
                if not f.is_file() or dist not in f.parents:
                    f = dist / "index.html"  # client-side route
                ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                if f.suffix == ".wasm":
                    ctype = "application/wasm"
                self._send(200, f.read_bytes(), ctype)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ViewerServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
