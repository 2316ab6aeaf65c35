"""Calibration text sampled from the model itself (``self_calibration``).

Every data-dependent step (grouping on expert outputs, the global cut, ``merge: fit``, ``router_fit``) learns from
the calibration text; a user who calibrates on one domain and serves another pays for it (on the bundled
tiny-mixtral, 62.5 % of the experts merged on Bible text: perplexity ×1.07 on Bible, ×2.8 on Python code). Text
the model samples from its own distribution covers what it was trained on in the proportions it learned them, with no
data to choose: *self-calibration* (M. Williams, G. Chrysostomou, N. Aletras, "Self-calibration for Language Model
Quantization and Pruning", NAACL 2025).

We sample at temperature 1 with no top-k / top-p truncation: truncation concentrates the samples on the model's most
typical text, the opposite of what a guard against an unknown domain needs (measured: top-p 0.9 and temperature 0.8
were worse off-domain).

**Chains, not independent windows.** A window sampled from the start token is the *opening* of a document the model
chose, so independent windows give every kind of document the same weight per document, whatever its length: on the
bundled corpus 62 % of the documents (and of such samples) are short Bible chapters, while each domain holds a third
of the tokens; code, in long files, is 17 % of the documents. The model was trained on a stream of documents cut into
windows; we sample that stream instead. :data:`CHAINS` chains run in parallel (one batch of ``generate``); a chain's
first window starts from the start token, each later window continues it, prompted by the last :data:`CARRY` of the
chain's previous window and never stopped by an end token, so the model finishes its documents and starts new ones
itself, and windows are spread over documents in proportion to their tokens. The carried quarter is repeated at the
head of the next window (a calibration window must be ``seq_len`` tokens of text with its own context); the other
three quarters are new.

**How many chains.** Each chain wanders through a few long documents, so the domain mix of the samples is an average
over the chains: few chains make it noisy (8 chains of 64 windows were 27 % Bible windows on tiny-mixtral, 8 of 32
were 39 %, against a third of the tokens), while every chain opens with a document's start, which over-weights short
documents again (one chain per window is the independent sampling above). Measured on tiny-mixtral (62.5 % fewer
experts, ``moemerge`` + block fit, 256 × 256 sampled, scored on bible / python-code / python-docs): 8 chains ×1.068 /
1.108 / 1.073 (seed 0) and ×1.061 / 1.097 / 1.091 (seed 1); **16** ×1.068 / 1.096 / 1.068 and ×1.063 / 1.081 /
1.069; 32 ×1.064 / 1.098 / 1.084. The chain count is fixed, not tied to a batch size, because it changes the
samples: at the default 65,536 calibration tokens 16 chains are about 4k tokens each, whatever the window length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import MoemergeError
from ..loading import device_flops, device_kind

LOG = logging.getLogger(__name__)


def start_token(tokenizer) -> int:
    """The token a sampled window starts from: the tokenizer's BOS, else its EOS (a document boundary)."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise MoemergeError("self_calibration needs a start token to sample from, and the tokenizer has neither a BOS "
                        "nor an EOS token")


#: Share of a window carried over as the prompt of the chain's next window: enough context to continue the document
#: (the rest of each window is new text), small enough that most of the window is new.
CARRY = 0.25


def carried(seq_len: int) -> int:
    """Tokens of a window that prompt the next window of its chain."""
    return max(1, int(seq_len * CARRY))


#: Chains sampled in parallel (module docstring, "How many chains"). Memory: ``generate``'s KV cache for this many
#: sequences of ``seq_len`` tokens (Mixtral-8x7B, 2048 tokens: ~4 GiB in bf16).
CHAINS = 16


def chain_count(count: int, chains: int = CHAINS) -> int:
    """Chains sampled for ``count`` windows: ``chains``, never more than the windows."""
    return max(1, min(chains, count))


