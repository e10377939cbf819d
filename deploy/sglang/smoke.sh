#!/usr/bin/env bash
# Readiness check and one tiny request against a running server (SGLang or `taqrir model serve`).
#   deploy/sglang/smoke.sh http://127.0.0.1:30000
set -euo pipefail
URL=${1:-http://127.0.0.1:30000}
curl -fsS "$URL/health" >/dev/null && echo "health ok"
curl -fsS "$URL/v1/models"; echo
