#!/usr/bin/env bash
# Install what the test suite needs and run it. The README's test command; .ci/run calls it.
#
# Needs: Python 3.11+, and for the real peers and services Debian packages dcmtk, orthanc,
# redis-server and postgresql (installed with apt-get when missing and running as root).
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
command -v chromium >/dev/null || need_pkgs+=(chromium)  # renders the research report in tests
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

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch pinned: 2.13.0 is the CPU build on this machine kind; a looser pin pulls a CUDA build.
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"

export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
