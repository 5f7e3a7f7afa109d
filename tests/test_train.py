"""Training: in-process loop (no Ray), resume, reproducibility, Ray Train local mode and 2-worker DDP."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from gtc_ray.cli import main
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import train_matrix
from gtc_ray.errors import GtcInputError
from gtc_ray.train.checkpoint import load_file, read_meta
from gtc_ray.train.loop import make_optimizer, sample_negatives, train_loop
from gtc_ray.train.metrics import evaluate_sums, sums_to_metrics
from gtc_ray.train.run import InProcessRuntime, run_training

QUIET = dict(log=lambda *a, **k: None)


def test_negative_sampling_rejects_seen_items():
    import scipy.sparse as sp
    rng = np.random.default_rng(0)
    U, I = 50, 30
    seen = sp.csr_matrix((rng.random((U, I)) < 0.5).astype(np.float32))
    seen.sort_indices()
    users = np.repeat(np.arange(U), 40)
    neg = sample_negatives(users, seen, np.arange(I), rng)
    assert not seen[users, neg].any()
    counts = np.bincount(neg[users == 0], minlength=I)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(seen[0].toarray()[0] == 0))


def test_fused_adam_steps_like_plain_adam():
    """make_optimizer's fused Adam (one kernel) gives Adam's update: same parameters after a few
    steps as torch's plain Adam on the same gradients, weight decay included."""
    from gtc_ray.config import load_config
    cfg = load_config(overrides=["train.lr=0.01", "train.weight_decay=0.001"])
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(37, 5)), torch.nn.Parameter(torch.randn(11))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = make_optimizer(a, cfg)
    assert fused.defaults.get("fused")  # torch 2.13 has the fused CPU kernel: the fallback is not taken
    plain = torch.optim.Adam(b, lr=0.01, weight_decay=0.001, foreach=False)
    for _ in range(5):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_inprocess_training_and_checkpoint(tiny, tmp_path):
    s = run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="r", **QUIET)
    assert len(s["history"]) == 2 and set(s["valid"]) >= {"recall@20", "ndcg@20", "precision@5", "map@10"}
    meta = read_meta(s["checkpoint"])
    assert meta["final"] and meta["dataset"] == load_dataset(tiny).content_hash
    state = load_file(s["checkpoint"], "model.pt", meta)
    assert "item_embedding" in state and not any(k.startswith("features") for k in state)
    for rec in s["history"]:
        assert {"train_loss", "train_bpr", "train_tc", "train_gen", "valid_recall@20", "train_seconds"} <= set(rec)


def test_seed_reproducibility(tiny, tmp_path):
    a = run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="a", **QUIET)
    b = run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="b", **QUIET)
    c = run_training(tiny, tiny_config(train={"seed": 1}), runner="inprocess", storage=tmp_path, name="c", **QUIET)
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]
    assert strip(a["history"]) == strip(b["history"]) and a["test"] == b["test"]
    assert strip(a["history"]) != strip(c["history"])


class _Crash(RuntimeError):
    pass


class _CrashingRuntime(InProcessRuntime):
    """Dies right after the n-th report, as a killed worker would."""

    def __init__(self, *a, crash_after: int, **k):
        super().__init__(*a, **k)
        self.crash_after = crash_after

    def report(self, metrics, checkpoint_dir):
        super().report(metrics, checkpoint_dir)
        if len(self.reports) == self.crash_after:
            raise _Crash()


def test_resume_continues_exactly(tiny, tmp_path):
    cfg = tiny_config(train={"epochs": 4, "patience": 100})
    full = run_training(tiny, cfg, runner="inprocess", storage=tmp_path, name="full", **QUIET)
    rt = _CrashingRuntime(str(tiny), tmp_path / "part", crash_after=2)
    with pytest.raises(_Crash):
        train_loop({"cfg": cfg.to_dict(), "data_dir": str(tiny)}, rt)
    resumed = run_training(tiny, cfg, runner="inprocess", storage=tmp_path, name="part", resume=True, **QUIET)
    epochs = [r["epoch"] for r in resumed["history"]]
    assert epochs == [0, 1, 2, 3]  # no epoch counted twice
    strip = lambda h: [{k: v for k, v in r.items() if "seconds" not in k} for r in h]
    assert strip(resumed["history"]) == strip(full["history"])
    assert resumed["test"] == full["test"]


def test_run_name_clash_and_resume_errors(tiny, tmp_path):
    run_training(tiny, tiny_config(train={"epochs": 1}), runner="inprocess", storage=tmp_path, name="x", **QUIET)
    with pytest.raises(GtcInputError, match="already exists"):
        run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="x", **QUIET)
    with pytest.raises(GtcInputError, match="needs the --name"):
        run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, resume=True, **QUIET)


