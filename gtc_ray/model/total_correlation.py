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
from torch.autograd.function import once_differentiable
import torch.nn.functional as F


def _perm(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=device)


class _DiagReplacedCE(torch.autograd.Function):
    """sum_r [logsumexp_c L[r, c] - pos_r] / n_total with L = Q Kᵀ and L[r, offset + r] := pos_r.

    Q holds a block of rows (all of them, or one worker's shard: spec §11, "TC can be sharded by item
    rows"), K every column. One pass over row chunks computes the loss and, when a gradient is
    needed, the gradient too: the softmax of a chunk is all the gradient needs, so the chunk's
    logits are never recomputed and never kept (spec P2, P10: O(chunk x I) memory, 3 matrix
    products per chunk instead of 4). The backward only scales what the forward stored.
    """

    @staticmethod
    def forward(ctx, q, k, pos, chunk: int, offset: int, n_total: int, low: torch.dtype | None = None):
        n = q.shape[0]
        want_grad = any(ctx.needs_input_grad[:3])
        loss = q.new_zeros(())
        dq = torch.empty_like(q) if want_grad else None
        dk = torch.zeros_like(k) if want_grad else None
        dpos = torch.empty_like(pos) if want_grad else None
        idx = torch.arange(min(chunk, n), device=q.device)
        buf = q.new_empty(min(chunk, n), k.shape[0])  # reused: no per-chunk allocation (P10)
        # mixed precision: the three products in `low` (float32 accumulation inside the kernel),
        # the softmax and everything summed across chunks in float32 (spec P2)
        qm, km = (q, k) if low is None else (q.to(low), k.to(low))
        # Kᵀ laid out once: on CPU the float32 Q Kᵀ product is slow from the transposed view; with
        # 128-row chunks the whole kernel ran 1.2x faster than before (bench/tc_kernel.py)
        kt = k.T.contiguous() if low is None else km.T
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            rows, cols = idx[: e - s], idx[: e - s] + offset + s
            if low is None:
                logits = torch.mm(q[s:e], kt, out=buf[: e - s])
            else:
                logits = buf[: e - s].copy_(torch.mm(qm[s:e], kt))
            logits[rows, cols] = pos[s:e]
            if logits.is_cpu:  # in place: one fused kernel, no allocation (verified equal to softmax)
                p = torch.ops.aten._softmax.out(logits, 1, False, out=logits)
            else:  # GPU kernels are not documented as alias-safe; the caching allocator makes this cheap
                p = torch.softmax(logits, dim=1)
            p_pos = p[rows, cols]
            if bool((p_pos > 0).all()):
                loss = loss - p_pos.log().sum()  # CE = -log softmax at the positive
            else:  # a positive's probability underflowed: take its CE from a log-softmax instead
                lg = q[s:e] @ k.T
                lg[rows, cols] = pos[s:e]
                loss = loss - torch.log_softmax(lg, dim=1)[rows, cols].sum()
            if want_grad:
                dpos[s:e] = p_pos - 1.0
                p[rows, cols] = 0.0  # the diagonal is pos, not q k
                if low is None:
                    torch.mm(p, k, out=dq[s:e])
                    dk.addmm_(p.T, q[s:e])
                else:
                    pm = p.to(low)
                    dq[s:e] = torch.mm(pm, km)
                    dk += torch.mm(pm.T, qm[s:e])
        if want_grad:
            ctx.save_for_backward(dq, dk, dpos)
        ctx.n_total = n_total
        return loss / n_total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        dq, dk, dpos = ctx.saved_tensors
        w = g / ctx.n_total
        return dq * w, dk * w, dpos * w, None, None, None, None


# GPU chunks hold at most this many logits (256 MB in float32): one chunk for a Baby-sized catalogue
_GPU_CHUNK_ELEMENTS = 1 << 26


def default_chunk(n_cols: int, device: torch.device) -> int:
    """Rows per chunk. CPU: 128 (fastest in bench/tc_kernel.py at Baby's size, fp32 and bf16). GPU: as many
    rows as fit in _GPU_CHUNK_ELEMENTS, since each small chunk costs launches and a host sync."""
    if device.type == "cpu":
        return 128
    return max(256, _GPU_CHUNK_ELEMENTS // max(n_cols, 1))


def diag_replaced_ce(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, chunk: int | None = None, offset: int = 0,
                     n_total: int | None = None, low: torch.dtype | None = None) -> torch.Tensor:
    """Rows q[j] are global rows offset + j; the loss is their summed CE divided by n_total (default:
    len(q)), so the row-shards' losses of all workers add up to the full mean. chunk: rows per chunk
    (default: `default_chunk` for k's size and device)."""
    chunk = chunk or default_chunk(k.shape[0], q.device)
    return _DiagReplacedCE.apply(q, k, pos, chunk, offset, len(q) if n_total is None else n_total, low)


def tc_loss_n(zs: list[torch.Tensor], scale: torch.Tensor, generator: torch.Generator | None = None,
              chunk: int | None = None, rows: tuple[int, int] | None = None, low: torch.dtype | None = None) -> torch.Tensor:
    """rows = (lo, hi): only those anchor rows (one worker's share; all items stay negatives), divided
    by the full I, so the shares of all workers add up to the full loss. Same permutations needed."""
    n = zs[0].shape[0]
    lo, hi = rows or (0, n)
    pos = torch.stack([z[lo:hi] for z in zs], 0).prod(0).sum(-1)  # positives: same item everywhere
    losses = []
    for a in range(len(zs)):
        neg = None
        for b in range(len(zs)):
            if b == a:
                continue
            zb = zs[b][_perm(n, generator, zs[b].device)]
            neg = zb if neg is None else neg * zb
        losses.append(diag_replaced_ce(scale * zs[a][lo:hi], neg, scale * pos, chunk, offset=lo, n_total=n, low=low))
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
                           generator: torch.Generator | None = None,
                           rows: tuple[int, int] | None = None, low: torch.dtype | None = None) -> torch.Tensor:
    """rows: a row block of mode "n" (sharded workers); the other modes are computed whole.
    low: a lower precision for mode "n"'s matrix products (mixed precision)."""
    if len(zs) < 2:
        raise ValueError("the TC loss needs at least two representations")
    if mode == "n":
        return tc_loss_n(zs, scale, generator, rows=rows, low=low)
    if mode == "n_squared":
        return tc_loss_n_squared(zs, scale)
    if mode == "pairwise":
        return pairwise_infonce(zs, scale)
    raise ValueError(f"unknown tc mode {mode!r}")
