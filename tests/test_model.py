"""Model math against hand-checkable references (no Ray)."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from gtc_ray.config import CompatConfig, ModelConfig
from gtc_ray.model.diffusion import ConditionalDenoiser, NoiseSchedule, timestep_embedding
from gtc_ray.model.gtc import GTC, gate_as_written, gate_per_modality
from gtc_ray.model.propagation import SparseOperator, bipartite_adjacency, propagate, sample_user_graph, spmm
from gtc_ray.model.total_correlation import pairwise_infonce, tc_loss_n, tc_loss_n_squared


# ------------------------------------------------------------------ diffusion
def test_schedule_golden_values():
    s = NoiseSchedule(600, 1e-4, 0.01)
    ab = s.alpha_bar
    # spec §5.2: abar_599 ~ 0.048, abar_300 ~ 0.46; closed form prod(1 - beta_t)
    betas = np.linspace(1e-4, 0.01, 600)
    for t in (0, 1, 150, 300, 599):
        assert ab[t].item() == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-5)
    assert ab[599].item() == pytest.approx(0.048, abs=0.002)
    assert ab[300].item() == pytest.approx(0.46, abs=0.01)
    assert s.eval_timestep == 300


def test_schedule_verbs_invert():
    s = NoiseSchedule(100, 1e-4, 0.02)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = s.sample_timesteps(5, g)
    assert ((t >= 1) & (t < 100)).all()
    xt = s.add_noise(x0, t, eps)
    torch.testing.assert_close(s.predict_x0(xt, t, eps), x0, rtol=1e-4, atol=1e-4)  # exact eps recovers x0
    # one reverse step with the true eps at t=0 returns the DDPM mean with no noise
    t0 = torch.zeros(5, dtype=torch.long)
    x1 = s.add_noise(x0, t0, eps)
    step = s.step(x1, t0, eps, g)
    expected = (x1 - s.betas[0] / (1 - s.alpha_bar[0]).sqrt() * eps) / s.alphas[0].sqrt()
    torch.testing.assert_close(step, expected)


def test_denoiser_matches_original_size_and_embedding():
    d = ConditionalDenoiser(64, 64)
    assert sum(p.numel() for p in d.parameters()) == 309_248  # spec §5.1
    t = torch.tensor([0, 3])
    e = timestep_embedding(t, 128)
    assert e.shape == (2, 128)
    assert e[0, :64].abs().max() == 0 and torch.allclose(e[0, 64:], torch.ones(64))  # sin 0, cos 0
    assert e[1, 1].item() == pytest.approx(math.sin(3 * 10000 ** (-2 / 128)), rel=1e-5)
    assert d(torch.randn(7, 64), torch.randint(1, 600, (7,)), torch.randn(7, 64)).shape == (7, 64)


# ------------------------------------------------------------------ total correlation
def _norm(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_tc_loss_n_matches_formula():
    n, d = 6, 4
    zs = [_norm(n, d, seed=s) for s in range(3)]
    scale = torch.tensor(2.5)
    got = tc_loss_n(zs, scale, torch.Generator().manual_seed(7))
    # reference: replay the same permutations, write logits element by element
    g = torch.Generator().manual_seed(7)
    total = 0.0
    for a in range(3):
        others = [b for b in range(3) if b != a]
        perms = {b: torch.randperm(n, generator=g) for b in others}
        for r in range(n):
            row = []
            for c in range(n):
                if c == r:
                    v = sum(zs[0][r, k] * zs[1][r, k] * zs[2][r, k] for k in range(d))
                else:
                    v = sum(zs[a][r, k] * zs[others[0]][perms[others[0]][c], k] * zs[others[1]][perms[others[1]][c], k]
                            for k in range(d))
                row.append(scale * v)
            row = torch.stack(row)
            total += (torch.logsumexp(row, 0) - row[r]) / n
    assert got.item() == pytest.approx(total.item() / 3, rel=1e-5)


def test_chunked_tc_matches_dense_autograd():
    """The chunked custom backward equals autograd through the dense [I, I] formulation."""
    from gtc_ray.model.total_correlation import diag_replaced_ce
    g = torch.Generator().manual_seed(3)
    q = torch.randn(37, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(37, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(37, generator=g, dtype=torch.float64, requires_grad=True)
    got = diag_replaced_ce(q, k, pos, 8)  # several chunks, a ragged last one
    got.backward()
    grads = [t.grad.clone() for t in (q, k, pos)]
    for t in (q, k, pos):
        t.grad = None
    logits = q @ k.T
    logits = logits - torch.diag(logits.diagonal()) + torch.diag(pos)
    ref = F.cross_entropy(logits, torch.arange(37))
    ref.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, t in zip(grads, (q, k, pos)):
        torch.testing.assert_close(a, t.grad)
    assert torch.autograd.gradcheck(lambda a, b, c: diag_replaced_ce(a, b, c, 8), (q, k, pos))


def test_tc_row_shards_add_up_to_the_full_loss():
    """Spec §11: the CE is row-wise, so row blocks (one per worker) with the global offset and
    normaliser add up to the full loss, and their gradients add up to the full gradients."""
    from gtc_ray.model.total_correlation import diag_replaced_ce
    g = torch.Generator().manual_seed(5)
    n = 23
    q = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    full = diag_replaced_ce(q, k, pos, 4)
    full.backward()
    want = [t.grad.clone() for t in (q, k, pos)]
    for t in (q, k, pos):
        t.grad = None
    parts = [diag_replaced_ce(q[lo:hi], k, pos[lo:hi], 3, offset=lo, n_total=n) for lo, hi in ((0, 12), (12, n))]
    total = parts[0] + parts[1]
    total.backward()
    assert total.item() == pytest.approx(full.item(), rel=1e-12)
    for a, t in zip(want, (q, k, pos)):
        torch.testing.assert_close(t.grad, a)
    with torch.no_grad():  # no gradient wanted: the same value
        assert diag_replaced_ce(q, k, pos, 5).item() == pytest.approx(full.item(), rel=1e-12)


def test_tc_ce_when_the_positive_probability_underflows():
    """The fused kernel reads CE from softmax at the positive; where that underflows to 0 it must
    still give the exact (finite) cross-entropy and gradient."""
    from gtc_ray.model.total_correlation import diag_replaced_ce
    g = torch.Generator().manual_seed(2)
    q = (torch.randn(20, 4, generator=g, dtype=torch.float64) * 30).requires_grad_()
    k = torch.randn(20, 4, generator=g, dtype=torch.float64) * 30
    pos = torch.full((20,), -500.0, dtype=torch.float64)
    got = diag_replaced_ce(q, k, pos, 8)
    logits = (q @ k.T).detach()
    logits[range(20), range(20)] = pos
    assert torch.isfinite(got) and got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(20)).item(), rel=1e-9)


def test_tc_bfloat16_products_stay_close_to_float32():
    """model.matmul_precision=bfloat16: products in bf16, softmax in fp32; on unit-norm inputs of
    the TC's size class the loss and gradients stay within 1% of float32."""
    from gtc_ray.model.total_correlation import diag_replaced_ce
    q, k = _norm(300, 16, seed=1) * 14.3, _norm(300, 16, seed=2) * _norm(300, 16, seed=3)
    pos = (q * k).sum(-1) + 0.5
    res = {}
    for low in (None, torch.bfloat16):
        qq, kk, pp = (t.clone().requires_grad_() for t in (q, k, pos))
        loss = diag_replaced_ce(qq, kk, pp, 64, low=low)
        loss.backward()
        res[low] = (loss.item(), qq.grad, kk.grad, pp.grad)
    (l32, *g32), (l16, *g16) = res[None], res[torch.bfloat16]
    assert l16 == pytest.approx(l32, rel=1e-2)
    for a, b in zip(g16, g32):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


