#!/usr/bin/env bash
# The real case of the streaming issue: a random-weight checkpoint with Qwen1.5-MoE-A2.7B's exact shapes (14.3 B
# parameters, 28.6 GB in bf16), written shard by shard, then merged 60 -> 30 experts per layer with --router collapse
# by the plain `moemerge merge` command, with wall time and peak memory (GNU time). Needs ~75 GB of free disk and
# runs for tens of minutes on 2 CPU cores; not part of CI.
#   bash benchmarks/qwen_real_case.sh [WORKDIR]        (default /work)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/work}
ckpt=$work/qwen15-shape
out=$work/qwen15-merged
[ -d "$ckpt" ] || python benchmarks/make_checkpoint.py "$ckpt" --preset qwen1.5-moe-a2.7b
rm -rf "$out" "$work/real-cache"
MOEMERGE_CACHE=$work/real-cache /usr/bin/time -v python -m moemerge.cli merge "$ckpt" -o "$out" \
    --num-average-groups 30 --router collapse --calibration bundled --n-sentences 8 --seq-len 128 \
    --train-batch-size 4 --ppl bundled:test --ppl-windows 2 --eval-seq-len 128 --result-path "$work/qwen15-eval.json" \
    2>&1 | grep -v "^\s*\(Page size\|Exit status\|Socket\|Signals\|Swaps\|Average\|Voluntary\|Involuntary\|Minor\|Major\|File system\)"
python - "$out" <<'PY'
import sys
from transformers import AutoConfig, AutoModelForCausalLM
out = sys.argv[1]
with __import__("torch").device("meta"):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
from safetensors import safe_open
import glob, json
keys = {}
for f in glob.glob(f"{out}/*.safetensors"):
    with safe_open(f, "pt") as h:
        keys.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
print(f"written: {len(keys)} tensors; config: {AutoConfig.from_pretrained(out).num_experts} experts per layer")
PY
# stock loading of the whole output (16 GB in bf16) with zero missing/unexpected keys:
python -c "
import sys, torch
from transformers import AutoModelForCausalLM
m, info = AutoModelForCausalLM.from_pretrained('$out', dtype=torch.bfloat16, output_loading_info=True)
print('stock from_pretrained: missing', len(info['missing_keys']), 'unexpected', len(info['unexpected_keys']),
      'mismatched', len(info['mismatched_keys']), 'parameters', sum(p.numel() for p in m.parameters()))
"
