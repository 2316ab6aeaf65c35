"""Several processes on one job (``torchrun``, ``accelerate launch``), on torch.distributed.

Data parallel: every rank walks the same decoder layer at the same time on its own share of the calibration and
evaluation windows; every statistic is a sum in fp64 and is reduced with ``all_reduce`` once the layer's windows are
through, so grouping, merging and the plan-aware passes see exactly what one process would (up to the order of
floating-point sums). Samples (router inputs, router-refit pairs) are gathered and cut the same way on every rank.
Rank 0 plans, writes the checkpoint and prints; the other ranks are silent.

A plain ``moemerge merge`` is one rank (:data:`SINGLE`), and none of this code runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch

#: Seconds a collective may wait for the other ranks before the job fails (a crashed or killed rank).
TIMEOUT_S = int(os.environ.get("MOEMERGE_DIST_TIMEOUT", "600"))


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    traffic: dict = field(default_factory=lambda: {"bytes": 0}, compare=False)  # payload bytes this rank reduced

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of ``windows [N, S]`` (every rank gets at least one)."""
        if not self.distributed:
            return windows
        if len(windows) < self.world:
            from ..errors import MoemergeError

            raise MoemergeError(f"{len(windows)} windows cannot be shared by {self.world} ranks; give at least one "
                                f"per rank")
        bounds = [len(windows) * r // self.world for r in range(self.world + 1)]
        return windows[bounds[self.rank]:bounds[self.rank + 1]]

    def offset(self, count: int) -> int:
        """Index, among all ``count`` windows, of the first window of this rank's :meth:`share` (0 alone)."""
        return count * self.rank // self.world if self.distributed else 0

    def sum_(self, tensor: torch.Tensor) -> None:
        """In-place sum over ranks (fp64 sums stay fp64)."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            self.traffic["bytes"] += tensor.numel() * tensor.element_size()

    def gather(self, obj: object) -> list:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_fields(self, sums: dict[str, torch.Tensor]) -> None:
        """Sum a dict of tensors over ranks in place; a field some ranks never created (a group no token of theirs
        reached) is taken as zeros there, so every rank reduces the same fields in the same order."""
        if not self.distributed:
            return
        specs = {k: (tuple(v.shape), v.dtype) for k, v in sums.items()}
        union: dict = {}
        for other in self.gather(specs):
            union.update(other)
        device = next(iter(sums.values())).device if sums else torch.device("cpu")
        for key in sorted(union):
            if key not in sums:
                shape, dtype = union[key]
                sums[key] = torch.zeros(shape, dtype=dtype, device=device)
            self.sum_(sums[key])


SINGLE = Ranks()


def from_environment() -> Ranks:
    """The ranks of this process: joins the process group that ``torchrun`` / ``accelerate launch`` describe in the
    environment (gloo on CPU, nccl with one GPU per rank), or :data:`SINGLE` when started alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    return Ranks(dist.get_rank(), dist.get_world_size())
