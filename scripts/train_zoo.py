#!/usr/bin/env python3
"""Train the two tiny Mixture-of-Experts checkpoints bundled with ``moemerge.zoo``.

The models are *test assets*: small enough to live in git (< 10 MB each) and to
run on a laptop CPU, but genuinely trained, so that expert merging / pruning
has measurable effects and routing carries real (domain) structure.

* ``tiny-mixtral``  - ``MixtralForCausalLM`` trained from scratch
  (8 experts, top-2, 4 layers, hidden 128).
* ``tiny-qwen-moe`` - ``Qwen2MoeForCausalLM`` in the Qwen1.5-MoE style
  (16 fine-grained experts, top-4, plus a gated shared expert), *upcycled*
  from a dense ``Qwen2ForCausalLM`` that is trained first; see ``upcycle``.

Both are trained on random windows of the bundled corpus
(``src/moemerge/zoo/data/corpus``, built by ``scripts/build_corpus.py``) with a
shared byte-level BPE tokenizer (vocab 4096) trained on its train split.

Routing balance: transformers' built-in auxiliary loss concatenates the router
logits of *all* layers before computing the Switch loss, so it only balances
the pooled distribution and lets individual layers collapse onto a few experts.
We therefore set ``router_aux_loss_coef=0`` and add our own *per-layer*
Switch-style loss (``E * sum_e f_e P_e`` computed for each layer separately,
averaged over layers) plus a small router z-loss.

After training (or with ``--analyze-only`` on the saved folders) the script
measures loss / perplexity and routing statistics and writes ``docs/zoo.md``
and a short ``README.md`` model card into each model folder.

Usage::

    python scripts/train_zoo.py                    # both models, default steps
    python scripts/train_zoo.py --only mixtral     # just one
    python scripts/train_zoo.py --only qwen --steps 600 --dense-steps 300
    python scripts/train_zoo.py --analyze-only     # re-run the analysis
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "src" / "moemerge" / "zoo" / "data" / "corpus"
MODELS = REPO / "src" / "moemerge" / "zoo" / "models"
DOCS_MD = REPO / "docs" / "zoo.md"

MODEL_DIRS = {"mixtral": MODELS / "tiny-mixtral", "qwen": MODELS / "tiny-qwen-moe"}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB_SIZE = 4096
SEQ_LEN = 128          # training window
EVAL_LEN = 256         # non-overlapping evaluation windows; also the config's max positions, so tools default to it
BATCH = 16
SEED = 1234

# Defaults = the step counts the bundled checkpoints were trained with. Uncontended,
# 2 CPU threads ran ~0.2 s/step (Mixtral MoE) and ~0.1 s/step (dense Qwen2), so
# these are short; they were cut down because the build machine was shared with
# other CPU-heavy jobs (>1 s/step). Use --steps / --dense-steps for longer runs.
DEFAULT_STEPS = {"mixtral": 1600, "qwen": 1200}
DEFAULT_DENSE_STEPS = 500
BALANCE_COEF = 0.08    # per-layer Switch load-balancing loss
ZLOSS_COEF = 1e-3      # router z-loss (keeps router logits small)


# --------------------------------------------------------------------------
# Utilities
# --------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_split(name: str) -> list[dict]:
    with open(CORPUS / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def domains_of(docs: list[dict]) -> list[str]:
    return sorted({d["domain"] for d in docs})


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------
def train_tokenizer(train_docs: list[dict]):
    """Byte-level BPE (vocab 4096) on the train split, wrapped for transformers.

    Deterministic for a given corpus, so ``--only qwen`` reproduces exactly the
    tokenizer that ``--only mixtral`` saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,                    # ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # no byte is ever <unk>
        show_progress=False,
    )
    tok.train_from_iterator((d["text"] for d in train_docs), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", model_max_length=512,
    )


def encode_docs(tokenizer, docs: list[dict]) -> list[int]:
    """Concatenate documents as ``<s> text </s>`` into one token stream."""
    ids: list[int] = []
    for d in docs:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(d["text"], add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return ids


class WindowSampler:
    """Random fixed-length windows from the concatenated train token stream."""

    def __init__(self, ids: list[int], seq_len: int, seed: int):
        self.data = torch.tensor(ids, dtype=torch.long)
        self.seq_len = seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> torch.Tensor:
        starts = torch.randint(0, len(self.data) - self.seq_len, (batch_size,), generator=self.gen)
        return torch.stack([self.data[s : s + self.seq_len] for s in starts.tolist()])


# --------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------
def common_kwargs(tokenizer) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=EVAL_LEN,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
    )