def test_tc_loss_n_squared_matches_bruteforce():
    n, d = 5, 3
    zs = [_norm(n, d, seed=s) for s in range(3)]
    scale = torch.tensor(1.7)
    got = tc_loss_n_squared(zs, scale)
    total = 0.0
    for a in range(3):
        b, c = [j for j in range(3) if j != a]
        for r in range(n):
            logits = torch.stack([scale * (zs[a][r] * zs[b][cc] * zs[c][(cc - k) % n]).sum()
                                  for k in range(n) for cc in range(n)])
            total += (torch.logsumexp(logits, 0) - logits[r]) / n  # label r: block 0 (no shift), column r
    assert got.item() == pytest.approx(total.item() / 3, rel=1e-5)


def test_pairwise_infonce_matches_formula():
    zs = [_norm(4, 3, seed=s) for s in range(2)]
    scale = torch.tensor(3.0)
    logits = scale * zs[0] @ zs[1].T
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert pairwise_infonce(zs, scale).item() == pytest.approx(ref.item(), rel=1e-6)


# ------------------------------------------------------------------ gate, propagation, user graph
def test_gate_as_written_formula():
    e, v, t = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    out = gate_as_written(e, [v, t])
    for r in range(3):
        a = torch.tensor([e[r] @ v[r], e[r] @ t[r], v[r] @ t[r]])
        w = torch.softmax(a, 0)
        torch.testing.assert_close(out[r], e[r] + w[0] * e[r] + w[1] * v[r] + w[2] * t[r])
    assert gate_per_modality(e, [v]).shape == e.shape


