"""Graph preparation against references: the original's user graph file, a dense brute-force kNN."""

import os
import stat

import numpy as np
import pytest
import scipy.sparse as sp

from gtc_ray.config import GraphConfig
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import graph_key, knn_graph, modality_weights, prepare, train_matrix, user_user_graph
from gtc_ray.errors import GtcInputError

QUIET = lambda m: None


def dense_knn_reference(f: np.ndarray, k: int) -> np.ndarray:
    """Straightforward dense version of spec §5.4: cosine sim, top-k per row, d_r^-1/2 d_c^-1/2."""
    x = f / np.linalg.norm(f, axis=1, keepdims=True)
    sim = x @ x.T
    adj = np.zeros_like(sim)
    for r in range(len(sim)):
        adj[r, np.argsort(-sim[r], kind="stable")[:k]] = 1.0
    d = adj.sum(1)
    return adj / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]


def test_knn_matches_dense_bruteforce():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(57, 9)).astype(np.float32)  # continuous features: no ties
    for k in (1, 4, 10):
        got = knn_graph(f, k, chunk_rows=16).toarray()  # several chunks
        np.testing.assert_allclose(got, dense_knn_reference(f, k), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)  # row sums all k -> weights 1/k


def test_blend_weights_follow_spec():
    assert modality_weights(GraphConfig(), ["image", "text"]) == pytest.approx({"image": 0.1, "text": 0.9})
    assert modality_weights(GraphConfig(), ["a", "b", "c"]) == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    with pytest.raises(GtcInputError, match="do not match"):
        modality_weights(GraphConfig(modality_weights={"image": 1.0}), ["image", "text"])


def test_knn_k_larger_than_items():
    with pytest.raises(GtcInputError, match="exceeds the number of items"):
        knn_graph(np.ones((5, 3), np.float32), 6)


def test_user_graph_matches_dense_cooccurrence():
    rng = np.random.default_rng(1)
    U, I = 40, 30
    B = sp.csr_matrix((rng.random((U, I)) < 0.2).astype(np.float32))
    C = (B @ B.T).toarray()
    np.fill_diagonal(C, 0)
    g = user_user_graph(B, topk=7, chunk_rows=8)
    for u in range(U):
        s, e = g.indptr[u], g.indptr[u + 1]
        counts = np.sort(C[u][C[u] > 0])[::-1][:7]
        np.testing.assert_array_equal(g.data[s:e], counts)  # same counts, descending
        assert np.all(C[u, g.indices[s:e]] == g.data[s:e])  # and they are the right neighbours' counts


@pytest.mark.shared_data
def test_user_graph_matches_reference_file(ml100k, ml100k_src):
    ds = load_dataset(ml100k)
    u, i = ds.split_pairs("train")
    g = user_user_graph(train_matrix(u, i, ds.num_users, ds.num_items), topk=200)
    # trusted reference shipped beside the data (made by the original O(U^2) procedure)
    ref = np.load(ml100k_src / "user_graph_dict.npy", allow_pickle=True).item()
    assert len(ref) == ds.num_users
    for user in range(ds.num_users):
        nbrs, w = np.array(ref[user][0]), np.array(ref[user][1], np.float32)
        s, e = g.indptr[user], g.indptr[user + 1]
        np.testing.assert_array_equal(g.data[s:e], w)
        if len(w):
            cut = w[-1]  # neighbours above the last kept count are fixed; at the cut, ties may differ
            assert set(g.indices[s:e][g.data[s:e] > cut]) == set(nbrs[w > cut])
            assert (g.data[s:e] == cut).sum() == (w == cut).sum()


def test_prepare_caches_atomically_and_read_only(tiny):
    ds = load_dataset(tiny)
    cfg = GraphConfig(knn_k=5)
    g1 = prepare(ds, cfg, log=QUIET)
    assert g1.path.parent.name == "prepared" and g1.path.name == g1.key
    assert not (os.stat(g1.path / "graphs.npz").st_mode & stat.S_IWUSR)
    mtime = os.stat(g1.path / "graphs.npz").st_mtime_ns
    g2 = prepare(ds, cfg, log=QUIET)
    assert os.stat(g2.path / "graphs.npz").st_mtime_ns == mtime  # reused, not rebuilt
    assert (g1.item_item != g2.item_item).nnz == 0 and (g1.user_user != g2.user_user).nnz == 0
    # every parameter that shapes the graphs changes the key (fixes B10)
    keys = {graph_key(ds, c, ["image", "text"]) for c in
            (cfg, GraphConfig(knn_k=6), GraphConfig(knn_k=5, mm_image_weight=0.3), GraphConfig(knn_k=5, user_topk=10))}
    assert len(keys) == 4
    assert [p for p in g1.path.parent.iterdir() if p.name.startswith(".")] == []
