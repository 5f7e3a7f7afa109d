"""Graph preparation benchmark: a Sports-sized synthetic set, plus a dense reference on a subsample.

    python bench/prepare.py [--preset sports] [--sub 3000]

Prints the seconds to build the item-item kNN graph (per modality, blended) and the user-user
co-occurrence graph, the process's peak RSS, and the speed ratio of the chunked/sparse builders
against straightforward dense implementations (full n x n matrices, the original's approach)
measured side by side on the same subsample in this run. Target: whole prepare < 30 s on 2 cores.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gtc_ray.config import GraphConfig  # noqa: E402
from gtc_ray.data.prepare import item_item_graph, train_matrix, user_user_graph  # noqa: E402
from gtc_ray.data.synth import PRESETS, generate  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_knn(f: np.ndarray, k: int) -> np.ndarray:
    x = torch.nn.functional.normalize(torch.from_numpy(f), dim=1)
    sim = x @ x.T  # the full I x I matrix
    idx = torch.topk(sim, k, dim=1).indices.numpy()
    adj = np.zeros(sim.shape, np.float32)
    np.put_along_axis(adj, idx, 1.0, axis=1)
    d = adj.sum(1)
    return adj / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]


def dense_user_graph(B, topk: int):
    C = torch.from_numpy((B @ B.T).toarray())  # dense U x U, as the original
    C.fill_diagonal_(0)
    out = []
    for u in range(C.shape[0]):  # per-row topk on the dense row, as the spec's fast reference
        k = min(int((C[u] > 0).sum()), topk)
        out.append(torch.topk(C[u], k))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sports")
    ap.add_argument("--sub", type=int, default=3000, help="items/users in the dense comparison")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    ds = generate(PRESETS[a.preset], seed=0)
    print(f"{a.preset}: {ds.num_users:,} users, {ds.num_items:,} items, {len(ds.users):,} interactions, "
          f"modalities {[(m, f.shape[1]) for m, f in ds.features.items()]} (generated in {time.perf_counter() - t:.1f}s)")
    base = rss_mb()
    cfg = GraphConfig()
    t0 = time.perf_counter()
    ii = item_item_graph(ds.features, cfg)
    t1 = time.perf_counter()
    u, i = ds.split_pairs("train")
    B = train_matrix(u, i, ds.num_users, ds.num_items)
    uu = user_user_graph(B, cfg.user_topk)
    t2 = time.perf_counter()
    print(f"item-item kNN graph  {t1 - t0:6.1f}s  ({ii.nnz:,} edges)")
    print(f"user-user graph      {t2 - t1:6.1f}s  ({uu.nnz:,} edges)")
    print(f"whole prepare        {t2 - t0:6.1f}s  (target < 30 s)")
    print(f"peak RSS             {rss_mb():,.0f} MB (after generating the data: {base:,.0f} MB)")

    # side by side on a subsample: chunked/sparse vs dense
    n = min(a.sub, ds.num_items)
    f = ds.features["image"][:n]
    t = time.perf_counter(); item_item_graph({"image": f}, cfg); ours_ii = time.perf_counter() - t
    t = time.perf_counter(); dense_knn(f, cfg.knn_k); dense_ii = time.perf_counter() - t
    nu = min(a.sub, ds.num_users)
    Bs = B[:nu]
    t = time.perf_counter(); user_user_graph(Bs, cfg.user_topk); ours_uu = time.perf_counter() - t
    t = time.perf_counter(); dense_user_graph(Bs, cfg.user_topk); dense_uu = time.perf_counter() - t
    print(f"\nsubsample ({n:,} items / {nu:,} users), same run:")
    print(f"  item-item  ours {ours_ii:6.2f}s  dense {dense_ii:6.2f}s  speed-up x{dense_ii / ours_ii:5.1f}")
    print(f"  user-user  ours {ours_uu:6.2f}s  dense {dense_uu:6.2f}s  speed-up x{dense_uu / ours_uu:5.1f}")
    print(f"  dense memory would be {ds.num_items ** 2 * 4 / 1e9:.2f} GB (items^2) and "
          f"{ds.num_users ** 2 * 4 / 1e9:.2f} GB (users^2) at full size")


if __name__ == "__main__":
    main()
