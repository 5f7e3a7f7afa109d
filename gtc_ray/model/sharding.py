"""Item-row sharding of the full-item work across DDP workers (spec §11).

Every training step of GTC runs the projections, both denoisers, L_gen and L_TC over all I items
(spec P1). Plain DDP would replicate that on every worker, so a second worker would only split the
small BPR batch. Instead each of W workers takes one block of item rows:

- projections, noising, denoising and the x0 estimate for its rows; `gather_rows` then gives every
  worker the full [I, .] result (the gate, the propagation and the TC keys need all items);
- L_gen over its rows, and the L_TC cross-entropy rows of its items (the CE is row-wise; the keys
  are all items), each divided by the global count, so the workers' shares add up to the full loss.

All workers draw the step's timesteps, noise and TC permutations from the same seed, so the result
is the single-process computation, split. Gradients: DDP averages over workers, so each worker puts
W x its share in its loss; `gather_rows`' backward sums the upstream gradients of all workers
(one all-reduce) and keeps its own block. Averaged, both give exactly the gradient of the full loss
(checked against a single process in tests/test_sharding.py).

Imports nothing from Ray: torch.distributed only, with whatever process group it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ItemShard:
    rank: int
    world: int
    group: Any = None  # a torch.distributed process group (None: the default group)

    def block(self, n: int) -> int:
        """Rows per worker: ceil(n / world) (the last worker's block may be short)."""
        return math.ceil(n / self.world)

    def bounds(self, n: int) -> tuple[int, int]:
        """This worker's rows [lo, hi)."""
        b = self.block(n)
        return min(self.rank * b, n), min((self.rank + 1) * b, n)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, shard: ItemShard) -> torch.Tensor:
        b = shard.block(n)
        padded = x.new_zeros((b,) + tuple(x.shape[1:]))  # all_gather needs equal sizes
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(shard.world)]
        dist.all_gather(parts, padded.contiguous(), group=shard.group)
        ctx.n, ctx.shard, ctx.b = n, shard, b
        return torch.cat(parts, 0)[:n]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        full = g.new_zeros((ctx.b * ctx.shard.world,) + tuple(g.shape[1:]))
        full[: ctx.n] = g
        dist.all_reduce(full, op=dist.ReduceOp.SUM, group=ctx.shard.group)  # every worker's upstream gradient
        lo, hi = ctx.shard.bounds(ctx.n)
        return full[lo:hi], None, None


def gather_rows(x: torch.Tensor, n: int, shard: ItemShard | None) -> torch.Tensor:
    """The full [n, ...] tensor from each worker's block of rows (differentiable)."""
    if shard is None or shard.world == 1:
        return x
    return _GatherRows.apply(x, n, shard)
