"""The plan: which original experts of each layer become which merged expert.

A :class:`LayerPlan` lists the groups of one layer (group ``g`` becomes merged expert ``g``), the dominant member of
each group, and experts dropped with no replacement (pruning). A layer whose groups are all singletons and drops
nothing is left as it is. Plans are plain data: saved in ``merge_info.json`` and reloadable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import MoemergeError


@dataclass
class LayerPlan:
    layer: int
    num_experts: int
    groups: list[list[int]]
    dominant: list[int]
    dropped: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen = sorted([e for g in self.groups for e in g] + list(self.dropped))
        if seen != list(range(self.num_experts)):
            raise MoemergeError(f"layer {self.layer}: plan does not cover experts 0..{self.num_experts - 1} once each")
        if any(not g for g in self.groups):
            raise MoemergeError(f"layer {self.layer}: plan has an empty group")
        if len(self.dominant) != len(self.groups) or any(d not in g for d, g in zip(self.dominant, self.groups)):
            raise MoemergeError(f"layer {self.layer}: each group needs one dominant expert among its members")

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def is_identity(self) -> bool:
        return not self.dropped and all(len(g) == 1 for g in self.groups) and \
            [g[0] for g in self.groups] == list(range(self.num_experts))

    def group_of(self) -> list[int]:
        """For each original expert, the index of its group (-1 if dropped)."""
        out = [-1] * self.num_experts
        for gi, g in enumerate(self.groups):
            for e in g:
                out[e] = gi
        return out

    @classmethod
    def identity(cls, layer: int, num_experts: int) -> LayerPlan:
        return cls(layer, num_experts, [[e] for e in range(num_experts)], list(range(num_experts)))

    @classmethod
    def from_labels(cls, layer: int, labels, dominant_of=None) -> LayerPlan:
        """Groups from cluster labels, ordered by their smallest member (so plans are deterministic);
        ``dominant_of(members) -> expert`` picks each dominant (default: the first member)."""
        labels = [int(x) for x in labels]
        members: dict[int, list[int]] = {}
        for e, lab in enumerate(labels):
            members.setdefault(lab, []).append(e)
        groups = sorted(members.values(), key=lambda g: g[0])
        dominant = [dominant_of(g) if dominant_of else g[0] for g in groups]
        return cls(layer, len(labels), groups, dominant)


@dataclass
class MergePlan:
    layers: dict[int, LayerPlan]

    def counts(self) -> dict[int, int]:
        return {li: p.num_groups for li, p in sorted(self.layers.items())}

    @property
    def uniform(self) -> bool:
        return len(set(self.counts().values())) <= 1

    def to_json(self) -> dict:
        return {str(li): asdict(p) for li, p in sorted(self.layers.items())}

    @classmethod
    def from_json(cls, data: dict) -> MergePlan:
        return cls({int(k): LayerPlan(**v) for k, v in data.items()})