def test_propagation_matches_dense():
    users, items = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 0, 2, 3])
    a = bipartite_adjacency(users, items, 3, 4)
    A = np.zeros((7, 7))
    for u, i in zip(users, items):
        A[u, 3 + i] = A[3 + i, u] = 1
    dinv = 1 / np.sqrt(A.sum(1))
    Ahat = dinv[:, None] * A * dinv[None, :]
    np.testing.assert_allclose(a.toarray(), Ahat, rtol=1e-6)
    x = torch.randn(7, 5)
    ref = x.numpy() + Ahat @ x.numpy() + Ahat @ Ahat @ x.numpy()
    np.testing.assert_allclose(propagate(SparseOperator(a), x, 2).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_spmm_gradient_matches_dense_for_unsymmetric_matrix():
    m = sp.random(6, 5, density=0.4, random_state=3, format="csr", dtype=np.float32)
    x = torch.randn(5, 3, requires_grad=True)
    g = torch.randn(6, 3)
    (spmm(SparseOperator(m), x) * g).sum().backward()
    xd = x.detach().clone().requires_grad_(True)
    (torch.from_numpy(m.toarray()) @ xd * g).sum().backward()
    torch.testing.assert_close(x.grad, xd.grad)


def test_user_graph_sampling_semantics():
    # user 0: 3 neighbours (padded to k=5), user 1: 6 neighbours (first 5 kept), user 2: none
    uu = sp.csr_matrix((np.array([3, 2, 1, 9, 8, 7, 6, 5, 4], np.float32),
                        np.array([1, 2, 3, 0, 2, 3, 4, 5, 6]), np.array([0, 3, 9, 9, 9, 9, 9, 9])), shape=(7, 7))
    g = sample_user_graph(uu, 5, np.random.default_rng(0)).toarray()
    np.testing.assert_allclose(g.sum(1)[:2], 1.0, rtol=1e-6)
    assert g[2].sum() == 0
    w1 = np.exp(np.array([9, 8, 7, 6, 5.0]) - 9); w1 /= w1.sum()
    np.testing.assert_allclose(g[1, [0, 2, 3, 4, 5]], w1, rtol=1e-5)
    assert g[1, 6] == 0
    assert set(np.flatnonzero(g[0])) == {1, 2, 3}


# ------------------------------------------------------------------ the whole model
def _tiny_model(M=2, **cfg):
    rng = np.random.default_rng(0)
    U, I = 9, 7
    users = np.repeat(np.arange(U), 3)
    items = (users * 3 + np.tile(np.arange(3), U)) % I
    dims = {"image": 6, "text": 5, "audio": 3}
    feats = {m: rng.normal(size=(I, dims[m])).astype(np.float32) for m in list(dims)[:M]}
    compat = cfg.pop("compat", None)
    mc = ModelConfig(embedding_size=8, noise_steps=20, user_graph_k=3, **cfg)
    model = GTC(U, I, {m: f.shape[1] for m, f in feats.items()}, mc, compat)
    ii = sp.csr_matrix(np.eye(I, dtype=np.float32) * 0.5)
    uu = sp.csr_matrix(np.ones((U, U), np.float32) / U)
    model.attach(feats, bipartite_adjacency(users, items, U, I), ii, uu)
    batch = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 6, 2]), torch.tensor([1, 1, 2, 5]))
    return model, batch


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_gradients_reach_every_parameter_group(precision):
    model, (u, p, n) = _tiny_model(matmul_precision=precision)
    out = model(u, p, n, seed=1)
    out["loss"].backward()
    for name, prm in model.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    assert set(out) == {"loss", "bpr", "reg", "tc", "gen"}
    assert out["tc"] > 0 and out["gen"] > 0