def mixtral_config(tokenizer):
    from transformers import MixtralConfig
    return MixtralConfig(
        **common_kwargs(tokenizer), head_dim=32, intermediate_size=256,
        num_local_experts=8, num_experts_per_tok=2,
        router_aux_loss_coef=0.0,   # replaced by our per-layer loss
        output_router_logits=False,  # callers ask for them explicitly
    )


def qwen_dense_config(tokenizer):
    from transformers import Qwen2Config
    return Qwen2Config(**common_kwargs(tokenizer), intermediate_size=512)


def qwen_moe_config(tokenizer):
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(
        **common_kwargs(tokenizer), intermediate_size=512,
        num_experts=16, moe_intermediate_size=128, num_experts_per_tok=4,
        shared_expert_intermediate_size=256, norm_topk_prob=False,
        decoder_sparse_step=1, mlp_only_layers=[],
        router_aux_loss_coef=0.0, output_router_logits=False,
    )


def top_k_of(config) -> int:
    return config.num_experts_per_tok


def num_experts_of(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------
def router_losses(router_logits, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer Switch load-balancing loss and router z-loss, averaged over layers.

    For one layer with N tokens and E experts:
      f_e = share of the N*k routing assignments that go to expert e (no grad),
      P_e = mean router softmax probability of expert e (differentiable),
      loss = E * sum_e f_e * P_e   (= 1 when perfectly balanced).
    Unlike transformers' pooled version this penalises imbalance *inside each
    layer*, which is what keeps every expert of every layer alive.
    """
    bal, z = [], []
    for logits in router_logits:
        logits = logits.float()
        E = logits.shape[-1]
        probs = logits.softmax(-1)
        topk = probs.topk(top_k, dim=-1).indices
        f = F.one_hot(topk, E).sum(1).float().mean(0) / top_k
        P = probs.mean(0)
        bal.append(E * (f * P).sum())
        z.append(torch.logsumexp(logits, -1).pow(2).mean())
    return torch.stack(bal).mean(), torch.stack(z).mean()


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_loop(model, sampler, steps: int, lr: float, warmup: int, moe: bool, tag: str) -> dict:
    """AdamW training; returns timing and the smoothed final train loss."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    top_k = top_k_of(model.config) if moe else 0
    t0 = time.time()
    ema = None
    history = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        x = sampler.batch(BATCH)
        out = model(input_ids=x, labels=x, output_router_logits=moe)
        ce = out.loss if not moe else F.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        loss = ce
        if moe:
            bal, z = router_losses(out.router_logits, top_k)
            loss = ce + BALANCE_COEF * bal + ZLOSS_COEF * z
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = ce.item() if ema is None else 0.98 * ema + 0.02 * ce.item()
        if step % 50 == 0 or step == steps - 1:
            extra = f" bal {bal.item():.3f} z {z.item():.2f}" if moe else ""
            el = time.time() - t0
            print(f"[{tag}] step {step:5d}/{steps} ce {ce.item():.3f} (ema {ema:.3f}){extra} "
                  f"lr {opt.param_groups[0]['lr']:.2e} {el:.0f}s ({el / (step + 1):.2f} s/step)",
                  flush=True)
            history.append((step, round(ema, 4)))
    return {"steps": steps, "seconds": time.time() - t0, "final_train_loss": ema, "history": history}


# --------------------------------------------------------------------------
# Upcycling (Qwen1.5-MoE style)
# --------------------------------------------------------------------------
@torch.no_grad()
def upcycle(dense, moe, seed: int, reinit_fraction: float = 0.5) -> None:
    """Initialise the Qwen2-MoE ``moe`` from the trained dense Qwen2 ``dense``.

    * Embeddings, attention, norms: copied (same shapes).
    * Routed experts: the dense FFN's 512 intermediate neurons are shuffled and
      cut into 4 chunks of 128; the 16 experts are the 4 chunks, each
      replicated 4 times (expert e gets chunk e % 4).
    * Down-projection scale. The dense FFN output is the sum of its 4 chunks'
      outputs. With ``norm_topk_prob=False`` and a near-uniform fresh router
      every selected expert is weighted by softmax prob ~1/16, and the 4
      selected experts cover on average one copy of each chunk (each chunk has
      4 of the 16 experts, top-4 picks 4), i.e. one full dense FFN. So the
      routed part outputs ~ (s/16) * dense for a down scale s. We want the
      routed part to provide half of the dense output (the shared expert
      gives the other half, below), so s = 16 / 2 = 8.
    * Shared expert: a random 256-neuron subset of the dense FFN; on average it
      carries 256/512 of the output, so its down projection is scaled x2 to
      estimate the full dense output; the shared-expert gate starts at zero
      weights, i.e. sigmoid(0) = 0.5, so it contributes ~half of dense. Routed
      half + shared half ~ dense output at initialisation.
    * Diversity: as in the Qwen1.5-MoE blog, replicas must diverge or the
      router cannot tell them apart. For every expert, a random 50% of its 128
      neurons is re-initialised (gate/up rows and the matching down columns)
      with random weights of the same scale as the dense ones.
    * Router: small random normal (std 0.01); near-uniform routing
      at the start, so the scale argument above holds.
    """
    g = torch.Generator().manual_seed(seed)
    # Everything except the MLPs has identical names and shapes.
    dense_sd = dense.state_dict()
    moe_sd = moe.state_dict()
    for k, v in dense_sd.items():
        if ".mlp." not in k and k in moe_sd:
            moe_sd[k].copy_(v)
    cfg = moe.config
    E, I, k_top = cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    D = dense.config.intermediate_size
    n_chunks = D // I                                   # 4
    # Each selected expert is weighted ~1/E and the top-k cover ~one dense FFN
    # (needs k_top == n_chunks replicas-per-chunk ratio, true here: 4 of 16
    # experts per chunk, top-4); undo the 1/E weight and keep half: E / 2 = 8.
    assert E // n_chunks == k_top, "scale argument assumes top-k == replicas per chunk"
    routed_scale = E / 2.0
    for layer_d, layer_m in zip(dense.model.layers, moe.model.layers):
        dm, mm = layer_d.mlp, layer_m.mlp
        Wg, Wu, Wd = dm.gate_proj.weight, dm.up_proj.weight, dm.down_proj.weight  # [D,H],[D,H],[H,D]
        perm = torch.randperm(D, generator=g)
        chunks = perm.view(n_chunks, I)
        std_gu, std_d = torch.cat([Wg, Wu]).std().item(), Wd.std().item()
        for e in range(E):
            idx = chunks[e % n_chunks]
            gate, up, down = Wg[idx].clone(), Wu[idx].clone(), Wd[:, idx].clone() * routed_scale
            # Re-initialise a random half of this replica's neurons.
            re = torch.randperm(I, generator=g)[: int(I * reinit_fraction)]
            gate[re] = torch.randn(len(re), gate.shape[1], generator=g) * std_gu
            up[re] = torch.randn(len(re), up.shape[1], generator=g) * std_gu
            down[:, re] = torch.randn(down.shape[0], len(re), generator=g) * std_d * routed_scale
            mm.experts.gate_up_proj[e].copy_(torch.cat([gate, up], 0))
            mm.experts.down_proj[e].copy_(down)
        # Shared expert: random subset of the dense neurons, down scaled to the full output.
        Is = cfg.shared_expert_intermediate_size
        sub = torch.randperm(D, generator=g)[:Is]
        mm.shared_expert.gate_proj.weight.copy_(Wg[sub])
        mm.shared_expert.up_proj.weight.copy_(Wu[sub])
        mm.shared_expert.down_proj.weight.copy_(Wd[:, sub] * (D / Is))
        mm.shared_expert_gate.weight.zero_()
        mm.gate.weight.copy_(torch.randn(mm.gate.weight.shape, generator=g) * 0.01)


# --------------------------------------------------------------------------
# Evaluation and routing analysis
# --------------------------------------------------------------------------
def windows(ids: list[int], length: int) -> torch.Tensor:
    n = len(ids) // length
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


@torch.no_grad()
def evaluate(model, tokenizer, split_docs: list[dict], batch: int = 16) -> dict:
    """Perplexity on non-overlapping EVAL_LEN windows (per domain and pooled) and
    per-layer routing counts per domain (if the model is an MoE)."""
    model.eval()
    cfg = model.config
    is_moe = hasattr(cfg, "num_experts_per_tok")
    res = {"domains": {}}
    tot_nll, tot_tok = 0.0, 0
    for dom in domains_of(split_docs):
        ids = encode_docs(tokenizer, [d for d in split_docs if d["domain"] == dom])
        W = windows(ids, EVAL_LEN)
        nll, ntok = 0.0, 0
        counts = None
        for i in range(0, len(W), batch):
            x = W[i : i + batch]
            out = model(input_ids=x, output_router_logits=is_moe)
            logits = out.logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                   reduction="sum").item()
            ntok += x[:, 1:].numel()
            if is_moe:
                E, k = num_experts_of(cfg), top_k_of(cfg)
                c = torch.stack([F.one_hot(l.topk(k, -1).indices, E).sum(1).sum(0)
                                 for l in out.router_logits]).double()  # [L, E]
                counts = c if counts is None else counts + c
        res["domains"][dom] = {"ppl": math.exp(nll / ntok), "tokens": ntok,
                               "windows": len(W), "expert_counts": counts,
                               "routed_tokens": len(W) * EVAL_LEN}
        tot_nll += nll
        tot_tok += ntok
    res["ppl"] = math.exp(tot_nll / tot_tok)
    res["tokens"] = tot_tok
    return res


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint)."""
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    def kl(a, b):
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / b[mask])).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def routing_stats(ev: dict, k: int) -> dict:
    """Per-layer activation frequencies, CV, min share and domain divergences."""
    doms = sorted(ev["domains"])
    total = sum(ev["domains"][d]["expert_counts"] for d in doms).numpy()   # [L, E]
    ntok = sum(ev["domains"][d]["routed_tokens"] for d in doms)
    freq = total / ntok                       # share of tokens whose top-k has expert e
    per_dom = {d: (ev["domains"][d]["expert_counts"].numpy() / ev["domains"][d]["routed_tokens"])
               for d in doms}
    layers = []
    for l in range(freq.shape[0]):
        f = freq[l]
        pairs = {f"{a} vs {b}": js_divergence(per_dom[a][l], per_dom[b][l])
                 for i, a in enumerate(doms) for b in doms[i + 1:]}
        top = {d: [int(e) for e in np.argsort(-per_dom[d][l])[:k]] for d in doms}
        layers.append({"freq": f.tolist(), "cv": float(f.std() / f.mean()),
                       "min_share": float(f.min()), "max_share": float(f.max()),
                       "per_domain": {d: per_dom[d][l].tolist() for d in doms},
                       "js": pairs, "top_experts": top})
    return {"layers": layers, "ideal_share": k / freq.shape[1], "domains": doms}


def analyze(name: str, folder: Path, train_info: dict | None) -> str:
    """Load a saved model folder, evaluate it and return a markdown section."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg = model.config
    val, test = load_split("validation"), load_split("test")
    ev_val, ev_test = evaluate(model, tok, val), evaluate(model, tok, test)
    k, E = top_k_of(cfg), num_experts_of(cfg)
    rs = routing_stats(ev_val, k)

    info_path = folder / "training_info.json"
    if train_info is None and info_path.exists():
        train_info = json.loads(info_path.read_text())
    size_mb = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6

    L = []
    L.append(f"## {folder.name} (`{type(model).__name__}`)\n")
    L.append(f"- config: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, heads "
             f"{cfg.num_attention_heads} (KV {cfg.num_key_value_heads}), experts {E}, top-k {k}"
             + (f", expert size {cfg.moe_intermediate_size}, shared expert "
                f"{cfg.shared_expert_intermediate_size} (sigmoid-gated), norm_topk_prob {cfg.norm_topk_prob}"
                if hasattr(cfg, "moe_intermediate_size") else f", expert size {cfg.intermediate_size}")
             + f", vocab {cfg.vocab_size}, tied embeddings {cfg.tie_word_embeddings}")
    L.append(f"- parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M; "
             f"folder size {size_mb:.1f} MB (bf16 safetensors + tokenizer)")
    if train_info:
        parts = [f"{ph['name']}: {ph['steps']} steps, {ph['seconds'] / 60:.1f} min, "
                 f"final train loss (EMA) {ph['final_train_loss']:.3f}" for ph in train_info["phases"]]
        L.append("- training (batch 16 x 128 tokens, AdamW, warmup + cosine, 2 CPU threads): "
                 + "; ".join(parts))
    L.append(f"- validation perplexity {ev_val['ppl']:.2f} ({ev_val['tokens']} tokens), "
             f"test perplexity {ev_test['ppl']:.2f} ({ev_test['tokens']} tokens), "
             f"non-overlapping {EVAL_LEN}-token windows")
    L.append("- per-domain perplexity (validation / test): " + ", ".join(
        f"{d} {ev_val['domains'][d]['ppl']:.2f} / {ev_test['domains'][d]['ppl']:.2f}"
        for d in rs["domains"]))
    L.append("")
    L.append(f"### Expert load (validation split, share of tokens whose top-{k} contains the expert; "
             f"ideal {rs['ideal_share']:.3f})\n")
    L.append("| layer | CV | min share | max share | shares per expert |")
    L.append("|---|---|---|---|---|")
    for i, ly in enumerate(rs["layers"]):
        L.append(f"| {i} | {ly['cv']:.3f} | {ly['min_share']:.3f} | {ly['max_share']:.3f} | "
                 + " ".join(f"{x:.2f}" for x in ly["freq"]) + " |")
    L.append("")
    L.append("### Routing by domain (validation split)\n")
    L.append("Jensen-Shannon divergence (bits, 0 = same expert usage, 1 = disjoint) between the "
             "domains' expert-frequency distributions, and each domain's most used experts.\n")
    pairs = list(rs["layers"][0]["js"])
    L.append("| layer | " + " | ".join(f"JS {p}" for p in pairs) + " | "
             + " | ".join(f"top-{k} {d}" for d in rs["domains"]) + " |")
    L.append("|---" * (1 + len(pairs) + len(rs["domains"])) + "|")
    for i, ly in enumerate(rs["layers"]):
        L.append(f"| {i} | " + " | ".join(f"{ly['js'][p]:.3f}" for p in pairs) + " | "
                 + " | ".join(",".join(map(str, ly["top_experts"][d])) for d in rs["domains"]) + " |")
    L.append("")
    L.append("Per-domain expert shares per layer:\n")
    L.append("| layer | domain | shares per expert |")
    L.append("|---|---|---|")
    for i, ly in enumerate(rs["layers"]):
        for d in rs["domains"]:
            L.append(f"| {i} | {d} | " + " ".join(f"{x:.2f}" for x in ly["per_domain"][d]) + " |")
    L.append("")

    # Sanity: a short greedy generation.
    x = tok("def ", return_tensors="pt").input_ids
    gen = model.generate(x, max_new_tokens=24, do_sample=False)
    sample = tok.decode(gen[0], skip_special_tokens=True).replace("\n", "\\n")
    L.append(f"Greedy sample from `def `: `{sample}`\n")
    section = "\n".join(L)
    print(section, flush=True)

    stats = {"validation_ppl": ev_val["ppl"], "test_ppl": ev_test["ppl"],
             "cv": [ly["cv"] for ly in rs["layers"]],
             "min_share": [ly["min_share"] for ly in rs["layers"]]}
    card = (f"# {folder.name}\n\nTiny test model of the `moemerge` toolkit, trained by "
            f"`scripts/train_zoo.py` on the bundled three-domain corpus (King James Bible, Python "
            f"stdlib source, Python docs; see `../../data/corpus/LICENSES.md`). Not useful as a "
            f"language model; meant for testing expert merging / pruning.\n\n"
            + section.split("\n", 1)[1].split("### Routing by domain")[0]
            + "\nFull per-domain routing tables: `docs/zoo.md` in the repository.\n")
    (folder / "README.md").write_text(card, encoding="utf-8")
    return section, stats


