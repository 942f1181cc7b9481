#!/usr/bin/env bash
# One command: install, lint, then run the fast test suite (slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m ruff check src tests examples scripts
set +e
python3 -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# exit code 5 = no tests collected in the selected tier: not a failure
[ "$rc" = 5 ] && exit 0
exit "$rc"
