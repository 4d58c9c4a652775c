#!/usr/bin/env bash
# The one-GPU device check (tools/device_check.py): BitDance-B-16x bf16 sampling at batch 64
# and 256, the largest BitDance-B-4x bf16 training batch that fits, with MFU; at most 8 minutes.
# The last stdout line is one JSON object; everything else goes to stderr.
#   tools/device_check.sh [--tiny] > result.json      (PYTHON=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "${PYTHON:-python}" tools/device_check.py "$@"