def test_bfloat16_model_step_stays_close_to_float32():
    """Same weights and seed: bf16 products (projections on bf16-stored features, denoisers, TC)
    give the float32 loss and gradients within bf16's rounding (8 bits of mantissa)."""
    res = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model, (u, p, n) = _tiny_model(matmul_precision=precision)
        out = model(u, p, n, seed=1)
        out["loss"].backward()
        res[precision] = (out, {k: v.grad.clone() for k, v in model.named_parameters()})
    (o32, g32), (o16, g16) = res["float32"], res["bfloat16"]
    assert model.features["image"].dtype == torch.bfloat16
    for k in ("loss", "tc", "gen", "bpr"):
        assert o16[k].item() == pytest.approx(o32[k].item(), rel=0.03), k
    for k, g in g32.items():
        err = ((g16[k] - g).norm() / g.norm()).item()
        # the denoisers' inner layers get gradients ~1e-6 of the others through a 10-layer bf16
        # chain (measured up to 16% off); everything else within 1%
        assert err < (0.25 if k.startswith("denoisers.") else 0.01), (k, err)


def test_loss_components_add_up_and_inputs_are_not_mutated():
    model, (u, p, n) = _tiny_model()
    p0 = p.clone()
    out = model(u, p, n, seed=3)
    assert torch.equal(p, p0)  # B9
    c = model.cfg
    total = out["bpr"] + out["reg"] + c.tc_weight * out["tc"] + c.diff_weight * out["gen"]
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    out2 = model(u, p, n, seed=3)
    assert out2["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)  # seeded


def _twin_models(compat_a, compat_b, **cfg):
    """Two tiny models with the same weights, differing only in compat."""
    a, batch = _tiny_model(compat=compat_a, **cfg)
    b, _ = _tiny_model(compat=compat_b, **cfg)
    b.load_state_dict(a.state_dict())
    return a, b, batch


def test_bpr_is_stable_and_equal_to_log2_form():
    # through GTC.calculate_loss: compat.unstable_bpr (B6, -log2 sigmoid) vs the default stable form
    unstable, stable, (u, p, n) = _twin_models(CompatConfig(unstable_bpr=True), CompatConfig())
    # moderate scores: the two forms agree
    bu, bs = unstable(u, p, n, seed=2)["bpr"], stable(u, p, n, seed=2)["bpr"]
    assert torch.isfinite(bs) and bu.item() == pytest.approx(bs.item(), rel=1e-6, abs=1e-6)
    # huge negative margins: put each triple's better-scored item as the negative, then scale the
    # user weights (which multiply every user embedding, so diff scales linearly) until diff << -104
    gen = torch.Generator().manual_seed(2)
    out = stable.embed(gen, train=True, user_rows=u)
    diff = ((out["users"] * out["items"][p]).sum(-1) - (out["users"] * out["items"][n]).sum(-1)).detach()
    p2, n2 = torch.where(diff > 0, n, p), torch.where(diff > 0, p, n)
    scale = 1000.0 / diff.abs().min().item()
    with torch.no_grad():
        for m in (unstable, stable):
            m.weight_u.mul_(scale)
    bu, bs = unstable(u, p2, n2, seed=2)["bpr"], stable(u, p2, n2, seed=2)["bpr"]
    assert torch.isinf(bu)  # what B6 does: sigmoid underflows to 0
    want = (diff.abs() * scale).mean().item() / math.log(2)  # -log2 sigmoid(x) -> -x / ln 2
    assert torch.isfinite(bs) and bs.item() == pytest.approx(want, rel=1e-3)


def test_user_rows_path_equals_the_full_user_path():
    model, (u, p, n) = _tiny_model()
    # a non-uniform user-user graph, so taking the wrong rows of G would show
    model.set_user_graph(sp.random(9, 9, density=0.4, random_state=1, format="csr", dtype=np.float32))
    rows = torch.tensor([3, 0, 3, 8, 1, 3])  # repeats, unsorted
    full = model.embed(torch.Generator().manual_seed(4), train=True)
    part = model.embed(torch.Generator().manual_seed(4), train=True, user_rows=rows)
    torch.testing.assert_close(part["users"], full["users"][rows], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(part["items"], full["items"], rtol=0, atol=0)
    # calculate_loss: compat.stale_eval takes the full path, the default the per-batch one
    stale, fresh, _ = _twin_models(CompatConfig(stale_eval=True), CompatConfig())
    g = sp.random(9, 9, density=0.4, random_state=2, format="csr", dtype=np.float32)
    stale.set_user_graph(g); fresh.set_user_graph(g)
    a, b = stale(u, p, n, seed=6), fresh(u, p, n, seed=6)
    for k in ("bpr", "reg", "loss"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6, abs=1e-6), k


def _item_id_block(model):
    """What the first d item columns are when the refined embedding E~ is the raw E_id."""
    U = model.num_users
    x = F.normalize(torch.cat([model.preferences[0], model.item_embedding], 0), dim=-1)
    y = propagate(model.adj, x, model.cfg.n_layers)[U:]
    return y + spmm(model.item_graph, y) if model.item_graph is not None else y


def test_ablations_and_n_modalities_run():
    for kw in ({"use_diffusion": False}, {"use_tc": False}, {"tc_mode": "pairwise"}, {"gate": "off"},
               {"use_content": False}, {"tc_mode": "n_squared"}):
        model, (u, p, n) = _tiny_model(**kw)
        out = model(u, p, n, seed=0)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]), kw
    # each ablation really removes its part (the full model has tc > 0 and gen > 0, see above)
    model, (u, p, n) = _tiny_model(use_tc=False)
    assert model(u, p, n, seed=0)["tc"].item() == 0.0 and not hasattr(model, "logit_scale")
    model, (u, p, n) = _tiny_model(use_diffusion=False)
    assert model(u, p, n, seed=0)["gen"].item() == 0.0
    assert not any(k.startswith("denoisers.") for k, _ in model.named_parameters())
    # gate off: E~ = E_id, so the ID block ignores the projections; with the gate on it does not
    for gate, is_raw in (("off", True), ("as_written", False), ("per_modality", False)):
        model, _ = _tiny_model(gate=gate)
        assert (model.gate_mode == "off") == is_raw, gate
        d = model.cfg.embedding_size
        with torch.no_grad():
            before = model.embed(torch.Generator().manual_seed(0), train=False)["items"]
            for proj in model.projections.values():
                proj.weight.mul_(5.0); proj.bias.add_(1.0)
            after = model.embed(torch.Generator().manual_seed(0), train=False)["items"]
            assert not torch.equal(before[:, d:], after[:, d:])  # the content blocks did change
            assert torch.equal(before[:, :d], after[:, :d]) == is_raw, gate
            if is_raw:
                torch.testing.assert_close(after[:, :d], _item_id_block(model))
    # ID only: no projections, no denoisers, one representation
    id_only, (u, p, n) = _tiny_model(use_content=False)
    assert not hasattr(id_only, "denoisers") and id_only.modalities == [] and len(id_only.projections) == 0
    out = id_only.embed(torch.Generator().manual_seed(0), train=True)
    assert len(out["reps_users"]) == 1 and id_only.weight_u.shape[1] == 1 and len(id_only.preferences) == 1
    assert out["items"].shape == (7, id_only.cfg.embedding_size)
    assert out["tc"].item() == 0.0 and out["gen"].item() == 0.0
    model, (u, p, n) = _tiny_model(M=3)
    assert model.gate_mode == "per_modality"
    assert model(u, p, n, seed=0)["loss"].isfinite()
    model, (u, p, n) = _tiny_model(M=1)
    assert model(u, p, n, seed=0)["loss"].isfinite()


def test_eval_is_deterministic_and_compat_modes():
    model, (u, p, n) = _tiny_model()
    a = model.full_sort_predict(torch.arange(9), seed=5)
    b = model.full_sort_predict(torch.arange(9), seed=5)
    assert torch.equal(a, b) and a.shape == (9, 7)
    frozen, (u, p, n) = _tiny_model(compat=CompatConfig(freeze_denoiser=True, stale_eval=True))
    assert all(not q.requires_grad for q in frozen.denoisers.parameters())
    frozen(u, p, n, seed=0)
    zu, yi = frozen.eval_embeddings()
    assert torch.equal(zu, frozen._eval_cache[0])  # stale embedding of the last batch (B5)
