"""Vectorised full-ranking metrics against a plain-Python brute force."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from gtc_ray.train.metrics import brute_force_metrics, evaluate_sums, metric_names, sums_to_metrics


def _case(seed, U=23, I=40, d=6):
    rng = np.random.default_rng(seed)
    zu, yi = rng.normal(size=(U, d)).astype(np.float32), rng.normal(size=(I, d)).astype(np.float32)
    mask = [set(rng.choice(I, rng.integers(0, 8), replace=False)) for _ in range(U)]
    truth = []
    for u in range(U):
        cand = [i for i in range(I) if i not in mask[u]]
        truth.append(set(rng.choice(cand, rng.integers(1, 12), replace=False)))
    to_csr = lambda sets: sp.csr_matrix((np.ones(sum(map(len, sets))),
                                         (np.repeat(np.arange(U), [len(s) for s in sets]),
                                          np.array([i for s in sets for i in sorted(s)], int))), shape=(U, I))
    return zu, yi, mask, truth, to_csr(mask), to_csr(truth)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_bruteforce(seed):
    zu, yi, mask, truth, mask_csr, truth_csr = _case(seed)
    topk = [1, 5, 10, 20]
    sums, n = evaluate_sums(torch.from_numpy(zu), torch.from_numpy(yi), np.arange(len(zu)), truth_csr, mask_csr,
                            topk, chunk=7)  # several chunks
    got = sums_to_metrics(sums, n, topk)
    ref = brute_force_metrics(zu @ yi.T, truth, mask, topk)
    assert set(got) == set(metric_names(topk))
    for k in got:
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k


def test_sharded_sums_equal_whole():
    zu, yi, mask, truth, mask_csr, truth_csr = _case(4)
    args = (torch.from_numpy(zu), torch.from_numpy(yi))
    users = np.arange(len(zu))
    whole, n = evaluate_sums(*args, users, truth_csr, mask_csr, [5, 10])
    parts = [evaluate_sums(*args, users[r::3], truth_csr, mask_csr, [5, 10]) for r in range(3)]
    torch.testing.assert_close(sum(p[0] for p in parts), whole)
    assert sum(p[1] for p in parts) == n


def test_hand_checked_values():
    # one user, items 0..4 scored descending; truth {1, 3}; nothing masked
    zu = torch.tensor([[1.0]]); yi = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    truth = sp.csr_matrix((np.ones(2), ([0, 0], [1, 3])), shape=(1, 5))
    m = sums_to_metrics(*evaluate_sums(zu, yi, np.array([0]), truth, sp.csr_matrix((1, 5)), [2, 4]), [2, 4])
    assert m["recall@2"] == pytest.approx(0.5) and m["precision@2"] == pytest.approx(0.5)  # 1 hit in 2
    assert m["recall@4"] == pytest.approx(1.0)
    idcg = 1 + 1 / np.log2(3)
    assert m["ndcg@4"] == pytest.approx((1 / np.log2(3) + 1 / np.log2(5)) / idcg)
    assert m["map@4"] == pytest.approx((1 / 2 + 2 / 4) / 2)
