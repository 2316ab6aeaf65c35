#!/usr/bin/env bash
# The seed documents' cases end to end on GPUs: merge + the eight zero-shot lm-eval tasks + wikitext2 perplexity,
# then the papers' table (scripts/paper_table.py). Needs the hub (models, C4 / wikitext2, the task datasets).
#   bash scripts/paper_runs.sh [GPUS] [OUT]        GPUS: ranks per node (default: all visible GPUs)
# Mixtral-8x7B -> 4 experts (HC-SMoE, Table 2 setting), Qwen1.5-MoE-A2.7B(-Chat) 60 -> 45 / 30 (HC-SMoE and the
# Sub-MoE paper's Table 1 rows: Sub-MoE, Sub-MoE with rank 1/2). Each merge is data parallel over GPUS ranks.
set -euo pipefail
gpus=${1:-$(nvidia-smi -L | wc -l)}
out=${2:-paper-runs}
mkdir -p "$out"
tasks=winogrande,arc_challenge,arc_easy,boolq,hellaswag,mmlu,openbookqa,rte
common=(--dtype bfloat16 --calibration c4-train --n-sentences 32 --seq-len 2048 --ppl wikitext2 --task "$tasks")
launch=(torchrun --nproc-per-node "$gpus" -m moemerge merge)
"${launch[@]}" mistralai/Mixtral-8x7B-v0.1 -o "$out/mixtral-hc-smoe-4" --num-average-groups 4 --router collapse \
    "${common[@]}"
for k in 45 30; do
  "${launch[@]}" Qwen/Qwen1.5-MoE-A2.7B -o "$out/qwen1.5-hc-smoe-$k" --num-average-groups "$k" "${common[@]}"
  for recipe in sub-moe sub-moe-dagger; do  # the Sub-MoE paper's calibration: 128 wikitext2 windows, seed 0
    "${launch[@]}" Qwen/Qwen1.5-MoE-A2.7B-Chat -o "$out/qwen1.5-chat-$recipe-$k" --recipe "$recipe" \
        --num-average-groups "$k" --seed 0 --dtype bfloat16 --calibration wikitext2-train --n-sentences 128 \
        --seq-len 2048 --ppl wikitext2 --task "$tasks"
  done
done
python scripts/paper_table.py "$out"/*/eval.json
