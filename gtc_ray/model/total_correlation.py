"""Total-correlation (Symile-style) alignment losses (spec §5.2 step 9).

Inputs are row-normalised representations z_0..z_M of the same I items (ID + M modalities) and a
logit scale kappa. For each anchor a, the others b != a form the "multilinear inner product"
MIP(z_a[r], z_b[c_b], ...) = sum_d z_a[r,d] prod_b z_b[c_b,d]:

- mode "n" (the original's default): one random permutation pi_b per other representation, shared
  by all rows; column c of the logits is MIP(z_a[r], z_b[pi_b(c)], ...) and the positive (same item
  r everywhere) replaces the diagonal; loss = CE over the I columns, averaged over anchors.
- mode "n_squared" (three representations only): every (b, c) pairing as a negative, i.e. I^2
  columns; column k*I + c pairs z_b[c] with z_c[(c - k) mod I]. O(I^3 d) time: tiny catalogues only.
  Computed with a streaming log-sum-exp, so memory stays O(I^2).
- "pairwise": symmetric InfoNCE over every pair of representations (the ablation).

The positives are written into the logits' diagonal in place (no eye(I) masks, fixes P2).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def _perm(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=device)


class _DiagReplacedCE(torch.autograd.Function):
    """mean_r [logsumexp_c L[r, c] - pos_r] with L = Q Kᵀ and L[r, r] := pos_r, in row chunks.

    Memory is O(chunk x I) instead of several [I, I] temporaries (spec P2, P10); the backward
    recomputes each chunk's logits (one extra matrix product) rather than keeping them.
    """

    @staticmethod
    def forward(ctx, q, k, pos, chunk: int):
        n = q.shape[0]
        lse = torch.empty(n, dtype=q.dtype, device=q.device)
        idx = torch.arange(n, device=q.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = q[s:e] @ k.T
            logits[idx[: e - s], idx[s:e]] = pos[s:e]
            lse[s:e] = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(q, k, pos, lse)
        ctx.chunk = chunk
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, g):
        q, k, pos, lse = ctx.saved_tensors
        n, chunk = q.shape[0], ctx.chunk
        dq, dk, dpos = torch.zeros_like(q), torch.zeros_like(k), torch.empty_like(pos)
        idx = torch.arange(n, device=q.device)
        w = g / n
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits = q[s:e] @ k.T
            rows, cols = idx[: e - s], idx[s:e]
            logits[rows, cols] = pos[s:e]
            p = torch.exp_(logits.sub_(lse[s:e, None])).mul_(w)  # softmax * g / n, in place
            dpos[s:e] = p[rows, cols] - w
            p[rows, cols] = 0.0  # the diagonal is pos, not q k
            dq[s:e] = p @ k
            dk.addmm_(p.T, q[s:e])
        return dq, dk, dpos, None


def diag_replaced_ce(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return _DiagReplacedCE.apply(q, k, pos, chunk)


def tc_loss_n(zs: list[torch.Tensor], scale: torch.Tensor, generator: torch.Generator | None = None,
              chunk: int = 1024) -> torch.Tensor:
    n = zs[0].shape[0]
    prod_all = torch.stack(zs, 0).prod(0)  # [I, d]: positives' elementwise product
    pos = prod_all.sum(-1)  # [I]
    losses = []
    for a in range(len(zs)):
        neg = None
        for b in range(len(zs)):
            if b == a:
                continue
            zb = zs[b][_perm(n, generator, zs[b].device)]
            neg = zb if neg is None else neg * zb
        losses.append(diag_replaced_ce(scale * zs[a], neg, scale * pos, chunk))
    return torch.stack(losses).mean()


def tc_loss_n_squared(zs: list[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    if len(zs) != 3:
        raise ValueError("tc_mode 'n_squared' is defined for exactly three representations (ID + 2 modalities)")
    n = zs[0].shape[0]
    losses = []
    for a in range(3):
        b, c = [j for j in range(3) if j != a]
        za, zb, zc = zs[a], zs[b], zs[c]
        lse = None
        for k in range(n):
            block = (scale * za) @ (zb * torch.roll(zc, shifts=k, dims=0)).T  # [I, I]
            cur = torch.logsumexp(block, dim=1)
            lse = cur if lse is None else torch.logaddexp(lse, cur)
        pos = scale * (za * zb * zc).sum(-1)
        losses.append((lse - pos).mean())
    return torch.stack(losses).mean()


def pairwise_infonce(zs: list[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    n = zs[0].shape[0]
    labels = torch.arange(n, device=zs[0].device)
    losses = []
    for a, b in itertools.combinations(range(len(zs)), 2):
        logits = (scale * zs[a]) @ zs[b].T
        losses.append(0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)))
    return torch.stack(losses).mean()


def total_correlation_loss(zs: list[torch.Tensor], scale: torch.Tensor, mode: str = "n",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    if len(zs) < 2:
        raise ValueError("the TC loss needs at least two representations")
    if mode == "n":
        return tc_loss_n(zs, scale, generator)
    if mode == "n_squared":
        return tc_loss_n_squared(zs, scale)
    if mode == "pairwise":
        return pairwise_infonce(zs, scale)
    raise ValueError(f"unknown tc mode {mode!r}")