def test_evaluate_checkpoint_cli(tiny, tmp_path, capsys):
    s = run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="e", **QUIET)
    capsys.readouterr()
    assert main(["evaluate", s["checkpoint"], "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for split in ("valid", "test"):
        for k, v in s[split].items():
            assert res[split][k] == pytest.approx(v, abs=1e-6), (split, k)


def test_corrupted_checkpoint_is_reported(tiny, tmp_path, capsys):
    s = run_training(tiny, tiny_config(train={"epochs": 1}), runner="inprocess", storage=tmp_path, name="c", **QUIET)
    f = f"{s['checkpoint']}/model.pt"
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    assert main(["evaluate", s["checkpoint"]]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_ray_local_mode(ray_cluster, tiny, tmp_path):
    s = run_training(tiny, tiny_config(), workers=0, storage=tmp_path, name="local", **QUIET)
    ref = run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="ref", **QUIET)
    # same loop, same seeds: Ray Train's local mode reproduces the in-process run
    assert s["valid"] == pytest.approx(ref["valid"]) and s["test"] == pytest.approx(ref["test"])


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_ray_two_worker_ddp_via_cli(ray_cluster, tiny, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["train", str(tiny), "--workers", "2", "--set", "graph.knn_k=5", "--set", "model.noise_steps=50",
               "--set", "model.embedding_size=16", "--set", "train.batch_size=256", "--set", "train.lr=0.01",
               "--set", "eval.topk=[5, 10, 20]", "--epochs", "2", "--storage", str(tmp_path), "--name", "ddp",
               "--metrics-out", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert set(m) >= {"valid", "test", "checkpoint"} and 0 <= m["valid"]["recall@20"] <= 1
    meta = read_meta(m["checkpoint"])
    assert meta["final"] and [h["epoch"] for h in meta["history"]] == [0, 1]
    printed = capsys.readouterr().out
    assert "recall@20" in printed and "checkpoint" in printed


@pytest.mark.shared_data
@pytest.mark.timeout(300)
def test_ml100k_beats_most_popular(ml100k, tmp_path):
    cfg = tiny_config(graph={"knn_k": 10}, model={"noise_steps": 600, "embedding_size": 64, "user_graph_k": 40},
                      train={"epochs": 3, "batch_size": 2048, "lr": 1e-3}, eval={"topk": [10, 20, 50]})
    s = run_training(ml100k, cfg, runner="inprocess", storage=tmp_path, name="ml", **QUIET)
    ds = load_dataset(ml100k)
    u, i = ds.split_pairs("train")
    seen = train_matrix(u, i, ds.num_users, ds.num_items)
    vu, vi = ds.split_pairs("valid")
    pop = torch.from_numpy(np.bincount(i, minlength=ds.num_items).astype(np.float32))[:, None]
    sums, n = evaluate_sums(torch.ones(ds.num_users, 1), pop, np.unique(vu),
                            train_matrix(vu, vi, ds.num_users, ds.num_items), seen, [20])
    most_pop = sums_to_metrics(sums, n, [20])["recall@20"]
    assert s["valid"]["recall@20"] > 1.1 * most_pop, (s["valid"]["recall@20"], most_pop)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_worker_sigkill_resumes_from_checkpoint(ray_cluster, tmp_path):
    """A real SIGKILL of the training worker's process: Ray Train restarts it (FailureConfig) and the
    loop resumes from the latest checkpoint; the result equals an uninterrupted run."""
    import os
    import signal
    import threading
    import time
    from ray.util.state import list_actors
    from gtc_ray.data.synth import synth
    data = tmp_path / "small"
    synth(data, "small", seed=0)
    cfg = tiny_config(train={"epochs": 8, "patience": 100}, eval={"topk": [5, 10, 20]})
    ref = run_training(data, cfg, runner="inprocess", storage=tmp_path, name="ref", **QUIET)
    out, errors = {}, []

    def target():
        try:
            out["s"] = run_training(data, cfg, workers=1, storage=tmp_path, name="killed", failure_retries=2, **QUIET)
        except BaseException as e:  # surfaced below
            errors.append(e)

    th = threading.Thread(target=target)
    th.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and th.is_alive() and killed is None:
        if len(list((tmp_path / "killed").glob("checkpoint_*"))) >= 2:  # mid-run, after epoch >= 1
            workers = list_actors(address=ray_cluster.get_runtime_context().gcs_address,
                                  filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    th.join(timeout=400)
    assert not errors, errors
    assert killed is not None, "training finished before the worker could be killed"
    s = out["s"]
    assert [h["epoch"] for h in s["history"]] == list(range(8))  # no epoch counted twice
    assert s["valid"] == pytest.approx(ref["valid"], abs=1e-6) and s["test"] == pytest.approx(ref["test"], abs=1e-6)
