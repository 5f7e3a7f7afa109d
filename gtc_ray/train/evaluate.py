"""Checkpoint evaluation, in-process and without a Ray cluster: rebuild the trained model from a
checkpoint (`load_checkpoint_model`, also used by the registry) and score it on valid and test.

A checkpoint is given by its location: a local directory, or a URI in Ray Train/Tune storage
(`s3://bucket/runs/RUN/checkpoint_...`), which is copied to a temporary directory through Ray's
checkpoint API for the loading and deleted afterwards (checkpoint.local_checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import prepare
from gtc_ray.errors import GtcInputError
from gtc_ray.train.checkpoint import local_checkpoint, read_meta
from gtc_ray.train.run import format_table, protocol_line


def load_checkpoint_model(ckpt: str | Path, data_dir: str | Path | None = None):
    """Rebuild the trained model from a checkpoint (local directory or URI): (model, dataset,
    config, meta). Everything is read into memory; no file of the checkpoint is needed afterwards.

    A final checkpoint holds the best-validation weights as model.pt; an intermediate one (e.g. a
    trial stopped by ASHA) keeps them as best_model.pt. The user graph is the one sampled for the
    epoch those weights come from, so the embeddings equal the ones validation saw."""
    with local_checkpoint(ckpt) as ck_dir:
        return _load_model(ck_dir, ckpt, data_dir)


def _load_model(ck_dir: Path, ckpt, data_dir):
    """load_checkpoint_model on a local copy `ck_dir` of the checkpoint at `ckpt` (named in errors)."""
    from gtc_ray.config import config_from_dict
    from gtc_ray.model.propagation import sample_user_graph
    from gtc_ray.train.checkpoint import check_modality_order, load_file
    from gtc_ray.train.loop import build_model, derive_seed
    meta = read_meta(ck_dir)
    cfg = config_from_dict(meta["config"])
    ds = load_dataset(data_dir or meta["data_dir"])
    if ds.content_hash != meta["dataset"]:
        raise GtcInputError(f"checkpoint {ckpt}", f"was trained on dataset {meta['dataset']}, not {ds.content_hash} "
                            f"({ds.path})", "pass the dataset the checkpoint was trained on")
    g = prepare(ds, cfg.graph, log=lambda m: None)
    weights = "model.pt" if meta.get("final") or "best_model.pt" not in meta["hashes"] else "best_model.pt"
    epoch = meta["best_epoch"] if weights == "best_model.pt" or meta.get("final") else meta["epoch"]
    ug = sample_user_graph(g.user_user, cfg.model.user_graph_k,
                           np.random.default_rng(derive_seed(cfg.train.seed, epoch, "ug")))
    check_modality_order(meta, ds, ckpt)
    model = build_model(ds, cfg, g, ug)
    model.load_state_dict(load_file(ck_dir, weights, meta))
    stale = "eval_embeddings.pt" if meta.get("final") else "best_eval.pt"
    if cfg.compat.stale_eval and stale in meta["hashes"]:  # compat (B5): the embeddings selection scored
        e = load_file(ck_dir, stale, meta)
        model._eval_cache = (e["users"], e["items"])
    model.eval()
    return model, ds, cfg, meta


def evaluate_checkpoint(ckpt: str | Path, data_dir: str | Path | None = None) -> dict:
    """Re-evaluate a checkpoint in-process (valid and test), with the training loop's targets."""
    from gtc_ray.train.loop import derive_seed, eval_targets
    from gtc_ray.train.metrics import eval_protocol, evaluate_sums, sums_to_metrics
    model, ds, cfg, meta = load_checkpoint_model(ckpt, data_dir)
    zu, yi = model.eval_embeddings(derive_seed(cfg.train.seed, "eval"))
    _, targets = eval_targets(ds, cfg.eval.mask_valid_in_test)
    out = {}
    for split, (users, truth, mask) in targets.items():
        sums, n = evaluate_sums(zu, yi, users, truth, mask, cfg.eval.topk, cfg.eval.user_chunk)
        out[split] = sums_to_metrics(sums, n, cfg.eval.topk)
    out["protocol"] = eval_protocol(cfg)
    return out


def cli_evaluate(a, log=print) -> int:
    res = evaluate_checkpoint(a.checkpoint, a.data)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        log(format_table(res))
        log(f"protocol: {protocol_line(res['protocol'])}")
    return 0
