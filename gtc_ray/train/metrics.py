"""Full-ranking metrics (spec §8), vectorised and chunked over users.

For each user: scores over all items, seen items masked to -inf, top-maxK, hit vector against the
split's items. Per-user values, summed here (so shards can be all-reduced), averaged by the caller:
- Recall@K    = sum_{r<=K} hit_r / |pos|
- Precision@K = sum_{r<=K} hit_r / K
- NDCG@K      = sum_{r<=K} hit_r / log2(r+1)  /  sum_{r<=min(|pos|,K)} 1 / log2(r+1)
- MAP@K       = sum_{r<=K} hit_r * Prec@r  /  min(|pos|, K)
Memory is bounded by `chunk` x I scores at a time (fixes P6: no per-user Python loops).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

METRICS = ("recall", "ndcg", "precision", "map")


def metric_names(topk: list[int]) -> list[str]:
    return [f"{m}@{k}" for m in METRICS for k in topk]


def rank_metric_sums(topk_idx: torch.Tensor, truth: torch.Tensor, n_pos: torch.Tensor, topk: list[int]) -> torch.Tensor:
    """topk_idx [B, maxK] ranked items, truth [B, I] bool, n_pos [B] -> sums [len(METRICS)*len(topk)]."""
    hits = truth.gather(1, topk_idx).float()  # [B, maxK]
    maxk = topk_idx.shape[1]
    ranks = torch.arange(1, maxk + 1, device=hits.device, dtype=torch.float32)
    disc = 1.0 / torch.log2(ranks + 1.0)
    cum_hits = hits.cumsum(1)
    prec_at_r = cum_hits / ranks
    dcg = (hits * disc).cumsum(1)
    idcg_table = disc.cumsum(0)
    ap = (hits * prec_at_r).cumsum(1)
    n_pos = n_pos.float()
    out = {m: [] for m in METRICS}
    for k in topk:
        kk = min(k, maxk)
        denom_k = torch.clamp(n_pos, max=k)
        out["recall"].append((cum_hits[:, kk - 1] / n_pos).sum())
        out["precision"].append((cum_hits[:, kk - 1] / k).sum())
        idcg = idcg_table[(denom_k.long() - 1).clamp(max=maxk - 1)]
        out["ndcg"].append((dcg[:, kk - 1] / idcg).sum())
        out["map"].append((ap[:, kk - 1] / denom_k).sum())
    return torch.stack([v for m in METRICS for v in out[m]])


def csr_rows_dense(m: sp.csr_matrix, rows: np.ndarray, device=None) -> torch.Tensor:
    sub = m[rows]
    dense = torch.zeros(len(rows), m.shape[1], dtype=torch.bool, device=device)
    r = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
    if len(r):
        dense[torch.from_numpy(r).to(device), torch.from_numpy(sub.indices.astype(np.int64)).to(device)] = True
    return dense


def evaluate_sums(user_emb: torch.Tensor, item_emb: torch.Tensor, users: np.ndarray, truth: sp.csr_matrix,
                  mask: sp.csr_matrix, topk: list[int], chunk: int = 1024) -> tuple[torch.Tensor, int]:
    """Metric sums over `users` (a shard) and their count. `truth`/`mask` are [U, I] CSR matrices."""
    device = user_emb.device
    maxk = min(max(topk), item_emb.shape[0])
    sums = torch.zeros(len(METRICS) * len(topk), dtype=torch.float64, device=device)
    for s in range(0, len(users), chunk):
        rows = users[s:s + chunk]
        scores = user_emb[torch.from_numpy(rows.astype(np.int64)).to(device)] @ item_emb.T
        scores.masked_fill_(csr_rows_dense(mask, rows, device), float("-inf"))
        idx = torch.topk(scores, maxk, dim=1).indices
        t = csr_rows_dense(truth, rows, device)
        n_pos = torch.from_numpy(np.diff(truth[rows].indptr)).to(device)
        sums += rank_metric_sums(idx, t, n_pos, topk).double()
    return sums, len(users)


def representation_share_sums(user_emb: torch.Tensor, item_emb: torch.Tensor, users: np.ndarray, n_reps: int,
                              chunk: int = 1024) -> torch.Tensor:
    """Sum over `users` x all items of |<z_u^r, y_i^r>| for each of the `n_reps` representations whose
    d-wide blocks, concatenated, make up the final embeddings (score = sum over r of the blocks'
    dot products). [n_reps] float64; shards add up."""
    device = user_emb.device
    d = user_emb.shape[1] // n_reps
    out = torch.zeros(n_reps, dtype=torch.float64, device=device)
    for s in range(0, len(users), chunk):
        zu = user_emb[torch.from_numpy(users[s:s + chunk].astype(np.int64)).to(device)]
        for r in range(n_reps):
            out[r] += (zu[:, r * d:(r + 1) * d] @ item_emb[:, r * d:(r + 1) * d].T).abs().sum().double()
    return out


def modality_balance(share_sums) -> float:
    """Modality-balance score: the normalised entropy of the representations' shares of the user-item
    scores. With c_r = mean over (user, item) of |<z_u^r, y_i^r>| for each of the R = 1 + M
    representations (ID and each modality) and p_r = c_r / sum_r c_r, it is -sum_r p_r ln p_r / ln R:
    1 when every representation contributes equally to the scores, 0 when one alone does. NaN for
    R = 1 (ID only: nothing to balance)."""
    c = np.asarray(share_sums.cpu() if hasattr(share_sums, "cpu") else share_sums, dtype=np.float64)
    if len(c) < 2 or c.sum() <= 0:
        return float("nan")
    p = c / c.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(len(c)))


def eval_protocol(cfg) -> dict:
    """What produced a set of metrics: recorded with every metrics file, MLflow run and table."""
    strict = bool(cfg.eval.mask_valid_in_test)
    return {"name": "strict" if strict else "spec",
            "ranking": "full ranking over all items",
            "test_mask": "training and validation items" if strict else "training items (spec section 8)",
            "valid_mask": "training items",
            "selection": f"early stopping on validation {cfg.eval.valid_metric}; test evaluated once",
            "seed": cfg.train.seed}


def sums_to_metrics(sums, count: int, topk: list[int]) -> dict[str, float]:
    vals = (np.asarray(sums.cpu() if hasattr(sums, "cpu") else sums, dtype=np.float64) / max(count, 1))
    return {name: float(v) for name, v in zip(metric_names(topk), vals)}


def brute_force_metrics(scores: np.ndarray, truth: list[set], mask: list[set], topk: list[int]) -> dict[str, float]:
    """Reference implementation, one user at a time in plain Python (for tests only)."""
    res = {n: 0.0 for n in metric_names(topk)}
    for u, row in enumerate(scores):
        cand = [i for i in np.argsort(-row, kind="stable") if i not in mask[u]]
        pos = truth[u]
        for k in topk:
            top = cand[:k]
            hits = [1.0 if i in pos else 0.0 for i in top]
            res[f"recall@{k}"] += sum(hits) / len(pos)
            res[f"precision@{k}"] += sum(hits) / k
            dcg = sum(h / np.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1 / np.log2(r + 2) for r in range(min(len(pos), k)))
            res[f"ndcg@{k}"] += dcg / idcg
            ap, c = 0.0, 0.0
            for r, h in enumerate(hits):
                c += h
                ap += h * c / (r + 1)
            res[f"map@{k}"] += ap / min(len(pos), k)
    return {k: v / len(scores) for k, v in res.items()}
