"""Prepared graphs: the item-item kNN graph and the user-user co-occurrence graph.

Both are built in row blocks, so memory grows with rows x k (plus one block), never with n^2:
- item-item (spec §5.4): per modality, cosine top-k per row on the raw features; edge (r, c) gets
  weight d_r^-1/2 d_c^-1/2 with d the row sums of the 0/1 kNN matrix (= 1/k, as in the original);
  modalities are blended with their weights. Row-stochastic, directed.
- user-user (spec §2.5): C = B Bᵀ on the binary train matrix, diagonal zeroed, top `user_topk`
  neighbours per user by shared-item count (ties by ascending user index). Same neighbours and
  counts as the original O(U²) procedure, up to the order of ties.

The result is cached at `DATASET/prepared/<key>/graphs.npz` (+ meta.json), where the key hashes
the dataset's content hash and every parameter that shapes the graphs (fixes B10). It is always
built in a local staging directory. A local dataset gets it renamed into place and made read-only;
a dataset on an object store (any URI) gets it uploaded with `meta.json` last, the commit: a cache
hit there needs meta.json, and graphs.npz is then read back in one GET. Parallel trials share the
cache and, on a hit, only ever read it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from gtc_ray import storage
from gtc_ray.config import GraphConfig
from gtc_ray.data.dataset import Dataset
from gtc_ray.errors import GtcInputError
from gtc_ray.model.propagation import sym_normalize

PREPARE_VERSION = 1


@dataclass
class Graphs:
    item_item: sp.csr_matrix  # [I, I] float32, row-stochastic blend of the modality kNN graphs (may be empty)
    user_user: sp.csr_matrix  # [U, U] float32 shared-item counts, top user_topk per row
    key: str
    path: Path | str | None = None  # the cache directory: a Path for a local dataset, a URI str otherwise


def modality_weights(cfg: GraphConfig, names: list[str]) -> dict[str, float]:
    """Blend weights: explicit config, else image/text = mm_image_weight / rest (spec), else uniform."""
    if not names:
        return {}
    if cfg.modality_weights:
        unknown = set(cfg.modality_weights) - set(names)
        if unknown or set(names) - set(cfg.modality_weights):
            raise GtcInputError("config key graph.modality_weights", f"names {sorted(cfg.modality_weights)} "
                                f"do not match the dataset's modalities {sorted(names)}",
                                "give one weight per modality of the dataset")
        w = {k: float(v) for k, v in cfg.modality_weights.items()}
    elif sorted(names) == ["image", "text"]:
        w = {"image": cfg.mm_image_weight, "text": 1.0 - cfg.mm_image_weight}
    else:
        w = {k: 1.0 for k in names}
    total = sum(w.values())
    if total <= 0:
        raise GtcInputError("config key graph.modality_weights", "weights sum to 0", "give some modality a weight > 0")
    return {k: v / total for k, v in w.items()}


def knn_graph(features: np.ndarray, k: int, chunk_rows: int = 2048) -> sp.csr_matrix:
    """Cosine top-k graph of one modality, normalised d_r^-1/2 d_c^-1/2 (spec §5.4)."""
    n = features.shape[0]
    if k > n:
        raise GtcInputError("config key graph.knn_k", f"k={k} exceeds the number of items ({n})",
                            f"set graph.knn_k <= {n}")
    x = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(features, np.float32)), dim=1)
    cols = np.empty((n, k), np.int64)
    for s in range(0, n, chunk_rows):
        sim = x[s:s + chunk_rows] @ x.T  # [chunk, n]: the only n-wide temporary
        cols[s:s + chunk_rows] = torch.topk(sim, k, dim=1).indices.numpy()
    rows = np.repeat(np.arange(n), k)
    return sym_normalize(sp.csr_matrix((np.ones(n * k, np.float32), (rows, cols.reshape(-1))), shape=(n, n)))


def item_item_graph(features: dict[str, np.ndarray], cfg: GraphConfig) -> sp.csr_matrix:
    w = modality_weights(cfg, list(features))
    n = next(iter(features.values())).shape[0] if features else 0
    out = sp.csr_matrix((n, n), dtype=np.float32)
    for name in sorted(features):  # name order: the blend does not depend on the manifest's order
        out = out + w[name] * knn_graph(features[name], cfg.knn_k, cfg.chunk_rows)
    out = sp.csr_matrix(out, dtype=np.float32)
    out.sort_indices()
    return out


def train_matrix(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> sp.csr_matrix:
    """Binary [U, I] matrix of training interactions (duplicates count once)."""
    m = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(num_users, num_items))
    m.data[:] = 1.0
    return m


def user_user_graph(B: sp.csr_matrix, topk: int, chunk_rows: int = 2048) -> sp.csr_matrix:
    """Top-`topk` co-occurrence neighbours per user, weights = shared-item counts (spec §2.5)."""
    U = B.shape[0]
    Bt = B.T.tocsr()
    indptr, indices, data = [np.zeros(1, np.int64)], [], []
    for s in range(0, U, chunk_rows):
        C = (B[s:s + chunk_rows] @ Bt).tocoo()  # [chunk, U] sparse counts
        r, c, v = C.row, C.col, C.data
        off = r + s != c  # zero the diagonal
        r, c, v = r[off], c[off], v[off]
        order = np.lexsort((c, -v, r))  # per row: count descending, then user ascending
        r, c, v = r[order], c[order], v[order]
        rows_n = min(chunk_rows, U - s)
        starts = np.searchsorted(r, np.arange(rows_n))
        rank = np.arange(len(r)) - starts[r]
        keep = rank < topk
        counts = np.bincount(r[keep], minlength=rows_n)
        indptr.append(indptr[-1][-1] + np.cumsum(counts))
        indices.append(c[keep]); data.append(v[keep])
    ip = np.concatenate(indptr)
    # indices are kept in rank order (not sorted), which preserves the neighbour ranking
    return sp.csr_matrix((np.concatenate(data).astype(np.float32) if data else np.zeros(0, np.float32),
                          np.concatenate(indices) if indices else np.zeros(0, np.int64), ip), shape=(U, U))


def graph_key(ds: Dataset, cfg: GraphConfig, modalities: list[str]) -> str:
    payload = {"v": PREPARE_VERSION, "dataset": ds.content_hash, "knn_k": cfg.knn_k, "user_topk": cfg.user_topk,
               "weights": modality_weights(cfg, modalities), "modalities": sorted(modalities)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _save(path: Path, g: Graphs, meta: dict) -> None:
    np.savez(path / "graphs.npz",
             ii_indptr=g.item_item.indptr, ii_indices=g.item_item.indices, ii_data=g.item_item.data,
             uu_indptr=g.user_user.indptr, uu_indices=g.user_user.indices, uu_data=g.user_user.data,
             shape=np.array([*g.item_item.shape, *g.user_user.shape]))
    (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


COMMIT = "meta.json"  # written last when the cache is published to an object store


def _from_npz(z, key: str, path) -> Graphs:
    s = z["shape"]
    ii = sp.csr_matrix((z["ii_data"], z["ii_indices"], z["ii_indptr"]), shape=(int(s[0]), int(s[1])))
    uu = sp.csr_matrix((z["uu_data"], z["uu_indices"], z["uu_indptr"]), shape=(int(s[2]), int(s[3])))
    return Graphs(ii, uu, key, path)


def _load(path, key: str) -> Graphs:
    """Read a cache directory: a local Path, or a URI (graphs.npz fetched whole, in one read)."""
    if isinstance(path, Path):
        with np.load(path / "graphs.npz", allow_pickle=False) as z:
            return _from_npz(z, key, path)
    with np.load(io.BytesIO(storage.read_bytes(storage.join(path, "graphs.npz"))), allow_pickle=False) as z:
        return _from_npz(z, key, path)


def build_graphs(ds: Dataset, cfg: GraphConfig, modalities: list[str] | None = None, log=print) -> tuple[Graphs, dict]:
    modalities = list(ds.features) if modalities is None else modalities
    t0 = time.perf_counter()
    ii = item_item_graph({m: ds.features[m] for m in modalities}, cfg) if modalities else \
        sp.csr_matrix((ds.num_items, ds.num_items), dtype=np.float32)
    t1 = time.perf_counter()
    log(f"  item-item kNN graph: {ii.nnz} edges over {len(modalities)} modalities in {t1 - t0:.1f}s")
    u, i = ds.split_pairs("train")
    uu = user_user_graph(train_matrix(u, i, ds.num_users, ds.num_items), cfg.user_topk, cfg.chunk_rows)
    t2 = time.perf_counter()
    log(f"  user-user graph: {uu.nnz} edges in {t2 - t1:.1f}s")
    key = graph_key(ds, cfg, modalities)
    meta = {"key": key, "dataset": ds.content_hash, "knn_k": cfg.knn_k, "user_topk": cfg.user_topk,
            "weights": modality_weights(cfg, modalities), "seconds": {"item_item": t1 - t0, "user_user": t2 - t1}}
    return Graphs(ii, uu, key), meta


def prepare(ds: Dataset, cfg: GraphConfig, modalities: list[str] | None = None, log=print) -> Graphs:
    """Load the cached graphs for (dataset, cfg), building and caching them atomically if absent.

    The cache lives under the dataset's location, local or URI (see the module docstring); the
    returned Graphs' `path` is its directory (a Path when local, a URI str otherwise)."""
    modalities = list(ds.features) if modalities is None else modalities
    key = graph_key(ds, cfg, modalities)
    if ds.path is None:
        return build_graphs(ds, cfg, modalities, log)[0]
    if storage.local_path(ds.path) is None:
        return _prepare_uri(ds, cfg, modalities, key, log)
    final = storage.local_path(ds.path) / "prepared" / key
    if (final / "graphs.npz").is_file():
        log(f"using prepared graphs {final}")
        return _load(final, key)
    log(f"preparing graphs -> {final}")
    g, meta = build_graphs(ds, cfg, modalities, log)
    final.parent.mkdir(exist_ok=True)
    tmp = storage.staging_dir(final)  # beside it: the rename stays on one file system
    try:
        _save(tmp, g, meta)
        for p in tmp.iterdir():
            os.chmod(p, 0o444)  # read-only: shared by parallel trials
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    g.path = final
    return g


def _prepare_uri(ds: Dataset, cfg: GraphConfig, modalities: list[str], key: str, log) -> Graphs:
    """prepare() for a dataset on an object store: a hit reads the bucket only; a miss builds
    locally and publishes with meta.json (the commit) last, unless another process did first."""
    final = storage.join(ds.path, "prepared", key)
    commit = storage.join(final, COMMIT)
    broken = False
    try:
        if storage.is_file(commit):
            log(f"using prepared graphs {final}")
            return _load(final, key)
    except (OSError, KeyError, ValueError) as e:  # unreadable cache: rebuilt and republished below
        broken = True
        log(f"  prepared graphs at {final} unreadable ({storage.describe_error(final, e)}); rebuilding")
    log(f"preparing graphs -> {final}")
    g, meta = build_graphs(ds, cfg, modalities, log)
    g.path = final
    if not broken and storage.is_file(commit):  # another trial published while this one built: keep its copy
        return g
    tmp = storage.staging_dir(final)
    try:
        _save(tmp, g, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        storage.publish_dir(tmp, final, commit=COMMIT)
    except OSError as e:  # e.g. a read-only bucket: the graphs are still usable for this run
        log(f"  warning: could not cache the graphs at {final} ({storage.describe_error(final, e)})")
    return g
