#!/usr/bin/env bash
# One command: install, then run the flagship demo (multi-task VL-Adapter on FashionVL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec adapterkit demo "$@"
