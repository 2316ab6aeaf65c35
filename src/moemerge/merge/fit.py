"""``merge: fit``: an output-fitted merge, after MergeMoE (Miao et al., arXiv 2510.14436, "output merging").

Averaging weights assumes the members' neurons line up, which experts trained from scratch do not guarantee
(``docs/quality.md``). MergeMoE instead asks the merged expert to reproduce the group's *output*. Over the
calibration tokens routed to a group ``g`` the objective is

    (1)  L(G, U, W) = Σ_x ‖ s(x)·W h(x) − y(x) ‖²,   h(x) = act(G x) ⊙ (U x),
         s(x) = Σ_{i∈g} w_i(x),   y(x) = Σ_{i∈g} w_i(x) E_i(x),

``s·W h`` being what the merged expert adds under ``router: keep`` (the slots of a group share it, so their weights
add up) and ``y`` what the original block added.

**Down projection** (``fit_scope: down`` and the last step of ``expert``). (1) is quadratic in ``W``; with a ridge
towards an anchor ``W₀`` (the starting merge's down projection) its minimiser is

    (2)  W = (B + λ W₀)(A + λI)⁻¹,   A = Σ s² h hᵀ,  B = Σ s y hᵀ,   λ = damp·mean(diag A),

from sums accumulated by a plan-aware pass over the layer's calibration inputs (:class:`GroupFitAccumulator`), in
fp64. ``C = Σ ‖y‖²`` gives ``L = tr(W A Wᵀ) − 2 tr(W Bᵀ) + C`` for any ``W`` without the tokens (:func:`fit_objective`).

**Gate and up** (``fit_scope: expert``). (1) is not quadratic in ``G, U`` and an exact Gauss-Newton step needs a
``2IH × 2IH`` system (or one ``H × H`` Gram matrix per neuron), far beyond memory on real models. Two closed-form
estimators with memory ``O(H² + I·H)`` per group each propose a gate/up, with the members' neurons permuted to line
up with the dominant member's (weight matching, :mod:`.align`; ``Z_i`` member ``i``'s stacked gate/up ``[2I, H]``):

* ``regmean``, a least-squares fit of the merged expert's pre-activations to the routed members' (RegMean, Jin et
  al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models", applied per token), with
  ``α_i = w_i / s``:

      (3)  min_Z Σ_x s(x)² ‖ Z x − Σ_{i∈g} α_i(x) Z_i x ‖² + λ ‖Z − Z₀‖²
           ⇒  Z = (T + λ Z₀)(X + λI)⁻¹,   X = Σ s² x xᵀ,  T = Σ s² t xᵀ,  t = Σ α_i Z_i x,

  for the gate rows and the up rows, each with its own ``λ``. On tokens a member has alone the target is its own
  pre-activation, not the average of everyone's, and ``s²`` weighs tokens as (1) does. The anchor ``Z₀`` is the
  aligned frequency average (M-SMoE's merge): λ → ∞ gives it back, and identical members are reproduced for any λ.
* ``select``: the ``I`` neurons of all the members with the largest routed output energy
  ``Σ_x w_i(x)² h_ij(x)² ‖down_i[:, j]‖²`` (member ``i``, neuron ``j``), their gate/up rows kept as they are. Members
  that share no neuron order (experts trained apart) blur when averaged; this keeps their strongest neurons whole
  and lets (2) recombine them (anchor: ``α_i·down_i[:, j]`` with the frequency weights ``α``).

A second pass (replaying the experts' inputs the first recorded) accumulates ``A, B, C`` for each proposal's ``h``
and solves its down projection by (2). This is one alternation, gate/up then down: neither proposal depends on
``W``, so repeating it would change nothing.

**Held-out damping.** The calibration windows are split by their index among the whole job's windows (the same
split on any number of ranks): a share ``fit_held_out`` of them is held out, spread evenly. Every ``λ`` of the
grid :data:`DAMP_GRID` is fitted on the other windows and the one with the lowest held-out objective — (1) for the
down projection, (3) for gate and up — is kept; the down projection is then refitted with it on all windows. Among
the candidates :data:`CANDIDATES` (the start, the start with a fitted down projection, each gate/up proposal with
its fitted down projection) the one with the lowest held-out objective (1) is chosen, so the data decide between
averaging, regression and selection per group. With nothing held out (``fit_held_out: 0``, fewer than ``1/fit_held_out``
windows, or a group no held-out token reached) ``damp`` is :data:`DAMP` and candidates are compared on all tokens.

**Guarantee.** Whatever is chosen is replaced by the start if its objective (1) on all calibration tokens is not
below the start's, so ``fit`` never does worse than its start on its calibration objective. Groups of one are
returned unchanged (they are their expert). Per layer, the relative objectives ``L / Σ‖y‖²`` of the chosen fits on
the fitted and the held-out windows (their gap), the dampings and the choices go to ``merge_info.json``
(:func:`fit_pass`'s ``info``).
"""

