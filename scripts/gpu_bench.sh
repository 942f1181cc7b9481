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
# 4. the cost-against-work sweep (size axis up to the 1.1B Llama shape, batch, seq, tasks):
#    OUTDIR/sweep/sweep.{json,md,png}, OUTDIR/sweep.log (BENCH_SWEEP=0 skips it; BENCH_SWEEP_ARGS replaces
#    its axis arguments)
# 5. the serving benchmark (mixed-task greedy generation, LoRA and Houlsby):
#    OUTDIR/serve.{json,md,log} (BENCH_SERVE=0 skips it)
# 6. the fused-branch comparison (plain / hand-fused / compiled adapter branches, BART-base shape,
#    bf16): OUTDIR/fused.{json,md,log} (BENCH_FUSED=0 skips it)
# The extra arguments go to step 1 (and 2, 3) only. Steps 4-6 are sized to take a few minutes on an H100.
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
if [ "${BENCH_SWEEP:-1}" != 0 ]; then
  # shellcheck disable=SC2086  # BENCH_SWEEP_ARGS is a list of arguments
  python3 -m adapterkit.bench.cli --sweep --device cuda --sweep-dir "$OUTDIR/sweep" --steps 10 --warmup 3 \
    --sweep-max-gib 60 ${BENCH_SWEEP_ARGS:---sweep-sizes llama-8m,llama-19m,llama-56m,llama-125m,llama-360m,llama-1b \
    --sweep-batch 1,4,16,64 --sweep-seq 64,256,1024 --sweep-tasks 1,4,16,64} 2>&1 | tee "$OUTDIR/sweep.log"
fi
if [ "${BENCH_SERVE:-1}" != 0 ]; then  # the CPU run's shape and prompt (docs/results/serving/README.md)
  python3 -m adapterkit.bench.cli --serve --device cuda --d-model 256 --layers 4 --heads 4 --ffn 688 --vocab 8192 \
    --batch 64 --src 32 --tgt 16 --serve-tasks 1,8,64 --repeats 3 \
    --out "$OUTDIR/serve.json" --markdown "$OUTDIR/serve.md" 2>&1 | tee "$OUTDIR/serve.log"
fi
if [ "${BENCH_FUSED:-1}" != 0 ]; then
  python3 -m adapterkit.bench.fusedbench --device cuda --dtype bf16 --shape bart-base --batch 64 --src 128 --tgt 32 \
    --steps 30 --out "$OUTDIR/fused.json" --markdown "$OUTDIR/fused.md" 2>&1 | tee "$OUTDIR/fused.log"
fi
