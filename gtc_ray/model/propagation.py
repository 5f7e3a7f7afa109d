"""Graph propagation as sparse matrix products (no torch_geometric; spec §5.2 steps 10-13, P3, P4).

- `bipartite_adjacency`: A_hat = D^-1/2 A D^-1/2 over the U+I nodes of the train graph, built
  once (the original recomputed degrees and norms 6 times per step).
- `propagate`: R = x + A_hat x + A_hat^2 x + ... (a sum over hops, no weights).
- `sample_user_graph`: the per-epoch user-user graph G (spec §5.5) as a sparse [U, U] matrix
  instead of a [U][40] Python list and a [U, 40, 192] gather.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def to_torch_csr(m: sp.csr_matrix, device=None) -> torch.Tensor:
    m = m.tocsr()
    return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                   torch.from_numpy(m.indices.astype(np.int64)),
                                   torch.from_numpy(m.data.astype(np.float32)), size=m.shape, device=device,
                                   check_invariants=False)


def bipartite_adjacency(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> sp.csr_matrix:
    """Symmetrically normalised adjacency of the user-item graph (train edges and their reverses)."""
    n = num_users + num_items
    r = np.concatenate([users, items + num_users])
    c = np.concatenate([items + num_users, users])
    a = sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=(n, n))  # duplicates would add up
    return sym_normalize(a)


def sym_normalize(a: sp.csr_matrix) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 with D the row sums; rows (and columns) of isolated nodes stay 0."""
    deg = np.asarray(a.sum(1)).reshape(-1)
    dinv = (1.0 / np.sqrt(np.maximum(deg, 1e-30)) * (deg > 0)).astype(np.float32)
    return sp.csr_matrix(sp.diags(dinv) @ a @ sp.diags(dinv), dtype=np.float32)


class SparseOperator:
    """A fixed sparse matrix with its transpose precomputed: torch's own sparse-mm backward rebuilds
    (and sorts) the transpose on every call, which cost ~25% of a training step (profiled). The
    scipy original is kept for row selection (`rows`)."""

    def __init__(self, m: sp.csr_matrix, device=None):
        m = sp.csr_matrix(m, dtype=np.float32)
        self.shape, self.nnz, self.device, self.host = m.shape, m.nnz, device, m
        self.a = to_torch_csr(m, device)
        self.at = to_torch_csr(m.T.tocsr(), device)

    def rows(self, idx: np.ndarray) -> "SparseOperator":
        """The operator made of rows idx (repeats allowed), e.g. a batch's users."""
        return SparseOperator(self.host[idx], self.device)


class _SpMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: SparseOperator, x: torch.Tensor) -> torch.Tensor:
        ctx.op = op
        return torch.sparse.mm(op.a, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, torch.sparse.mm(ctx.op.at, grad)


def spmm(a, x: torch.Tensor) -> torch.Tensor:
    """A @ x for a SparseOperator (or a torch sparse tensor), differentiable in x."""
    if isinstance(a, SparseOperator):
        return _SpMM.apply(a, x)
    return torch.sparse.mm(a, x)


def propagate(adj: torch.Tensor, x: torch.Tensor, n_layers: int) -> torch.Tensor:
    out, h = x, x
    for _ in range(n_layers):
        h = spmm(adj, h)
        out = out + h
    return out


def sample_user_graph(uu: sp.csr_matrix, k: int, rng: np.random.Generator) -> sp.csr_matrix:
    """Row-stochastic [U, U] user graph with k sampled neighbours per user (spec §5.5, as the original).

    n >= k: the first k neighbours (highest counts), weights softmax(counts[:k]).
    0 < n < k: pad to k with random repeats of existing entries, then softmax (duplicates gain weight).
    n = 0: an empty row (the original points at user 0 with weight 0: the same result).
    Duplicated (user, neighbour) entries are summed, which equals the original's gather + weighted sum.
    """
    U = uu.shape[0]
    counts = np.diff(uu.indptr)
    take = np.minimum(counts, k)
    pos = np.repeat(uu.indptr[:-1], take) + (np.arange(take.sum()) - np.repeat(np.cumsum(take) - take, take))
    short = (counts > 0) & (counts < k)
    pad_n = np.where(short, k - counts, 0)
    pad_rows = np.repeat(np.arange(U), pad_n)
    pad_pos = uu.indptr[pad_rows] + (rng.random(len(pad_rows)) * counts[pad_rows]).astype(np.int64)
    rows = np.concatenate([np.repeat(np.arange(U), take), pad_rows])
    idx = np.concatenate([pos, pad_pos])
    cols = uu.indices[idx]
    vals = uu.data[idx].astype(np.float64)
    # softmax over each row's k raw counts (stable: subtract the row max)
    rmax = np.full(U, -np.inf)
    np.maximum.at(rmax, rows, vals)
    e = np.exp(vals - rmax[rows])
    z = np.bincount(rows, weights=e, minlength=U)
    w = (e / z[rows]).astype(np.float32)
    g = sp.csr_matrix((w, (rows, cols)), shape=(U, U))  # sums duplicates
    g.sort_indices()
    return g