from __future__ import annotations

import torch

from ..calibrate.stats import LayerBatch, Statistic
from ..errors import MoemergeError
from ..families import MoeLayer, expert_intermediate
from . import MERGE, GroupInputs, LayerPass, MergeMethod, frequency_weights, merge_layer
from .align import align_group

#: ``damp`` when nothing is held out (GPTQ's default share of the mean diagonal).
DAMP = 0.01
#: ``damp`` values tried on the held-out windows: four decades around :data:`DAMP`, up to a ridge as strong as the
#: mean signal and ten times it (which pulls most of the way back to the anchor, for little calibration text).
DAMP_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: Default share of calibration windows held out (``fit_held_out``), as ``moemerge recommend`` holds out ⌈N/4⌉.
HELD_OUT = 0.25
#: What a group can end up with: its start, the start with a fitted down projection, or a refitted gate/up (eq. 3, or
#: the selected member neurons) with a fitted down projection.
CANDIDATES = ("start", "down", "regmean", "select")
PARTS = ("fit", "held")


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, damp: float,
                anchor: torch.Tensor | None = None) -> torch.Tensor | None:
    """``X = (cross + λ·anchor)(gram + λI)⁻¹`` in fp64 with ``λ = damp·mean(diag gram)``: the minimiser of
    ``tr(X gram Xᵀ) − 2 tr(X crossᵀ) + λ‖X − anchor‖²`` (eqs. 2 and 3; ``anchor`` None: zero). ``None`` when
    ``gram`` is empty (no tokens).

    Args:
        gram: ``[K, K]`` symmetric positive semi-definite.  cross: ``[O, K]``.  anchor: ``[O, K]``.
    """
    gram, cross = gram.to(torch.float64), cross.to(torch.float64)
    scale = gram.diagonal().mean()
    if not torch.isfinite(scale) or scale <= 0:
        return None
    lam = damp * scale
    rhs = cross if anchor is None or lam == 0 else cross + lam * anchor.to(cross)
    reg = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(reg)
    if info == 0:
        return torch.cholesky_solve(rhs.T, chol).T  # gram symmetric: X = R G⁻¹ ⇔ Xᵀ = G⁻¹ Rᵀ
    return torch.linalg.lstsq(reg, rhs.T).solution.T


def solve_down(a: torch.Tensor, b: torch.Tensor, damp: float = DAMP,
               anchor: torch.Tensor | None = None) -> torch.Tensor | None:
    """Eq. 2: ``W = (B + λW₀)(A + λI)⁻¹``, ``λ = damp·mean(diag A)``; ``None`` when ``A`` is empty (no tokens).

    Args:
        a: ``Σ s² h hᵀ`` ``[I, I]``.  b: ``Σ s y hᵀ`` ``[H, I]``.  anchor: ``W₀`` ``[H, I]`` (None: zero).
    """
    return ridge_solve(a, b, damp, anchor)


def fit_objective(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | float) -> float:
    """``tr(W A Wᵀ) − 2 tr(W Bᵀ) + C`` (fp64): eq. 1 from its sums for the down projection ``W``, and eq. 3's
    data term for gate or up rows ``Z`` (with ``X, T`` and ``Σ s²‖t‖²``)."""
    w = w.to(torch.float64)
    c = c.to(torch.float64) if isinstance(c, torch.Tensor) else torch.tensor(float(c), dtype=torch.float64)
    return float((w @ a.to(torch.float64) * w).sum() - 2 * (w * b.to(torch.float64)).sum() + c)


