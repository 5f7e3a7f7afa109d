"""The CUDA code paths against the CPU ones. Skipped (and reported as skipped) without a CUDA GPU:
CI has none; run them on a GPU machine with `pytest tests/test_cuda.py` (bench/gpu_check.sh does)."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from conftest import tiny_config
from gtc_ray.model.propagation import SparseOperator, propagate
from gtc_ray.model.total_correlation import default_chunk, diag_replaced_ce
from gtc_ray.train.metrics import evaluate_sums
from test_model import _tiny_model

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.timeout(300)]
CUDA = torch.device("cuda")


def _ce_and_grads(q, k, pos, **kw):
    q, k, pos = (t.detach().clone().requires_grad_(True) for t in (q, k, pos))
    loss = diag_replaced_ce(q, k, pos, **kw)
    loss.backward()
    return [t.detach().cpu() for t in (loss, q.grad, k.grad, pos.grad)]


def test_tc_kernel_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    n, d = 700, 32
    q, k, pos = 3 * torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    assert default_chunk(n, CUDA) >= n  # one chunk on the GPU, several on the CPU
    ref = _ce_and_grads(q, k, pos, chunk=256)
    got = _ce_and_grads(q.to(CUDA), k.to(CUDA), pos.to(CUDA))
    for r, x in zip(ref, got):
        torch.testing.assert_close(x, r, rtol=1e-4, atol=1e-6)
    low = _ce_and_grads(q.to(CUDA), k.to(CUDA), pos.to(CUDA), low=torch.bfloat16)
    assert low[0].item() == pytest.approx(ref[0].item(), rel=1e-2)
    assert torch.linalg.norm(low[1] - ref[1]) / torch.linalg.norm(ref[1]) < 2e-2


def test_propagation_and_metrics_on_cuda_match_cpu():
    rng = np.random.default_rng(0)
    a = sp.random(40, 40, density=0.2, random_state=1, dtype=np.float32, format="csr")
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for dev in ("cpu", CUDA):
        xx = x.detach().clone().to(dev).requires_grad_(True)  # a leaf on each device
        y = propagate(SparseOperator(a, dev), xx, 2)
        (y ** 2).sum().backward()
        outs.append((y.detach().cpu(), xx.grad.cpu()))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)

    U, I = 30, 50
    zu, yi = torch.randn(U, 8), torch.randn(I, 8)
    dense = rng.random((U, I)) < 0.1
    dense[np.arange(U), rng.integers(0, I, U)] = True  # every user has a positive
    truth = sp.csr_matrix(dense.astype(np.float32))
    mask = sp.csr_matrix(((rng.random((U, I)) < 0.2) & ~dense).astype(np.float32))
    users = np.arange(U)
    s_cpu, n_cpu = evaluate_sums(zu, yi, users, truth, mask, [5, 10, 20], chunk=7)
    s_gpu, n_gpu = evaluate_sums(zu.to(CUDA), yi.to(CUDA), users, truth, mask, [5, 10, 20], chunk=7)
    assert n_cpu == n_gpu
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-5, atol=1e-6)


def _cpu_and_cuda(**kw):
    """A tiny CPU model and a copy of it (same weights, same fixed data) on the GPU."""
    model, batch = _tiny_model(**kw)
    gpu, _ = _tiny_model(**kw)
    gpu.load_state_dict(model.state_dict())
    gpu.to(CUDA)
    feats = {k: v.float().numpy() for k, v in model.features.items()}  # bf16-stored under bf16
    gpu.attach(feats, model.adj.host, model.item_graph.host if model.item_graph else None,
               model.user_graph.host if model.user_graph else None, CUDA)
    return model, gpu, batch


def test_model_step_on_cuda_matches_cpu():
    # no random draws in this configuration, so CPU and GPU compute the same function
    model, gpu, (u, p, n) = _cpu_and_cuda(use_diffusion=False, tc_mode="pairwise")
    out_c = model(u, p, n)
    out_g = gpu(u.to(CUDA), p.to(CUDA), n.to(CUDA))
    out_c["loss"].backward()
    out_g["loss"].backward()
    for key in ("loss", "bpr", "reg", "tc"):
        assert out_g[key].item() == pytest.approx(out_c[key].item(), rel=1e-4), key
    grads_g = dict(gpu.named_parameters())
    for name, prm in model.named_parameters():
        torch.testing.assert_close(grads_g[name].grad.cpu(), prm.grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_default_model_trains_on_cuda(precision):
    _, gpu, (u, p, n) = _cpu_and_cuda(matmul_precision=precision)
    out = gpu(u.to(CUDA), p.to(CUDA), n.to(CUDA), seed=1)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    for name, prm in gpu.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    scores = gpu.full_sort_predict(torch.arange(9, device=CUDA))
    assert scores.is_cuda and scores.shape == (9, 7) and torch.isfinite(scores).all()


def test_inprocess_training_on_cuda(tiny, tmp_path):
    from gtc_ray.train.run import run_training
    s = run_training(tiny, tiny_config(), runner="inprocess", use_gpu=True, storage=tmp_path, name="gpu",
                     log=lambda *a, **k: None)
    assert all(r["gpu_peak_mb"] > 0 for r in s["history"])
    assert 0 <= s["test"]["recall@20"] <= 1 and np.isfinite(s["valid"]["ndcg@20"])
