"""Numbers you can trust (issue 13): the spec's evaluation protocol, results that resume and restart do
not change, modality roles by name, deterministic shards, checkpoint retention, the modality-balance
score, and the loop's schedule switches. No Ray here (see test_train.py for the Ray runs)."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import tiny_config
from gtc_ray.cli import main
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import train_matrix
from gtc_ray.train.checkpoint import read_meta
from gtc_ray.train.loop import eval_targets, train_loop
from gtc_ray.train.metrics import modality_balance, representation_share_sums
from gtc_ray.train.evaluate import evaluate_checkpoint
from gtc_ray.train.ingest import shard_of
from gtc_ray.train.run import run_training
from gtc_ray.train.runtime import InProcessRuntime

QUIET = dict(log=lambda *a, **k: None)


# ------------------------------------------------------------------ 1. evaluation protocol

def test_default_protocol_is_the_specs(tiny):
    """Spec §8: test ranks all items with only the training items masked; the strict option is opt-in."""
    cfg = tiny_config()
    assert cfg.eval.mask_valid_in_test is False
    ds = load_dataset(tiny)
    seen, targets = eval_targets(ds, cfg.eval.mask_valid_in_test)
    assert (targets["test"][2] != seen).nnz == 0 and (targets["valid"][2] != seen).nnz == 0
    vu, vi = ds.split_pairs("valid")
    _, strict = eval_targets(ds, True)
    assert (strict["test"][2] != (seen + train_matrix(vu, vi, ds.num_users, ds.num_items))).nnz == 0


def test_metrics_carry_their_protocol(tiny, tmp_path):
    s = run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="spec", **QUIET)
    assert s["protocol"]["name"] == "spec" and "training items" in s["protocol"]["test_mask"]
    assert s["protocol"]["seed"] == 999
    strict = run_training(tiny, tiny_config(eval={"mask_valid_in_test": True}), runner="inprocess",
                          storage=tmp_path, name="strict", **QUIET)
    assert strict["protocol"]["name"] == "strict"
    # same training, same validation; masking the validation items can only help test ranking here
    assert strict["valid"] == s["valid"] and strict["test"] != s["test"]
    assert evaluate_checkpoint(s["checkpoint"])["protocol"]["name"] == "spec"


def test_compat_refuses_the_strict_protocol(tiny, tmp_path, capsys):
    rc = main(["train", str(tiny), "--compat", "--set", "eval.mask_valid_in_test=true", "--storage", str(tmp_path)])
    assert rc == 2 and "compat mode always uses the spec's protocol" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


# ------------------------------------------------------------------ 2. resume and compat change nothing

def test_resuming_a_finished_run_gives_the_same_result(tiny, tmp_path):
    """The final report comes from the selected state, user-user graph included, however often resumed."""
    cfg = tiny_config(train={"epochs": 4})
    a = run_training(tiny, cfg, runner="inprocess", storage=tmp_path, name="r", **QUIET)
    b = run_training(tiny, tiny_config(train={"epochs": 4}), runner="inprocess", storage=tmp_path, name="r",
                     resume=True, **QUIET)
    assert b["valid"] == a["valid"] and b["test"] == a["test"]
    assert a["valid"]["recall@20"] == max(h["valid_recall@20"] for h in a["history"])
    assert evaluate_checkpoint(b["checkpoint"])["test"] == pytest.approx(a["test"], abs=1e-9)


def test_compat_final_report_is_what_selection_saw(tiny, tmp_path):
    """--compat selects on the last training batch's (stale) embeddings; the report scores exactly them,
    also after resuming the finished run and when the checkpoint is evaluated again."""
    base = {"freeze_denoiser": True, "stale_eval": True, "unstable_bpr": True}
    cfg = tiny_config(compat=base, train={"epochs": 5})
    s = run_training(tiny, cfg, runner="inprocess", storage=tmp_path, name="c", **QUIET)
    best = max(h["valid_recall@20"] for h in s["history"])
    at_best = next(h for h in s["history"] if h["epoch"] == s["best_epoch"])
    assert s["valid"]["recall@20"] == best
    assert s["valid"]["ndcg@20"] == at_best["valid_ndcg@20"]
    again = run_training(tiny, tiny_config(compat=base, train={"epochs": 5}), runner="inprocess",
                         storage=tmp_path, name="c", resume=True, **QUIET)
    assert again["valid"] == s["valid"] and again["test"] == s["test"]
    assert evaluate_checkpoint(s["checkpoint"])["valid"] == pytest.approx(s["valid"], abs=1e-9)


# ------------------------------------------------------------------ 3. modality roles by name

def _export_tables(ds, root):
    """The dataset as raw tables, as a user would bring them (interactions + one table per modality)."""
    u, i = ds.split_pairs("train")
    for split in ("valid", "test"):
        su, si = ds.split_pairs(split)
        u, i = np.concatenate([u, su]), np.concatenate([i, si])
    pq.write_table(pa.table({"user_id": [f"u{x}" for x in u], "item_id": [f"i{x}" for x in i]}),
                   root / "inter.parquet")
    paths = {}
    for m, f in ds.features.items():
        paths[m] = root / f"{m}.parquet"
        pq.write_table(pa.table({"item_id": [f"i{x}" for x in range(ds.num_items)],
                                 "feature": pa.array(list(f.astype(np.float32)))}), paths[m])
    return paths


def test_feature_order_on_the_command_line_changes_nothing(tiny, tmp_path):
    """`--features text=... image=...` and `--features image=... text=...` train the same model."""
    paths = _export_tables(load_dataset(tiny), tmp_path)
    results = []
    for order in (("image", "text"), ("text", "image")):
        out = tmp_path / "-".join(order)
        argv = ["data", "import", str(tmp_path / "inter.parquet"), str(out), "--kcore", "1"]
        for m in order:
            argv += ["--features", f"{m}={paths[m]}"]
        assert main(argv) == 0
        assert list(load_dataset(out).features) == list(order)  # the manifest keeps the user's order
        results.append(run_training(out, tiny_config(), runner="inprocess", storage=tmp_path / "runs",
                                    name="-".join(order), **QUIET))
    assert results[0]["valid"] == results[1]["valid"] and results[0]["test"] == results[1]["test"]
    assert [h["train_loss"] for h in results[0]["history"]] == [h["train_loss"] for h in results[1]["history"]]


def test_as_written_gate_takes_text_by_name():
    from gtc_ray.model.gtc import gate_roles
    assert gate_roles(["text", "image"]) == ("image", "text") == gate_roles(["image", "text"])
    assert gate_roles(["visual", "text"]) == ("visual", "text")
    assert gate_roles(["b", "a"]) == ("a", "b")


# ------------------------------------------------------------------ 4. deterministic shards

def test_shards_cover_every_row_once_and_do_not_depend_on_order():
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, 5000, 20011), rng.integers(0, 3000, 20011)
    for world in (1, 2, 3, 4):
        s = shard_of(u, i, world)
        assert s.min() >= 0 and s.max() < world
        counts = np.bincount(s, minlength=world)
        assert counts.sum() == len(u)  # nothing dropped
        assert np.abs(counts - len(u) / world).max() < 5 * math.sqrt(len(u) / world)  # balanced
        perm = rng.permutation(len(u))
        assert (shard_of(u[perm], i[perm], world) == s[perm]).all()  # a row's worker is its own property
    assert (shard_of(u, i, 1) == 0).all()


# ------------------------------------------------------------------ 8. disk

def test_runs_keep_two_checkpoints_and_no_temporary_directories(tiny, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    s = run_training(tiny, tiny_config(train={"epochs": 10, "patience": 100}), runner="inprocess",
                     storage=tmp_path, name="r", **QUIET)
    kept = sorted(p.name for p in (tmp_path / "r").glob("checkpoint_*"))
    assert len(kept) == 2 and s["checkpoint"].endswith(kept[-1])
    assert read_meta(s["checkpoint"])["final"]
    assert list(tmp.iterdir()) == []
    one = run_training(tiny, tiny_config(train={"epochs": 3, "keep_checkpoints": 1}), runner="inprocess",
                       storage=tmp_path, name="one", **QUIET)
    assert [p.name for p in (tmp_path / "one").glob("checkpoint_*")] == [one["checkpoint"].rsplit("/", 1)[1]]


# ------------------------------------------------------------------ 10. modality balance

def test_modality_balance_hand_checked():
    assert modality_balance([1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert modality_balance([2.0, 0.0]) == pytest.approx(0.0)
    # shares 3/4, 1/4: -(.75 ln .75 + .25 ln .25) / ln 2
    assert modality_balance([3.0, 1.0]) == pytest.approx(0.811278, abs=1e-6)
    assert math.isnan(modality_balance([5.0]))  # ID only: nothing to balance
    # two representations of width 1: user (1, 2), items (1, 1) and (3, -1): |1*1| + |1*3| = 4 for the
    # first, |2*1| + |2*-1| = 4 for the second: equal shares
    zu = torch.tensor([[1.0, 2.0]])
    yi = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    sums = representation_share_sums(zu, yi, np.array([0]), 2)
    assert sums.tolist() == [4.0, 4.0] and modality_balance(sums) == pytest.approx(1.0)
    zu = torch.tensor([[1.0, 0.5], [2.0, 0.5]])
    sums = representation_share_sums(zu, yi, np.array([0, 1]), 2, chunk=1)  # chunks add up
    assert sums.tolist() == [12.0, 2.0]  # 1+3+2+6; four times 0.5


def test_modality_balance_is_logged_every_epoch(tiny, tmp_path):
    s = run_training(tiny, tiny_config(), runner="inprocess", storage=tmp_path, name="b", **QUIET)
    assert all(0 <= h["modality_balance"] <= 1 for h in s["history"])
    assert 0 <= s["modality_balance"] <= 1
    idonly = run_training(tiny, tiny_config(model={"use_content": False}), runner="inprocess",
                          storage=tmp_path, name="id", **QUIET)
    assert "modality_balance" not in idonly and "modality_balance" not in idonly["history"][0]


# ------------------------------------------------------------------ 11. schedule switches of the loop

class RecordingRuntime(InProcessRuntime):
    """The in-process runtime that also records which epochs came with a checkpoint and the log."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.with_checkpoint, self.lines = [], []
        self.log = self.lines.append

    def report(self, metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            self.with_checkpoint.append(metrics.get("epoch"))
        super().report(metrics, checkpoint_dir)


def _loop(tiny, tmp_path, rt_cls=RecordingRuntime, **sections):
    cfg = tiny_config(**sections)
    rt = rt_cls(str(tiny), tmp_path / "run")
    train_loop({"cfg": cfg.to_dict(), "data_dir": str(tiny)}, rt)
    return rt


def test_early_stopping_epoch_under_patience(tiny, tmp_path):
    rt = _loop(tiny, tmp_path, train={"epochs": 200, "patience": 3, "lr": 0.05})
    hist = [r for r in rt.reports if not r.get("final")]
    vals = [r["valid_recall@20"] for r in hist]
    best = int(np.argmax(vals))  # first maximum: improvements must be strict
    assert len(hist) < 200, "never stopped"
    assert hist[-1]["epoch"] == best + 3 + 1  # stopped after patience + 1 evaluations without improvement
    assert all(v <= vals[best] for v in vals[best + 1:])
    assert rt.reports[-1]["final"] and rt.reports[-1]["best_epoch"] == best


def test_eval_every_and_checkpoint_every(tiny, tmp_path):
    rt = _loop(tiny, tmp_path, train={"epochs": 7, "eval_every": 2, "checkpoint_every": 3, "patience": 100})
    hist = [r for r in rt.reports if not r.get("final")]
    assert [r["epoch"] for r in hist if "valid_recall@20" in r] == [1, 3, 5, 6]  # and always the last epoch
    assert rt.with_checkpoint == [0, 3, 6, 6]  # every 3rd epoch, the last one, then the final report


class TwoRankRuntime(RecordingRuntime):
    """Rank 0 of 2 with half the rows: enough to see how the loop sizes its per-worker batches."""

    world_size = 2

    def shard(self):
        u, i = super().shard()
        keep = shard_of(u, i, 2) == 0
        return u[keep], i[keep]


@pytest.mark.parametrize("scaling, rows", [("split", 128), ("per_worker", 256)])
def test_batch_scaling(tiny, tmp_path, scaling, rows):
    rt = _loop(tiny, tmp_path, TwoRankRuntime, train={"epochs": 1, "batch_scaling": scaling})
    n = int((shard_of(*load_dataset(tiny).split_pairs("train"), 2) == 0).sum())
    line = next(x for x in rt.lines if "rows/worker/step" in x)
    assert f"{rows} rows/worker/step, {math.ceil(n / rows)} steps/epoch" in line, line


def test_automatic_cpus_per_worker_always_fit_their_own_check():
    from gtc_ray.train.cluster import check_local_resources, resolve_cpus_per_worker
    for cpus, workers, extra in [(2, 2, 0.0), (2, 2, 0.1), (3, 3, 0.0), (4, 3, 0.1), (5, 6, 0.0), (8, 7, 0.3)]:
        cfg = tiny_config(ray={"num_cpus": cpus})
        cpw = resolve_cpus_per_worker(cfg, workers, extra)
        assert 0 < cpw <= 1 and workers * cpw + extra <= cpus - 1
        check_local_resources(cfg, workers, extra)  # no error for the value it chose itself
    assert resolve_cpus_per_worker(tiny_config(ray={"num_cpus": 2}), 2) == 0.5


def test_pruning_leaves_foreign_directories_alone(tmp_path):
    from gtc_ray.train.runtime import prune_checkpoints
    names = ["checkpoint_q7z1p", "checkpoint_a8x_k2"]  # an older version's local-mode names (random)
    names += [f"checkpoint_{t:020d}_ab{t}" for t in (5, 7, 9)]
    for n in names:
        (tmp_path / n).mkdir()
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[:2] + names[3:])


def test_checkpoint_of_an_older_version_with_other_modality_order_is_refused(tiny, tmp_path):
    """Before meta['modalities'], per-representation weights followed the manifest's order."""
    from gtc_ray.errors import GtcInputError
    from gtc_ray.train.checkpoint import check_modality_order
    ds = load_dataset(tiny)
    check_modality_order({"config": {}}, ds, "ck")  # image, text: name order already
    ds.features = dict(reversed(list(ds.features.items())))
    with pytest.raises(GtcInputError, match="retrain"):
        check_modality_order({"config": {}}, ds, "ck")
    check_modality_order({"config": {}, "modalities": ["image", "text"]}, ds, "ck")