def even_share(index: torch.Tensor, share: float) -> torch.Tensor:
    """Whether each item (by its index ``g`` among the whole job's) is in an evenly spaced ``share`` of them:
    ``⌊(g+1)p⌋ > ⌊g p⌋`` picks ``⌊N p⌋`` of the first ``N`` (every 4th for ``p = ¼``), whatever the split into ranks
    and batches."""
    g = index.to(torch.float64)
    return torch.floor((g + 1) * share) > torch.floor(g * share)


def held_out_windows(index: torch.Tensor, share: float) -> torch.Tensor:
    """Whether each window (by its index among the whole job's windows) is held out: :func:`even_share`."""
    return even_share(index, share)


def held_out_tokens(windows: torch.Tensor | None, num_tokens: int, share: float,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``[T]`` bool: each token of a batch belongs to a held-out window (:func:`held_out_windows`; a batch's tokens
    are its windows', in order). All False without window indices or with ``share`` 0."""
    if share <= 0 or windows is None or len(windows) == 0 or num_tokens % len(windows):
        return torch.zeros(num_tokens, dtype=torch.bool, device=device)
    held = held_out_windows(windows, share).to(device)
    return held.repeat_interleave(num_tokens // len(windows))


def start_methods() -> list[str]:
    """Merges ``fit`` can start from: single-pass methods (no plan-aware pass of their own)."""
    return [m for m in MERGE if m not in ("fit", "no") and MERGE.get(m).layer_pass is None]


def start_method(mode: str) -> str:
    """The merge whose gate/up ``fit`` starts from: ``mode`` when it names another single-pass merge method
    (``freq``, ``aligned-freq``, ...), else M-SMoE's aligned frequency average when registered (experts trained
    from scratch share no neuron order, so their plain average is a poor start), else the frequency average."""
    if mode in start_methods():
        return mode
    return "aligned-freq" if "aligned-freq" in MERGE else "freq"


def fit_options(recipe) -> tuple[str, float]:
    """``(fit_scope, fit_held_out)`` of a recipe (the defaults for an object without them)."""
    return getattr(recipe, "fit_scope", "expert"), float(getattr(recipe, "fit_held_out", HELD_OUT))


def _start(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    merged = MERGE.get(start_method(inputs.mode)).fn(inputs)
    return (merged.gate_up, merged.down) if hasattr(merged, "gate_up") else merged


def fit_merge(inputs: GroupInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The fit the plan-aware pass chose for this group (see the module docstring); the start when no calibration
    token reached the group."""
    key = group_key(inputs.members)
    layer = inputs.layer.index if inputs.layer is not None else None
    per = inputs.stats.layers.get(layer, {}).get("fit") if inputs.stats is not None else None
    if per is None:
        raise MoemergeError("merge=fit needs the plan-aware fit pass (run it through moemerge.merge_model or "
                            "the executor)")
    if f"{key}.down" not in per:  # no calibration token reached this group: nothing to fit to
        return _start(inputs)
    return per[f"{key}.gate_up"].to(inputs.gate_up), per[f"{key}.down"].to(inputs.down)


# ---- the plan-aware passes ----------------------------------------------------------------------------------------
# Largest number of routed tokens pushed through one group's members at once (bounds [n, T, 2I] temporaries).
CHUNK_TOKENS = 4096


def group_key(members) -> str:
    """Stable field prefix of a group's sums: its sorted members joined by ``-``."""
    return "-".join(str(m) for m in sorted(members))


class WindowAware:
    """An accumulator that needs to know which calibration windows each batch holds (the held-out split by window
    index): the executor calls :meth:`start_batch` before every batch it hands over."""

    _windows: torch.Tensor | None = None

    def start_batch(self, window_ids: torch.Tensor) -> None:
        """The executor's indices of the windows in the next batch."""
        self._windows = window_ids


class GroupFitAccumulator(WindowAware, Statistic):
    """Sufficient statistics of eqs. 1–3, per multi-member group of one layer, over the calibration tokens routed to
    the group, kept apart for the fitted (``fit``) and held-out (``held``) windows (fp64 sums; no per-token tensor
    outlives one chunk of one batch). Fields ``{group}.{part}.{name}``:

    * ``A = Σ s² h hᵀ`` ``[I, I]``, ``h`` the intermediate activation of ``starts[g]`` (a merged gate/up ``[2I, H]``);
    * ``B = Σ s y hᵀ`` ``[H, I]``, ``y = Σ_{i∈g} w_i E_i(x)`` what the original members added;
    * ``C = Σ ‖y‖²`` and ``tokens``;
    * with ``targets``: ``X = Σ s² x xᵀ`` ``[H, H]``, ``T = Σ s² t xᵀ`` ``[2I, H]`` (``t = Σ α_i Z_i x`` over the
      members as given in ``members``), ``Q = (Σ s²‖t_gate‖², Σ s²‖t_up‖²)`` and the neuron energies
      ``N = Σ w_i² h_ij²`` ``[n, I]``.

    ``members[g]`` is ``(gate_up [n, 2I, H], down [n, H, I])`` of the group's members (aligned, for eq. 3's
    targets), or None to read them from the layer. Windows are held out by :func:`held_out_windows` from the
    indices the executor hands to :meth:`start_batch`; without them every token counts as fitted. Memory:
    ``2·G·(I² + H·I)·8`` bytes, plus ``2·G·(H² + 2I·H + n·I)·8`` with ``targets``.
    """

    def __init__(self, layer: MoeLayer, groups: list[list[int]], starts: list[torch.Tensor],
                 members: list[tuple[torch.Tensor, torch.Tensor]] | None = None, targets: bool = False,
                 held_out: float = 0.0, keys: list[str] | None = None) -> None:
        super().__init__(layer, layer.experts.gate_up_proj.device)
        self.groups = [list(g) for g in groups]
        self.keys = keys if keys is not None else [group_key(g) for g in self.groups]
        self.starts = starts
        self.members = members
        self.targets = targets
        self.held_out = held_out

    @torch.no_grad()
    def update(self, batch: LayerBatch) -> None:
        weights = batch.routed_weights()  # [E, T]
        mask = batch.routed_mask()  # [E, T]
        held = held_out_tokens(self._windows, batch.num_tokens, self.held_out, weights.device)
        gate_up, down = self.layer.expert_weights()
        act = self.layer.experts.act_fn
        for gi, (members, start) in enumerate(zip(self.groups, self.starts)):
            key = self.keys[gi]
            idx = torch.tensor(members, device=weights.device)
            selected = mask[idx].any(0).nonzero().squeeze(1)
            if selected.numel() == 0:
                continue
            if self.members is not None:
                gu_m, dn_m = (t.float() for t in self.members[gi])
            else:
                gu_m, dn_m = gate_up[idx].float(), down[idx].float()
            start32 = start.float()[None]
            inter = dn_m.shape[-1]
            for lo in range(0, selected.numel(), CHUNK_TOKENS):
                tok = selected[lo:lo + CHUNK_TOKENS]
                x = batch.hidden[tok]
                w = weights[idx][:, tok]  # [n, t]
                s = w.sum(0)  # [t]
                pre = torch.einsum("th,noh->nto", x, gu_m)  # members' pre-activations [n, t, 2I]
                gate, up = pre.split(inter, dim=-1)
                inner = act(gate) * up  # [n, t, I]
                out = torch.einsum("nti,nhi->nth", inner, dn_m)
                y = torch.einsum("nt,nth->th", w, out).double()  # Σ_i w_i E_i(x): what the block added
                h = expert_intermediate(x, start32, act)[0].double()  # [t, I]
                # Σ α_i Z_i x (a token whose weights underflowed to 0 has weight s² = 0: keep it finite)
                t = torch.einsum("nt,nto->to", w / s.clamp_min(torch.finfo(s.dtype).tiny), pre).double() \
                    if self.targets else None
                s = s.double()
                for part, rows in zip(PARTS, (~held[tok], held[tok])):
                    if not bool(rows.any()):
                        continue
                    sp, hp, yp = s[rows], h[rows], y[rows]
                    name = f"{key}.{part}"
                    self._add(f"{name}.A", (hp * (sp * sp)[:, None]).T @ hp)
                    self._add(f"{name}.B", (yp * sp[:, None]).T @ hp)
                    self._add(f"{name}.C", (yp * yp).sum())
                    self._add(f"{name}.tokens", torch.tensor(float(rows.sum())))
                    if t is not None:
                        # neuron energies Σ w_i² h_ij² (neuron selection: times ‖down_i[:, j]‖²)
                        wr = w[:, rows].double()
                        self._add(f"{name}.N", torch.einsum("nt,nti->ni", wr * wr, inner[:, rows].double() ** 2))
                        xp, tp, om = x[rows].double(), t[rows], (sp * sp)[:, None]
                        self._add(f"{name}.X", (xp * om).T @ xp)
                        self._add(f"{name}.T", (tp * om).T @ xp)
                        self._add(f"{name}.Q", torch.stack([(tp[:, :inter] ** 2 * om).sum(),
                                                            (tp[:, inter:] ** 2 * om).sum()]))


#: Largest size of the MoE inputs the first pass records so the second replays them instead of running the decoder
#: layer again (``[T, H]`` fp32 plus the routing); above it the second pass runs the layer.
REPLAY_BYTES = 2 * 2**30


class BatchRecorder(WindowAware):
    """Keeps what the experts saw in one pass (inputs, routing, window indices) so a later pass over the same layer
    can feed its accumulators without running the decoder layer again; gives up (and frees what it kept) once the
    recording would exceed ``limit`` bytes."""

    def __init__(self, limit: int = REPLAY_BYTES) -> None:
        self.limit = limit
        self.batches: list[tuple[torch.Tensor | None, LayerBatch]] | None = []
        self.bytes = 0

    def update(self, batch: LayerBatch) -> None:
        if self.batches is None:
            return
        size = sum(t.numel() * t.element_size() for t in (batch.hidden, batch.top_k_index, batch.top_k_weights))
        self.bytes += size
        if self.bytes > self.limit:
            self.batches = None  # too large to keep: the next pass runs the layer
            return
        self.batches.append((self._windows, LayerBatch(batch.layer, batch.hidden, batch.top_k_index,
                                                       batch.top_k_weights, None)))

    def reduce(self, ranks) -> None:
        """Nothing to combine: each rank replays its own share, and the replayed accumulators are reduced."""

    def replay(self, accumulators: list) -> bool:
        """Feed the recorded batches to ``accumulators`` (with their window indices); False if nothing was kept."""
        if self.batches is None:
            return False
        for windows, batch in self.batches:
            for acc in accumulators:
                if windows is not None and hasattr(acc, "start_batch"):
                    acc.start_batch(windows)
                acc.update(batch)
        return True


def part_sums(sums: dict[str, torch.Tensor], key: str, names: str, part: str | None) -> tuple | None:
    """The sums ``names`` (e.g. ``"ABC"``) of group ``key`` on one part (``fit``/``held``), or on both
    (``part=None``); None when no token of that part reached the group."""
    parts = PARTS if part is None else (part,)
    have = [p for p in parts if f"{key}.{p}.{names[0]}" in sums]
    if not have:
        return None
    return tuple(sum(sums[f"{key}.{p}.{n}"].to(torch.float64) for p in have) for n in names)


def choose_damping(fit: tuple, held: tuple | None, anchor: torch.Tensor | None, grid=DAMP_GRID
                   ) -> tuple[torch.Tensor | None, float, dict[float, float]]:
    """Fit ``(gram, cross)`` of ``fit`` by :func:`ridge_solve` for every ``damp`` of ``grid`` and keep the one with
    the lowest held-out objective on ``held = (gram, cross, const)``; :data:`DAMP` when ``held`` is None. Returns the
    solution, its ``damp`` and the held-out objective of every ``damp`` tried."""
    if held is None:
        return ridge_solve(fit[0], fit[1], DAMP, anchor), DAMP, {}
    best, best_damp, scores = None, DAMP, {}
    for damp in grid:
        sol = ridge_solve(fit[0], fit[1], damp, anchor)
        if sol is None:
            continue
        scores[damp] = fit_objective(sol, *held)
        if best is None or scores[damp] < scores[best_damp]:
            best, best_damp = sol, damp
    return best, best_damp, scores


@torch.no_grad()
def starting_gate_up(layer: MoeLayer, layer_plan, stats, mode: str, recipe=None
                     ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The multi-member groups of a layer and their starting merged gate/up (as the model will store them)."""
    groups, starts, _ = _starting(layer, layer_plan, stats, mode, recipe)
    return groups, starts


def _starting(layer: MoeLayer, layer_plan, stats, mode: str, recipe=None
              ) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
    groups = [g for g in layer_plan.groups if len(g) > 1]
    if not groups:
        return [], [], []
    merged = merge_layer(layer, layer_plan, start_method(mode), stats, mode, recipe)
    multi = [i for i, g in enumerate(layer_plan.groups) if len(g) > 1]
    return groups, [merged.gate_up[i] for i in multi], [merged.down[i] for i in multi]


@torch.no_grad()
def _aligned_members(layer: MoeLayer, layer_plan, stats) -> list[tuple[torch.Tensor, ...]]:
    """Per multi-member group: members aligned to the dominant (fp32 ``[n, 2I, H]``, ``[n, H, I]``) and their
    frequency-weighted average (the anchor of eqs. 2–3 for ``fit_scope: expert``), and the frequency weights."""
    gate_up, down = layer.expert_weights()
    freq = stats.frequency(layer.index)
    out = []
    for members, dom in zip(layer_plan.groups, layer_plan.dominant):
        if len(members) == 1:
            continue
        idx = torch.tensor(members, device=gate_up.device)
        gu, dn = align_group(gate_up[idx].float(), down[idx].float(), members.index(dom))
        alpha = frequency_weights(freq[members]).to(gu)
        out.append((gu, dn, torch.einsum("n,noh->oh", alpha, gu), torch.einsum("n,nhi->hi", alpha, dn),
                    alpha.double()))
    return out


def _relative(objective: float, energy: float) -> float:
    return max(objective, 0.0) / energy if energy > 0 else 0.0


def fit_pass(ctx: LayerPass) -> dict:
    """The plan-aware passes of ``fit`` (module docstring): one pass for the start's sums (and eq. 3's with
    ``fit_scope: expert``), a second for the refitted gate/up candidates' (replaying the experts' inputs recorded by
    the first, up to :data:`REPLAY_BYTES`, instead of running the decoder layer again). Returns stats entry ``fit``
    (every group's sums and chosen ``gate_up`` / ``down``) and ``info`` (the layer's train / held-out objectives,
    for ``merge_info.json``)."""
    scope, share = fit_options(ctx.recipe)
    groups, starts, start_downs = _starting(ctx.layer, ctx.plan, ctx.stats, ctx.recipe.mode, ctx.recipe)
    if not groups:
        return {}
    whole = scope == "expert"
    aligned = _aligned_members(ctx.layer, ctx.plan, ctx.stats) if whole else None
    acc = GroupFitAccumulator(ctx.layer, groups, starts, [a[:2] for a in aligned] if whole else None,
                              targets=whole, held_out=share)
    recorder = BatchRecorder() if whole and ctx.reduce is not None else None
    ctx.run([acc] if recorder is None else [acc, recorder])
    sums = acc.result()
    out: dict[str, torch.Tensor] = {f"start.{k}": v for k, v in sums.items()}
    candidates: dict[str, dict[str, dict]] = {}  # group key -> candidate -> weights, objectives, damping
    second: list[tuple[int, str, torch.Tensor, torch.Tensor, dict]] = []  # (group, name, gate_up, anchor, damping)
    for gi, members in enumerate(groups):
        key = group_key(members)
        total = part_sums(sums, key, "ABC", None)
        if total is None:
            continue  # no calibration token reached the group: the start stays
        fit, held = _split(sums, key, "ABC")
        w0 = start_downs[gi].double()
        cands = {"start": _candidate(starts[gi], w0, w0, fit, held, total, None)}
        w_fit, damp, _ = choose_damping(fit, held, w0)
        if w_fit is not None:
            cands["down"] = _candidate(starts[gi], w_fit, solve_down(total[0], total[1], damp, w0), fit, held,
                                       total, {"down": damp})
        candidates[key] = cands
        if whole:
            second += _gate_up_candidates(gi, key, sums, aligned[gi], starts[gi].dtype, held is not None)
    if second:  # second pass: the sums of eq. 2 for every refitted gate/up
        keys = [f"{group_key(groups[gi])}.{name}" for gi, name, *_ in second]
        acc2 = GroupFitAccumulator(ctx.layer, [groups[gi] for gi, *_ in second], [c[2] for c in second],
                                   [aligned[gi][:2] for gi, *_ in second], held_out=share, keys=keys)
        if recorder is not None and recorder.replay([acc2]):
            ctx.reduce([acc2])  # the recorded inputs were this rank's share: combine as ``run`` would
        else:
            ctx.run([acc2])
        recorder = None
        sums2 = acc2.result()
        out.update({f"expert.{k}": v for k, v in sums2.items()})
        for key2, (gi, name, gate_up, anchor, damps) in zip(keys, second):
            total = part_sums(sums2, key2, "ABC", None)
            if total is None:
                continue
            fit, held = _split(sums2, key2, "ABC")
            w_fit, damp, _ = choose_damping(fit, held, anchor)
            if w_fit is not None:
                candidates[group_key(groups[gi])][name] = _candidate(
                    gate_up, w_fit, solve_down(total[0], total[1], damp, anchor), fit, held, total,
                    {**damps, "down": damp})
    info = _choose(candidates, out)
    info.update(scope=scope, held_out=share)
    return {"fit": out, "info": info}


def _split(sums: dict[str, torch.Tensor], key: str, names: str) -> tuple[tuple, tuple | None]:
    """``(fit part, held-out part or None)`` of a group's sums; a group only held-out tokens reached is fitted on
    them, with nothing to judge by."""
    fit, held = part_sums(sums, key, names, "fit"), part_sums(sums, key, names, "held")
    return (held, None) if fit is None else (fit, held)


def _gate_up_candidates(gi: int, key: str, sums: dict[str, torch.Tensor], aligned: tuple, dtype: torch.dtype,
                        judged: bool) -> list[tuple[int, str, torch.Tensor, torch.Tensor, dict]]:
    """The refitted gate/up of one group, each with the anchor of its down projection and its damping:

    * ``regmean``: eq. 3 (gate and up rows, each with its held-out damping), anchored on the aligned average;
    * ``select``: the ``I`` member neurons of largest routed output energy ``Σ w_i² h_ij² ‖down_i[:, j]‖²`` on the
      fitted windows, their gate/up rows kept exactly (for members too unlike to average: their neurons survive
      whole instead of blurred), down anchored on ``α_i·down_i[:, j]`` (``α`` the frequency weights, for ``w_i / s``).
    """
    gu_m, dn_m, gu_avg, dn_avg, alpha = aligned
    inter = dn_m.shape[-1]
    xt_fit, xt_held = _split(sums, key, "XTQ")
    if not judged:
        xt_held = None
    rows, damps = [], {}
    for name, part, j in (("gate", slice(0, inter), 0), ("up", slice(inter, 2 * inter), 1)):
        anchor = gu_avg[part].double()
        z, damps[name], _ = choose_damping(
            (xt_fit[0], xt_fit[1][part]),
            None if xt_held is None else (xt_held[0], xt_held[1][part], xt_held[2][j]), anchor)
        rows.append(anchor if z is None else z)
    out = [(gi, "regmean", torch.cat(rows).to(dtype), dn_avg.double(), damps)]
    energy = part_sums(sums, key, "N", "fit") or part_sums(sums, key, "N", "held")
    if energy is not None and gu_m.shape[0] > 1:
        score = energy[0] * (dn_m.double() ** 2).sum(1)  # [n, I]
        top = torch.topk(score.flatten(), inter).indices.sort().values
        member, neuron = top // inter, top % inter
        gate_up = torch.cat([gu_m[member, neuron], gu_m[member, inter + neuron]])
        # a neuron of member i adds w_i·down_i[:, j]·h_ij; the merged one adds s·W[:, j]·h_ij, so W ≈ (w_i/s)·down
        anchor = dn_m.double()[member, :, neuron].T * alpha[member][None]
        out.append((gi, "select", gate_up.to(dtype), anchor, {}))
    return out


def _candidate(gate_up: torch.Tensor, w_fit: torch.Tensor, w_all: torch.Tensor, fit: tuple, held: tuple | None,
               total: tuple, damping: dict | None) -> dict:
    """One candidate of a group: its weights (down refitted on all tokens), eq. 1 on the fitted part for the
    solution fitted there, on the held-out part (None without one), and on all tokens for the final weights."""
    return {"gate_up": gate_up, "down": w_all, "damping": damping,
            "train": fit_objective(w_fit, *fit), "held": None if held is None else fit_objective(w_fit, *held),
            "all": fit_objective(w_all, *total),
            "energy": (float(fit[2]), None if held is None else float(held[2]))}


def _choose(candidates: dict[str, dict[str, dict]], out: dict) -> dict:
    """Per group, the candidate with the lowest held-out objective (all-token objective without held-out tokens),
    replaced by the start unless it is below the start on all tokens (the guarantee); its weights go to ``out``.
    Returns the layer's summary: relative objectives of the chosen fits and of the starts, the gap, the choices."""
    chosen_count = dict.fromkeys(CANDIDATES, 0)
    sums = {"start": [0.0, 0.0], "chosen": [0.0, 0.0]}  # [train, held] objectives
    energy = [0.0, 0.0]
    damping: dict[str, dict] = {}
    for key, cands in candidates.items():
        judged = all(c["held"] is not None for c in cands.values())
        score = (lambda c: c["held"]) if judged else (lambda c: c["all"])
        name = min(cands, key=lambda n: (score(cands[n]), n != "start"))
        if cands[name]["all"] >= cands["start"]["all"]:
            name = "start"  # never worse than the start on the calibration objective
        pick = cands[name]
        out[f"{key}.gate_up"] = pick["gate_up"].float().cpu()
        out[f"{key}.down"] = pick["down"].float().cpu()
        out[f"{key}.choice"] = torch.tensor(CANDIDATES.index(name))
        out[f"{key}.objective"] = torch.tensor(pick["all"], dtype=torch.float64)  # eq. 1, all tokens
        out[f"{key}.start_objective"] = torch.tensor(cands["start"]["all"], dtype=torch.float64)
        chosen_count[name] += 1
        damping[key] = {"chosen": name, **(pick["damping"] or {})}
        e_fit, e_held = pick["energy"]
        energy[0] += e_fit
        sums["start"][0] += cands["start"]["train"]
        sums["chosen"][0] += pick["train"]
        if e_held is not None:
            energy[1] += e_held
            sums["start"][1] += cands["start"]["held"]
            sums["chosen"][1] += pick["held"]
    rel = {k: {"train": _relative(v[0], energy[0]),
               "held_out": _relative(v[1], energy[1]) if energy[1] > 0 else None} for k, v in sums.items()}
    gap = rel["chosen"]["held_out"] - rel["chosen"]["train"] if rel["chosen"]["held_out"] is not None else None
    return {"relative_error": rel, "gap": gap, "chosen": chosen_count, "groups": damping,
            "energy": {"train": energy[0], "held_out": energy[1]}}


def _check_start(mode: str) -> None:
    """``mode`` names the single-pass merge that fit starts from."""
    if mode != "normal" and mode not in start_methods():
        raise ValueError(f"mode {mode!r} is not a start for merge=fit; valid choices: normal, "
                         f"{', '.join(start_methods())}")


MERGE.add("fit", MergeMethod(
    fit_merge, description="output-fitted merge (MergeMoE): least-squares gate/up (routed pre-activations) and "
                           "down projection (routed output), damping chosen on held-out windows; two extra passes "
                           "per layer",
    layer_pass=fit_pass, check_mode=_check_start))

