"""Item-row sharding across workers (gtc_ray/model/sharding.py) equals the single-process step.

Two (and three) gloo processes, no Ray: each computes its share of the full-item work and BPR on its
slice of the batch; their averaged gradients (what DDP applies) must equal the gradients of one
process computing the whole step with the same seed, and their reported L_gen / L_TC (mean over
workers) must equal the single-process values.
"""

import os
import socket

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gtc_ray.config import ModelConfig
from gtc_ray.model.gtc import GTC
from gtc_ray.model.propagation import bipartite_adjacency
from gtc_ray.model.sharding import ItemShard

pytestmark = pytest.mark.timeout(120)

BATCH = (torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 3, 6, 2, 1, 4]), torch.tensor([1, 1, 2, 5, 6, 0]))


def _model(rows=None, **cfg) -> GTC:
    """The test model; with rows=(lo, hi) it holds only those item rows of the features, as a
    worker of an item-sharded run does (train/ingest.py)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    U, I = 9, 7
    users = np.repeat(np.arange(U), 3)
    items = (users * 3 + np.tile(np.arange(3), U)) % I
    feats = {"image": rng.normal(size=(I, 6)).astype(np.float32), "text": rng.normal(size=(I, 5)).astype(np.float32)}
    m = GTC(U, I, {k: v.shape[1] for k, v in feats.items()}, ModelConfig(embedding_size=8, noise_steps=20,
                                                                          user_graph_k=3, **cfg))
    ii = sp.csr_matrix(np.eye(I, dtype=np.float32) * 0.5)
    uu = sp.csr_matrix(np.ones((U, U), np.float32) / U)
    if rows is not None:
        feats = {k: v[rows[0]:rows[1]] for k, v in feats.items()}
    return m.attach(feats, bipartite_adjacency(users, items, U, I), ii, uu, feature_rows=rows)


def _step(model: GTC, rows: slice):
    out = model(*(t[rows] for t in BATCH), seed=11)
    out["loss"].backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    return {k: float(out[k]) for k in ("bpr", "tc", "gen")}, grads


def _worker(rank: int, world: int, port: int, out_dir: str, cfg: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = ItemShard(rank, world, dist.new_group())
        model = _model(rows=shard.bounds(7) if cfg.pop("block_features", False) else None, **cfg)
        model.item_shard = shard
        held = {k: v.shape[0] for k, v in model.features.items()}
        per = len(BATCH[0]) // world
        losses, grads = _step(model, slice(rank * per, (rank + 1) * per))
        for g in grads.values():  # what DDP does: the mean of the workers' gradients
            dist.all_reduce(g)
            g /= world
        model.eval()
        zu, yi = model.eval_embeddings(5)  # sharded too: every worker filters its block, then gathers
        torch.save({"losses": losses, "grads": grads, "eval": (zu, yi), "held": held},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world,cfg", [(2, {}), (3, {}), (2, {"gate": "per_modality"}),
                                       (2, {"tc_mode": "pairwise"}), (2, {"block_features": True}),
                                       (3, {"block_features": True})])
def test_sharded_step_equals_single_process(world, cfg, tmp_path):
    """Also with each worker holding only its block of feature rows (block_features): the same
    gradients, and evaluation embeddings equal to the single process's."""
    plain = {k: v for k, v in cfg.items() if k != "block_features"}
    ref = _model(**plain)
    ref_losses, ref_grads = _step(ref, slice(None))
    ref.eval()
    ref_eval = ref.eval_embeddings(5)
    mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path), cfg), nprocs=world, join=True,
                       start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    if cfg.get("block_features"):
        assert [r["held"]["image"] for r in res] == [hi - lo for lo, hi in (ItemShard(q, world).bounds(7)
                                                                            for q in range(world))]
    for r in res:
        for a, b in zip(r["eval"], ref_eval):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in ("tc", "gen"):  # every worker reports W x its share: their mean is the full loss
        assert np.mean([r["losses"][k] for r in res]) == pytest.approx(ref_losses[k], rel=1e-5), k
    for r in res:
        for name, g in ref_grads.items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_shard_bounds_cover_every_row_once():
    for n in (1, 7, 10, 7050):
        for w in (1, 2, 3, 4):
            spans = [ItemShard(r, w).bounds(n) for r in range(w)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
