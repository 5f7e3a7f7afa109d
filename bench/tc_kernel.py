"""The TC loss kernel alone: seconds per anchor (forward + all gradients) by chunk size and precision.

    python bench/tc_kernel.py [--items 7050] [--dim 64] [--rounds 5] [--threads 1]

Times `diag_replaced_ce` (one anchor of mode "n", all I rows against I shuffled keys, gradient
included) at several row-chunk sizes, in float32 and in bfloat16 products, against a baseline: the
same one-pass loop reading Kᵀ as a transposed view (the layout before bench/tc_kernel.py existed).
Runs are interleaved round by round and the medians compared, since this VM's timings drift.
Default sizes are Baby's (7,050 items, d = 64); each anchor is 3 x 2 x I² x d FLOPs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtc_ray.model.total_correlation import diag_replaced_ce  # noqa: E402


def transposed_view_baseline(q, k, pos, chunk):
    """Loss and gradients as the kernel computes them, but with Q Kᵀ read from k.T (a view)."""
    n = q.shape[0]
    dq, dk, loss = torch.empty_like(q), torch.zeros_like(k), q.new_zeros(())
    buf = q.new_empty(chunk, k.shape[0])
    idx = torch.arange(chunk)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        rows = idx[: e - s]
        logits = torch.mm(q[s:e], k.T, out=buf[: e - s])
        logits[rows, rows + s] = pos[s:e]
        p = torch.ops.aten._softmax.out(logits, 1, False, out=logits)
        loss -= p[rows, rows + s].log().sum()
        p[rows, rows + s] = 0.0
        torch.mm(p, k, out=dq[s:e])
        dk.addmm_(p.T, q[s:e])
    return loss / n, dq, dk


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=7050)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunks", default="64,128,256,512")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(a.items, a.dim, generator=g), dim=1) * 10  # scale kappa = 10
    k = F.normalize(torch.randn(a.items, a.dim, generator=g), dim=1)
    pos = (q * k).sum(1)

    def kernel(chunk, low):
        def run():
            qq, kk, pp = (t.detach().requires_grad_() for t in (q, k, pos))
            diag_replaced_ce(qq, kk, pp, chunk=chunk, low=low).backward()
        return run

    runs = {"baseline (Kᵀ view), fp32, chunk 256": lambda: transposed_view_baseline(q, k, pos, 256)}
    for c in [int(x) for x in a.chunks.split(",")]:
        runs[f"kernel, fp32, chunk {c}"] = kernel(c, None)
    for c in [int(x) for x in a.chunks.split(",")]:
        runs[f"kernel, bf16, chunk {c}"] = kernel(c, torch.bfloat16)
    for f in runs.values():  # warm-up
        f()
    times = {name: [] for name in runs}
    for r in range(a.rounds):
        for name, f in runs.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    flops = 3 * 2 * a.items ** 2 * a.dim
    base = statistics.median(times[next(iter(runs))])
    print(f"\nI = {a.items}, d = {a.dim}, {a.threads} thread(s), median of {a.rounds} interleaved rounds")
    print(f"{'run':<40} {'s/anchor':>9} {'GFLOP/s':>8} {'vs baseline':>12}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:<40} {m:9.3f} {flops / m / 1e9:8.1f} {base / m:11.2f}x")


if __name__ == "__main__":
    main()
