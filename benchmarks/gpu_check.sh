#!/usr/bin/env bash
# GPU check (issue 13): on one CUDA card, in under ~8 minutes, with no network. For GPT-2 small's
# shape and a Llama-style shape of the same size (random weights), bf16 autocast: full
# fine-tuning vs LoRA vs QLoRA (tokens/s, peak memory, MFU against the card's dense bf16 peak)
# and harness vs transformers.Trainer like-for-like (benchmarks/train_throughput.py); then a
# 4-trial sweep of the default tiny study with sweep.devices = every visible GPU
# (benchmarks/lora_sweep.py: wall time, peak RSS). Prints a compact table
# (benchmarks/gpu_summary.py); with $OUT set, writes there gpu_check.json (every result),
# results.jsonl and gpu_check.log (all output).
#
# The GPU image lacks MLflow, Optuna and Hydra (and bitsandbytes): make the wheels here first,
# where PyPI is reachable, then carry them (see benchmarks/gpu_wheels.sh):
#   bash benchmarks/gpu_wheels.sh                      # -> .whl/ (git-ignored), ~40 MiB
#   device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# The wheels in $WHEELS (default .whl) are installed offline into /tmp/harness-site first
# (pip --no-index --no-deps --target); none there: the Python environment must have them.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke  # here: tiny shapes, few steps, the same plumbing
#
# Knobs (environment): STEPS (100), REPEATS (2), BATCH (64), PEAK_TFLOPS (cards outside
# benchmarks/measure.py's table), BUDGET_S (420: no row starts later), ROW_TIMEOUT_S (200).
# Rows run most important first: a row that fails (e.g. a feature this harness lacks) or is
# skipped is listed as such, and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
[ "${1:-}" = "--cpu-smoke" ] && smoke=1
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
log="$out/gpu_check.log"
results="$out/results.jsonl"
: >"$log"
: >"$results"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

wheels=${WHEELS:-.whl}
site=""
if compgen -G "$wheels/*.whl" >/dev/null; then
  echo "installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels (offline)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/harness-site "$wheels"/*.whl || exit 1
  site=/tmp/harness-site
fi
export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"

if [ "$smoke" = 1 ]; then
  models=(tiny)
  adapters=(none lora)
  throughput=(--steps 3 --repeats 1 --no-memory)
  sweep=(--trials 2 train.max_steps=5)
else
  models=(gpt2-arch llama-arch)
  adapters=(none lora qlora)
  throughput=(--bf16 --steps "${STEPS:-100}" --repeats "${REPEATS:-2}" --batch-size "${BATCH:-64}")
  [ -n "${PEAK_TFLOPS:-}" ] && throughput+=(--peak-tflops "$PEAK_TFLOPS")
  gpus=$(python3 -c 'import torch; print(",".join(map(str, range(torch.cuda.device_count()))))')
  sweep=(--trials 4 "sweep.devices=[$gpus]")
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
fi

note() { # note NAME failed|skipped WHY: a result line for a row that gave none
  python3 -c 'import json, sys; print(json.dumps({"name": sys.argv[1], sys.argv[2]: sys.argv[3]}))' \
    "$1" "$2" "$3" >>"$results"
}

row() { # row NAME COMMAND...: runs it; its output to the log, its JSON line to the results
  local name=$1 started=$SECONDS output code
  shift
  if ((SECONDS > ${BUDGET_S:-420})); then
    echo "== $name: skipped (time budget)"
    note "$name" skipped "time budget ${BUDGET_S:-420}s spent"
    return
  fi
  output=$(timeout "${ROW_TIMEOUT_S:-200}" "$@" 2>&1)
  code=$?
  printf '== %s (exit %s, %ss): %s\n%s\n' "$name" "$code" "$((SECONDS - started))" "$*" \
    "$output" >>"$log"
  if [ "$code" = 0 ] && printf '%s\n' "$output" | grep -q '^{'; then
    printf '%s\n' "$output" | grep '^{' | tail -1 >>"$results"
    echo "== $name: done in $((SECONDS - started))s"
  else
    echo "== $name: exit $code after $((SECONDS - started))s: $(printf '%s' "$output" | tail -1)"
    note "$name" failed "exit $code: $(printf '%s' "$output" | tail -1)"
  fi
}

tp=benchmarks/train_throughput.py
for model in "${models[@]}"; do
  for adapter in "${adapters[@]}"; do
    row "$model $adapter" python3 "$tp" --model "$model" --adapter "$adapter" "${throughput[@]}" --json
  done
  if [ "$model" = "${models[0]}" ]; then # the sweep before the second model: it must run
    row "sweep" python3 benchmarks/lora_sweep.py --data study --setup "" "${sweep[@]}" --json
  fi
done

echo
python3 benchmarks/gpu_summary.py "$results" "$out/gpu_check.json" | tee -a "$log"
echo "total ${SECONDS}s; results in $out"