# --------------------------------------------------------------------------
# Training drivers
# --------------------------------------------------------------------------
def save(model, tokenizer, folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "training_info.json").write_text(json.dumps(info, indent=1))


def train_mixtral(tokenizer, sampler, steps: int) -> None:
    from transformers import MixtralForCausalLM
    seed_everything(SEED)
    model = MixtralForCausalLM(mixtral_config(tokenizer))
    ph = train_loop(model, sampler, steps, lr=2e-3, warmup=max(10, steps // 20), moe=True,
                    tag="mixtral")
    ph["name"] = "from scratch"
    save(model, tokenizer, MODEL_DIRS["mixtral"], {"phases": [ph], "seed": SEED})


def train_qwen(tokenizer, sampler, steps: int, dense_steps: int) -> None:
    from transformers import Qwen2ForCausalLM, Qwen2MoeForCausalLM
    seed_everything(SEED)
    dense = Qwen2ForCausalLM(qwen_dense_config(tokenizer))
    ph_dense = train_loop(dense, sampler, dense_steps, lr=2e-3,
                          warmup=max(10, dense_steps // 20), moe=False, tag="qwen-dense")
    ph_dense["name"] = "dense Qwen2 (intermediate 512)"
    moe = Qwen2MoeForCausalLM(qwen_moe_config(tokenizer))
    upcycle(dense, moe, seed=SEED)
    # Sanity check of the upcycling scale: the MoE should start near the dense loss.
    x = sampler.batch(BATCH)
    with torch.no_grad():
        dense.eval()
        moe.eval()
        print(f"[qwen] after upcycling: dense loss {dense(input_ids=x, labels=x).loss.item():.3f}, "
              f"MoE loss {moe(input_ids=x, labels=x).loss.item():.3f}", flush=True)
    del dense
    ph_moe = train_loop(moe, sampler, steps, lr=1.5e-3, warmup=max(10, steps // 20), moe=True,
                        tag="qwen-moe")
    ph_moe["name"] = "upcycled MoE"
    save(moe, tokenizer, MODEL_DIRS["qwen"], {"phases": [ph_dense, ph_moe], "seed": SEED})


def write_docs(sections: dict[str, str]) -> None:
    head = ("# Model zoo: tiny MoE test models\n\n"
            "Generated by `python scripts/train_zoo.py` (analysis only: `--analyze-only`). "
            "Both models share a byte-level BPE tokenizer (vocab 4096, `<unk>` `<s>` `</s>` "
            "`<pad>`) trained on the train split of the bundled corpus "
            "(`src/moemerge/zoo/data/corpus`, domains `bible`, `python-code`, `python-docs`). "
            "Routers were trained with a per-layer Switch load-balancing loss "
            f"(coefficient {BALANCE_COEF}) and a router z-loss ({ZLOSS_COEF}); transformers' "
            "pooled aux loss was disabled (`router_aux_loss_coef=0`).\n\n"
            "Load and use:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "path = 'src/moemerge/zoo/models/tiny-mixtral'\n"
            "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)\n"
            "tok = AutoTokenizer.from_pretrained(path)\n```\n\n")
    DOCS_MD.parent.mkdir(parents=True, exist_ok=True)
    DOCS_MD.write_text(head + "\n".join(sections[k] for k in ("mixtral", "qwen") if k in sections),
                       encoding="utf-8")
    print(f"wrote {DOCS_MD}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["mixtral", "qwen"], default=None)
    ap.add_argument("--steps", type=int, default=None,
                    help=f"MoE training steps (default {DEFAULT_STEPS})")
    ap.add_argument("--dense-steps", type=int, default=DEFAULT_DENSE_STEPS,
                    help="dense pre-training steps before upcycling (qwen only)")
    ap.add_argument("--analyze-only", action="store_true",
                    help="skip training; evaluate the saved models and rewrite docs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    which = [args.only] if args.only else ["mixtral", "qwen"]
    if not args.analyze_only:
        seed_everything(SEED)
        train_docs = load_split("train")
        tokenizer = train_tokenizer(train_docs)
        ids = encode_docs(tokenizer, train_docs)
        print(f"train stream: {len(ids)} tokens", flush=True)
        for name in which:
            sampler = WindowSampler(ids, SEQ_LEN, seed=SEED)
            steps = args.steps or DEFAULT_STEPS[name]
            if name == "mixtral":
                train_mixtral(tokenizer, sampler, steps)
            else:
                train_qwen(tokenizer, sampler, steps, args.dense_steps)

    # Analyse every model that exists, so docs/zoo.md always covers both.
    sections = {}
    for name, folder in MODEL_DIRS.items():
        if (folder / "config.json").exists():
            sections[name], _ = analyze(name, folder, None)
    write_docs(sections)


if __name__ == "__main__":
    main()
