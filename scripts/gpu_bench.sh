#!/usr/bin/env bash
# The GPU benchmark of docs/benchmarks.md, in one command (on a CUDA machine, from the repo root):
#   bash scripts/gpu_bench.sh OUTDIR [extra adapterkit-bench arguments]
# 0. the CUDA-only tests (tests/test_graphs.py): OUTDIR/gpu_tests.log
# 1. every case (adapterkit, PEFT, baselines) in one process: OUTDIR/gpu.{json,md,log}
# 2. when wheels for AdapterHub (adapters 1.3.0 + transformers 4.57.6, which AdapterHub needs) are in
#    .whl/, the AdapterHub cases with their own full_ft reference and our matching methods in a second
#    process of that environment, eager only (BART under transformers 4.57 does not capture as a CUDA
#    graph): OUTDIR/adapterhub.{json,md,log}
# 3. a torch.profiler table of the main adapterkit cases: OUTDIR/profile.log (BENCH_PROFILE=0 skips it)
set -o pipefail
OUTDIR=${1:-bench_out}; shift || true
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'PY' 2>&1 | tee "$OUTDIR/env.txt"
import torch, transformers
try:
    import peft; pv = peft.__version__
except ImportError:
    pv = "not installed"
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", pv)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUTDIR/env.txt"
if [ "${BENCH_TESTS:-1}" != 0 ]; then  # the CUDA-only tests (graph capture) first
  python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tee "$OUTDIR/gpu_tests.log"
fi
python3 -m adapterkit.bench.cli --out "$OUTDIR/gpu.json" --markdown "$OUTDIR/gpu.md" "$@" 2>&1 | tee "$OUTDIR/gpu.log"
if ls .whl/adapters-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ahsite .whl/*.whl \
    && PYTHONPATH="/tmp/ahsite:$PYTHONPATH" python3 -m adapterkit.bench.cli \
      --cases "full_ft,frozen_bound,adapterhub,houlsby_peer,pfeiffer_peer,compacter_peer" --mode eager \
      --out "$OUTDIR/adapterhub.json" --markdown "$OUTDIR/adapterhub.md" "$@" 2>&1 | tee "$OUTDIR/adapterhub.log"
fi
if [ "${BENCH_PROFILE:-1}" != 0 ]; then
  python3 -m adapterkit.bench.cli --cases "${BENCH_PROFILE_CASES:-single_adapter,single_lora_do0,single_compacter,hyperformer,single_prompt,multiple_adapters_mixed,multiple_lora_mixed}" \
    --steps 5 --warmup 3 --profile 25 "$@" > "$OUTDIR/profile.log" 2>&1
fi
