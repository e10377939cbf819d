#!/usr/bin/env bash
# Install what the test suite needs and run it. The README's test command; .ci/run calls it.
#
# Needs: Python 3.11+, and for the real peers and services Debian packages dcmtk, orthanc,
# orthanc-dicomweb, redis-server, postgresql, iproute2, procps, rsyslog, rsyslog-gnutls, nodejs, npm, chromium,
# dicom3tools, poppler-utils, fonts-noto-core, fonts-hosny-amiri and Pango (for WeasyPrint),
# installed with apt-get when missing and running as root.
# PostgreSQL (127.0.0.1:5432, trust auth, database `test`) and Redis (127.0.0.1:6379) are started
# when they are down. Extra arguments go to pytest (e.g. `bash tests/run.sh -k listener`).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v storescu >/dev/null || need_pkgs+=(dcmtk)
command -v dcmsend >/dev/null || need_pkgs+=(dcmtk)
command -v Orthanc >/dev/null || need_pkgs+=(orthanc)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v pg_ctlcluster >/dev/null || need_pkgs+=(postgresql)
# ss and pgrep: which receiving process holds an association (test_crash_and_stability)
command -v ss >/dev/null || need_pkgs+=(iproute2)
command -v pgrep >/dev/null || need_pkgs+=(procps)
# the ATNA collector of tests/audit/test_ship.py: rsyslogd with its TLS (gtls) stream driver
command -v rsyslogd >/dev/null || need_pkgs+=(rsyslog)
compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null || need_pkgs+=(rsyslog-gnutls)
# DICOM object checks (dciodvfy), PDF text/raster checks, the PDF's fonts and WeasyPrint's Pango
command -v dciodvfy >/dev/null || need_pkgs+=(dicom3tools)
command -v pdftotext >/dev/null || need_pkgs+=(poppler-utils)
[ -f /usr/share/fonts/truetype/noto/NotoNaskhArabic-Regular.ttf ] || need_pkgs+=(fonts-noto-core)
[ -d /usr/share/fonts/opentype/fonts-hosny-amiri ] || need_pkgs+=(fonts-hosny-amiri)
compgen -G "/usr/lib/*/libpangoft2-1.0.so.0" >/dev/null || need_pkgs+=(libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0)
# a filesystem without hard links (tests/factories/exfat.py): exFAT on a loop device, through FUSE
command -v mkfs.exfat >/dev/null || need_pkgs+=(exfatprogs)
command -v mount.exfat-fuse >/dev/null || need_pkgs+=(exfat-fuse)
command -v losetup >/dev/null || need_pkgs+=(mount)

# The viewer test (tests/viewer): OHIF served against Orthanc's DICOMweb plugin, in headless Chromium
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_pkgs+=(orthanc-dicomweb)
command -v node >/dev/null || need_pkgs+=(nodejs)
command -v npm >/dev/null || need_pkgs+=(npm)
command -v chromium >/dev/null || need_pkgs+=(chromium)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "missing Debian packages: ${need_pkgs[*]} (run as root, or: sudo apt-get install ${need_pkgs[*]})" >&2
    exit 1
  fi
fi

# Services the tests talk to (left running, as the machine's own services are).
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi

# npm pieces of the viewer test, into ignored folders: puppeteer-core (package-lock.json, `npm ci`;
# it drives Debian's Chromium, so no browser download) and OHIF v3's prebuilt dist/ (`npm pack`:
# the tarball alone, not the app's build dependencies).
OHIF_VERSION=3.13.2
if [ ! -d tests/viewer/node_modules/puppeteer-core ]; then
  PUPPETEER_SKIP_DOWNLOAD=1 npm ci --prefix tests/viewer --no-audit --no-fund >/dev/null
fi
if [ ! -f tests/viewer/ohif/package/dist/index.html ]; then
  mkdir -p tests/viewer/ohif
  (cd tests/viewer/ohif && npm pack "@ohif/app@${OHIF_VERSION}" >/dev/null && tar xzf "ohif-app-${OHIF_VERSION}.tgz" \
    && rm "ohif-app-${OHIF_VERSION}.tgz")
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch pinned: 2.13.0 is the CPU build on this machine kind; a looser pin pulls a CUDA build.
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"

# SGLang's own request models (sglang/srt/entrypoints/openai/protocol.py) import without a GPU, but
# the sglang package depends on CUDA kernels: its wheel alone, with the few modules that file
# imports, goes into a folder of its own that tests/inference/test_sglang_protocol.py appends to a
# subprocess's sys.path (nothing there shadows the venv's packages). Pinned: the release checked.
SGLANG_PROTOCOL=.venv/sglang-protocol
if [ ! -f "$SGLANG_PROTOCOL/.installed-0.5.23" ]; then
  rm -rf "$SGLANG_PROTOCOL"
  .venv/bin/python -m pip install -q --no-deps --target "$SGLANG_PROTOCOL" sglang==0.5.23 \
    msgspec==0.23.0 pybase64==1.5.1 orjson==3.13.0 pyzmq==27.3.0
  .venv/bin/python -m pip install -q --target "$SGLANG_PROTOCOL" ipython==9.19.1 aiohttp==3.14.5
  touch "$SGLANG_PROTOCOL/.installed-0.5.23"
fi

# The house's rules before the tests (pyproject.toml holds each tool's configuration): the import
# contracts (layers and each room's "must not"), ruff's rule set, mypy --strict on every package.
.venv/bin/lint-imports --no-cache
.venv/bin/ruff check --no-cache .
.venv/bin/mypy ground taqrir integrations workers inference reporting audit storage

export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
