"""Speed of the checkpoint formats, and quality of the router adaptations of ``compact``.

    python benchmarks/bench_formats.py                       # bundled tiny-mixtral and tiny-qwen-moe
    python benchmarks/bench_formats.py --model PATH --groups 4 --skip-routers

Part 1 (speed): tokens/s of the original model, ``--format mapped`` and ``--format compact`` on the same input
(prefill of a [batch, seq] block, and greedy decoding), with the ratio to the original. All three run in this process
one after another, on the same threads.

Part 2 (router adaptation, ``compact``): for each ``router_adapt``, the routing KL against the exact routing of the
merged block (KL(summed member probabilities || softmax of the adapted rows) over groups, on router inputs of held-out
text, mean over tokens and MoE layers) and the perplexity on ``bundled:test``; ``mapped`` is the exact reference.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from moemerge.calibrate import CalibrationSettings
from moemerge.evaluate import eval_texts, perplexities
from moemerge.families import moe_layers
from moemerge.loading import load_model
from moemerge.pipeline import calibrate, merge_model
from moemerge.recipe import Recipe
from moemerge.save import count_parameters
from moemerge.save.router_fit import routing_kl

ADAPTS = ("mean", "fit", "kl")


def resolve(model: str) -> str:
    from moemerge.zoo import MODELS, model_path

    return str(model_path(model)) if model in MODELS else model


def merged(loaded, fmt: str, groups: int, adapt: str = "mean", calibration: str = "bundled"):
    recipe = Recipe.build(model_path=loaded.source, num_average_groups=groups, router=fmt, router_adapt=adapt,
                          calibration=calibration, n_sentences=32, seq_len=256, dtype="float32")
    m = copy.copy(loaded)
    m.model = copy.deepcopy(loaded.model)
    result = merge_model(m, recipe, progress=False)
    return m.model, result


def prefill_tps(model, ids: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=ids)
        return ids.numel() * reps / (time.perf_counter() - t0)


def decode_tps(model, ids: torch.Tensor, new_tokens: int) -> float:
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        model.generate(ids[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return ids.shape[0] * new_tokens / (time.perf_counter() - t0)


def speed(loaded, groups: int, batch: int, seq: int, reps: int, new_tokens: int) -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, loaded.model.config.vocab_size, (batch, seq), generator=gen)
    models = {"original": loaded.model, "mapped": merged(loaded, "mapped", groups)[0],
              "compact": merged(loaded, "compact", groups)[0]}
    # Rounds interleave the models (original, mapped, compact, original, ...) so that load changes on a shared
    # machine hit all of them alike; each model's best round counts.
    prefill = {name: 0.0 for name in models}
    decode = {name: 0.0 for name in models}
    for _ in range(3):
        for name, model in models.items():
            prefill[name] = max(prefill[name], prefill_tps(model, ids, reps))
            decode[name] = max(decode[name], decode_tps(model, ids, new_tokens))
    print(f"{'model':10s} {'params':>10s} {'prefill tok/s':>14s} {'ratio':>6s} {'decode tok/s':>13s} {'ratio':>6s}")
    for name, model in models.items():
        p, d = prefill[name], decode[name]
        print(f"{name:10s} {count_parameters(model):10d} {p:14.0f} {p / prefill['original']:6.2f} {d:13.1f} "
              f"{d / decode['original']:6.2f}")


def routers(loaded, groups: int, ppl_windows: int) -> None:
    texts = eval_texts(loaded.tokenizer, ["bundled:test"], 256, ppl_windows)
    held_out = calibrate(loaded, CalibrationSettings("bundled:test", 32, 256), ["router_inputs"], progress=False)
    original_rows = {layer.index: layer.router.weight.data.clone() for layer in moe_layers(loaded.model)}
    model, result = merged(loaded, "mapped", groups)
    print(f"{'router':14s} {'routing KL':>11s} {'ppl bundled:test':>17s}")
    print(f"{'mapped(exact)':14s} {0.0:11.4f} {perplexities(model, texts, progress=False)['bundled:test']:17.3f}")
    plan = result.plan
    for adapt in ADAPTS:
        model, _ = merged(loaded, "compact", groups, adapt)
        kls = [routing_kl(original_rows[layer.index], plan.layers[layer.index].groups, layer.router.weight.data,
                          held_out.get(layer.index, "router_inputs")["x"]) for layer in moe_layers(model)]
        ppl = perplexities(model, texts, progress=False)["bundled:test"]
        print(f"{adapt:14s} {sum(kls) / len(kls):11.4f} {ppl:17.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="bundled name or folder (repeatable)")
    ap.add_argument("--groups", type=int, help="experts left per layer (default: half)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--skip-routers", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.model or ["tiny-mixtral", "tiny-qwen-moe"]:
        loaded = load_model(resolve(name), "float32", "cpu")
        e = moe_layers(loaded.model)[0].num_experts
        groups = args.groups or e // 2
        print(f"\n== {name}: {e} experts -> {groups} per layer, torch threads {torch.get_num_threads()}")
        if not args.skip_speed:
            speed(loaded, groups, args.batch, args.seq, args.reps, args.new_tokens)
        if not args.skip_routers:
            routers(loaded, groups, args.ppl_windows)


if __name__ == "__main__":
    main()
