"""Seconds per step of the block fit (``block_fit_steps``) at several layer shapes, beside the estimate that
``recommend`` and ``merge`` use (:func:`~moemerge.save.router_refit.block_fit_seconds`).

    python benchmarks/bench_block_fit_step.py                 # every shape below
    python benchmarks/bench_block_fit_step.py --shapes tiny-mixtral qwen1.5-moe

One random MoE layer of each shape (``G`` experts left after merging, top-k routing, random hidden states as the
sample) is fitted by :func:`~moemerge.save.router_refit.fit_block` twice, with ``a`` and ``b`` steps and no held-out
tokens (so every step runs); ``(time_b - time_a) / (b - a)`` is one step without the fixed evaluations. The estimate is
``block_fit_seconds(1, ...)`` for the same layer and sample size. Random weights say nothing about quality; this
measures cost only. Printed per shape: measured seconds per step, estimated, their ratio, the peak resident memory so
far.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import peak_rss_bytes

from moemerge.families import moe_layers, tiny_model
from moemerge.save.router_refit import block_fit_seconds, block_output, fit_block

#: name -> (family, hidden, expert intermediate, experts left G, top-k, sample tokens, steps a, steps b). The sample
#: is cut at large shapes to keep the run short: the cost per step is linear in it.
SHAPES: dict[str, tuple[str, int, int, int, int, int, int, int]] = {
    "tiny-mixtral": ("mixtral", 128, 256, 3, 2, 32768, 2, 12),  # the bundled model at 62.5 %
    "tiny-qwen-moe": ("qwen2_moe", 128, 128, 6, 4, 32768, 2, 12),
    "tiny-top8": ("qwen2_moe", 128, 128, 24, 8, 32768, 2, 8),  # an OLMoE-like router (64 -> 24, top-8), tiny widths
    "mid": ("mixtral", 1024, 2048, 4, 2, 8192, 1, 4),
    "qwen1.5-moe": ("qwen2_moe", 2048, 1408, 30, 4, 2048, 1, 3),  # Qwen1.5-MoE-A2.7B's experts at 50 %
}


def layer_of(family: str, hidden: int, inter: int, groups: int, top_k: int):
    """One MoE layer of ``groups`` experts (fp32) and its config."""
    sizes = {"mixtral": {"intermediate_size": inter, "num_local_experts": groups},
             "qwen2_moe": {"moe_intermediate_size": inter, "num_experts": groups, "shared_expert_intermediate_size": 0,
                           "intermediate_size": inter}}[family]
    model = tiny_model(family, 64, seed=0, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, num_experts_per_tok=top_k, **sizes)
    return model.config, moe_layers(model)[0]


def seconds_of(layer, config, hidden: torch.Tensor, target: torch.Tensor, steps: int) -> float:
    rows = layer.router_weight.detach().float()
    routing = layer.family.routing(config)
    held = torch.zeros(hidden.shape[0], dtype=torch.bool)
    t0 = time.perf_counter()
    fit_block(layer, rows, hidden, target, held, routing, None, torch.arange(layer.num_experts), steps)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| shape | H × I, G experts, top-k | sample tokens | measured s/step | estimated s/step | estimate × | "
          "peak RSS (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes:
        family, h, inter, groups, top_k, tokens, a, b = SHAPES[name]
        torch.manual_seed(0)
        config, layer = layer_of(family, h, inter, groups, top_k)
        hidden = torch.randn(tokens, h)
        with torch.no_grad():  # targets the layer's own routed output, off by a perturbation: a fit with work to do
            rows = layer.router_weight.detach().float()
            gate_up, down = (t.float() for t in layer.expert_weights())
            target = block_output(rows, gate_up * 1.05, down, hidden, layer.family.routing(config),
                                  layer.experts.act_fn)
        long, short = (seconds_of(layer, config, hidden, target, n) for n in (b, a))
        per_step = (long - short) / (b - a)
        estimate = block_fit_seconds(1, [layer], top_k, "cpu", tokens=tokens, held_out=0.0)
        print(f"| {name} | {h} × {inter}, {groups}, top-{top_k} | {tokens} | {per_step:.3f} | {estimate:.3f} | "
              f"{estimate / per_step:.2f} | {peak_rss_bytes() / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