def sample_windows(model: nn.Module, start: int, count: int, seq_len: int, seed: int, chains: int = CHAINS
                   ) -> torch.Tensor:
    """``[count, seq_len]`` token windows sampled from ``model`` at temperature 1, as :func:`chain_count`
    chains run as one batch: the first window of each starts with ``start``, each later one with the last
    :func:`carried` tokens of the chain's previous window. Windows are returned step by step (every chain's first
    window, then every chain's second, ...), so a prefix of them spreads over every chain; with 16 chains and every
    window sampled, the fits' held-out quarter (every fourth window) is four whole chains, which share no carried
    tokens with the windows fitted on.

    Deterministic for a seed on one device; the global random state is left as it was."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    chains = chain_count(count, chains)
    steps, carry = -(-count // chains), carried(seq_len)
    out, prompt = [], torch.full((chains, 1), start, dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        for _ in range(steps):
            new = seq_len - prompt.shape[1]
            config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                      min_new_tokens=new, eos_token_id=None, pad_token_id=start)
            wins = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
            out.append(wins.cpu())
            prompt = wins[:, seq_len - carry:]
    wins = torch.cat(out)[:count]
    if wins.shape != (count, seq_len):  # generate stops early only if told to; a family that does is a bug here
        raise MoemergeError(f"sampling gave windows of shape {tuple(wins.shape)}, expected {(count, seq_len)}")
    return wins


#: rough CPU / GPU rates for the estimate besides :data:`~moemerge.loading.FLOPS`: bytes/s of weights read per
#: decoding step, seconds of fixed cost per step (generate's Python; ~0.01 s measured on the bundled models)
RATES = {"cpu": (1e10, 0.01), "cuda": (2e12, 0.02)}


def sampling_seconds(count: int, seq_len: int, active_parameters: int, weight_bytes: int, device: str,
                     chains: int = CHAINS) -> float:
    """Rough time to sample ``count`` windows of ``seq_len`` tokens in ``chains`` chains: every token costs
    ``2·active`` flops, and every decoding step (one token for each chain) reads the weights the chains route to, up to
    all of them; whichever bound is larger, plus a fixed cost per step. Qwen1.5-MoE-A2.7B (14.3 B parameters, 2.7 B
    active, bf16), 16 windows of 2048 tokens: ~2.5 h on CPU, ~1 min on a GPU; the bundled models: seconds."""
    flops = device_flops(device)
    bandwidth, fixed = RATES[device_kind(device)]
    windows_per_chain = -(-count // chain_count(count, chains))
    steps = seq_len - 1 + (windows_per_chain - 1) * (seq_len - carried(seq_len))  # decoding steps of one chain
    return steps * fixed + max(2 * active_parameters * count * seq_len / flops, steps * weight_bytes / bandwidth)


def cached_sampler(fingerprint: str, tokenizer, load: Callable[[], nn.Module], folder: Path | None,
                   tag: str = "", chains: int = CHAINS) -> Callable[[int, int, int], torch.Tensor]:
    """A ``sample(count, seq_len, seed)`` for :func:`moemerge.calibrate.calibration_windows` that loads the model
    (``load()``) only when its windows are not in ``folder`` yet (``None``: no cache), and stores them there: a
    second plan, or ``recommend``'s trials, reuse one sampling. ``tag`` names what else changes the samples (the
    dtype and device the model is loaded with)."""

    def sample(count: int, seq_len: int, seed: int) -> torch.Tensor:
        used = chain_count(count, chains)  # the chain count changes the samples, as the seed does
        name = f"{fingerprint[:24]}-{count}x{seq_len}-seed{seed}-chains{used}{'-' + tag if tag else ''}.pt"
        path = folder / name if folder is not None else None
        if path is not None and path.is_file():
            return torch.load(path, weights_only=True)
        LOG.warning("self_calibration: sampling %d windows of %d tokens from the model", count, seq_len)
        model = load()
        try:
            wins = sample_windows(model, start_token(tokenizer), count, seq_len, seed, chains)
        finally:
            del model
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(".part")
            torch.save(wins, part)
            part.replace(path)  # a stopped run never leaves half a file under the final name
        return wins

    return sample
