"""The per-worker training loop, shared by Ray Train workers and the in-process runner.

Walk-through (one call per worker):
 1. setup: threads, the driver's WorkerInputs (counts, training matrix, evaluation targets,
    graphs; through Ray's object store) and this worker's feature rows (its item block when the
    full-item work is sharded; Ray Data), model, optimizer (the worker never opens the dataset)
 2. restore from the latest reported checkpoint (worker restart or `--resume`)
 3. read this worker's shard of the training interactions (Ray Data: `get_dataset_shard`)
 4. per epoch: resample the user-user graph (seed, epoch: same on every rank); shuffle the shard and
    draw negatives vectorised (seed, epoch, rank: differ per rank); every rank runs the same number
    of steps (DDP needs it); per step the model's noise/permutations are seeded (seed, epoch, step, rank)
 5. evaluate validation, sharded by users; sums all-reduced
 6. early stopping on the validation metric (strict improvement, patience as the spec)
 7. every rank reports; rank 0 alone writes the checkpoint
 8. at the end: the best-validation weights are evaluated once on the test split

DDP choices (spec §11): the global batch is `train.batch_size`; with `batch_scaling="split"` each of
W workers takes B/W rows, so optimizer steps per epoch (and the effective weight of the full-item
L_gen and L_TC, O4) equal single-process training. With `train.shard_item_work` (the default) the
full-item work (projections, denoisers, L_gen, the L_TC rows) is split by item rows across workers,
all drawing the step's noise and permutations from one seed: the step is the single-process step,
computed in parts (gtc_ray/model/sharding.py). Without it every rank repeats that work with its own
noise and permutations (lower-variance gradients, no speed-up from more workers).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from gtc_ray.config import Config, config_from_dict
from gtc_ray.data.prepare import train_matrix
from gtc_ray.model.gtc import GTC
from gtc_ray.model.propagation import bipartite_adjacency, sample_user_graph
from gtc_ray.train.checkpoint import check_modality_order, load_file, read_meta
from gtc_ray.train.ingest import used_modalities
from gtc_ray.train.metrics import (eval_protocol, evaluate_sums, modality_balance, representation_share_sums,
                                   sums_to_metrics)

LOSS_KEYS = ("loss", "bpr", "reg", "tc", "gen")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts; stable across processes (unlike hash())."""
    h = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def sample_negatives(users: np.ndarray, seen: sp.csr_matrix, candidates: np.ndarray,
                     rng: np.random.Generator, max_rounds: int = 100) -> np.ndarray:
    """One negative per row, uniform over `candidates`, rejecting the user's training items.
    Vectorised rejection (fixes P5): membership is a binary search of user * I + item in the
    sorted keys of the training matrix, and only the rows that hit a seen item are redrawn."""
    seen = seen.tocsr()
    seen.sort_indices()
    n_items = seen.shape[1]
    keys = np.repeat(np.arange(seen.shape[0], dtype=np.int64), np.diff(seen.indptr)) * n_items + seen.indices
    neg = candidates[rng.integers(0, len(candidates), len(users))]
    todo = np.arange(len(users))
    for _ in range(max_rounds):
        q = users[todo].astype(np.int64) * n_items + neg[todo]
        pos = np.minimum(np.searchsorted(keys, q), max(len(keys) - 1, 0))
        hit = (keys[pos] == q) if len(keys) else np.zeros(len(q), bool)
        todo = todo[hit]
        if len(todo) == 0:
            return neg
        neg[todo] = candidates[rng.integers(0, len(candidates), len(todo))]
    raise RuntimeError("negative sampling did not converge: some user has interacted with almost every item")


class Runtime:
    """What the loop needs from its environment (Ray Train or in-process)."""

    rank = 0
    world_size = 1
    device = torch.device("cpu")
    verbose = True  # print progress from rank 0 (the Ray runtime prints from the controller instead)

    @staticmethod
    def log(msg: str) -> None:
        print(msg, flush=True)

    def shard(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def item_shard(self):
        """This worker's ItemShard (None with one worker); collective: every rank calls it."""
        return None

    def inputs(self, config: dict):
        """The WorkerInputs the driver built (gtc_ray/train/ingest.py)."""
        inputs = config["inputs"]
        if not hasattr(inputs, "num_items"):  # a Ray ObjectRef
            import ray
            inputs = ray.get(inputs)
        return inputs

    def features(self, inputs, modalities: list[str], lo: int, hi: int) -> dict[str, np.ndarray]:
        """Feature rows [lo, hi) of these modalities."""
        raise NotImplementedError

    def latest_checkpoint(self) -> Path | None:
        return None

    def release(self, checkpoint: Path) -> None:
        """Done reading a checkpoint from latest_checkpoint() (a restored copy may be deleted)."""

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        raise NotImplementedError


def _evaluate(model: GTC, rt: Runtime, users: np.ndarray, truth: sp.csr_matrix, mask: sp.csr_matrix,
              cfg: Config, seed: int, balance: bool = False) -> dict:
    """Metrics of one split, sharded by users across workers; with `balance`, also the
    modality-balance score of these users' scores (metrics.modality_balance)."""
    zu, yi = model.eval_embeddings(seed)
    mine = users[rt.rank::rt.world_size]  # users sharded across workers
    sums, n = evaluate_sums(zu, yi, mine, truth, mask, cfg.eval.topk, cfg.eval.user_chunk)
    n_reps = 1 + len(model.modalities)
    parts = [sums.double(), torch.tensor([float(n)], dtype=torch.float64, device=sums.device)]
    if balance and n_reps > 1:
        parts.append(representation_share_sums(zu, yi, mine, n_reps, cfg.eval.user_chunk))
    packed = rt.all_reduce(torch.cat(parts))
    k = len(sums)
    out = sums_to_metrics(packed[:k], int(packed[k].item()), cfg.eval.topk)
    if len(packed) > k + 1:
        out["modality_balance"] = modality_balance(packed[k + 1:])
    return out


def _split_csr(ds, name: str) -> sp.csr_matrix:
    u, i = ds.split_pairs(name)
    return train_matrix(u, i, ds.num_users, ds.num_items)


def eval_targets(ds, mask_valid_in_test: bool = False) -> tuple[sp.csr_matrix, dict]:
    """The training matrix and, per split, (users to rank, their true items, items to mask). The
    spec's protocol (§8, the default) masks the user's training items in both splits; the stricter
    `mask_valid_in_test` also masks the validation items in test."""
    seen = _split_csr(ds, "train")
    valid = _split_csr(ds, "valid")
    test_mask = (seen + valid).tocsr() if mask_valid_in_test else seen
    return seen, {"valid": (np.unique(ds.split_pairs("valid")[0]), valid, seen),
                  "test": (np.unique(ds.split_pairs("test")[0]), _split_csr(ds, "test"), test_mask)}


def make_optimizer(params, cfg: Config) -> torch.optim.Adam:
    """Adam over the parameters that require a gradient, fused where this torch has it for their
    device: one kernel over all parameters instead of a dozen elementwise passes (10-17 ms -> 3-6 ms
    per step on Baby; every worker repeats it)."""
    params = [p for p in params if p.requires_grad]
    kw = {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay}
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, **kw)


def build_model(ds, cfg: Config, graphs, user_graph: sp.csr_matrix | None = None, device=None) -> GTC:
    """GTC for a dataset, on `device`, with its fixed data attached: the features, the training
    graph's normalised adjacency, the prepared item-item graph and (when given) a user-user graph."""
    tr_u, tr_i = ds.split_pairs("train")
    model = GTC(ds.num_users, ds.num_items, {m: f.shape[1] for m, f in ds.features.items()}, cfg.model, cfg.compat)
    if device is not None:
        model.to(device)
    return model.attach(ds.features, bipartite_adjacency(tr_u, tr_i, ds.num_users, ds.num_items),
                        graphs.item_item, user_graph, device)


def model_for_worker(inputs, features: dict, rows: tuple[int, int], cfg: Config, device=None) -> GTC:
    """GTC from the driver's WorkerInputs and this worker's feature rows [lo, hi)."""
    model = GTC(inputs.num_users, inputs.num_items, dict(inputs.features), cfg.model, cfg.compat)
    if device is not None:
        model.to(device)
    return model.attach(features, inputs.adj, inputs.item_item, None, device, feature_rows=rows)


def train_loop(config: dict, rt: Runtime) -> None:
    cfg: Config = config_from_dict(config["cfg"])
    torch.set_num_threads(cfg.train.num_threads)
    seed = cfg.train.seed
    torch.manual_seed(derive_seed(seed, "init"))  # identical initial weights on every rank
    log = rt.log if rt.rank == 0 and rt.verbose else (lambda *a, **k: None)

    # 1. setup: what the driver built (ingest.py), and this worker's feature rows
    inputs = rt.inputs(config)
    # the full-item work split by item rows (all ranks: new_group is collective); the driver cut
    # the feature tables by the same blocks (ingest.item_block)
    item_shard = rt.item_shard() if cfg.train.shard_item_work else None
    rows = item_shard.bounds(inputs.num_items) if item_shard is not None else (0, inputs.num_items)
    model = model_for_worker(inputs, rt.features(inputs, list(used_modalities(inputs, cfg)), *rows), rows, cfg,
                             rt.device)
    seen, targets = inputs.seen, inputs.targets
    opt = make_optimizer(model.parameters(), cfg)
    feature_mb = sum(f.numel() * f.element_size() for f in model.features.values()) / 2 ** 20
    feature_mb = float(rt.all_reduce(torch.tensor([feature_mb], dtype=torch.float64, device=rt.device), "max").item())

    # 2. restore
    start_epoch, best, best_epoch, bad, history, best_state = 0, -math.inf, -1, 0, [], None
    # compat's stale evaluation (B5): the embeddings that selection scored at the best epoch; the
    # final report scores exactly these, not a fresh forward of the best weights
    stale = cfg.compat.stale_eval
    best_eval = None
    resumes: list[int] = []
    ck = rt.latest_checkpoint()
    if ck is not None:
        try:  # the restored copy is released whatever happens
            meta = read_meta(ck)
            check_modality_order(meta, inputs, ck)
            if meta.get("dataset") != inputs.content_hash:
                raise ValueError(f"checkpoint {ck} was trained on dataset {meta.get('dataset')}, not {inputs.content_hash}")
            model.load_state_dict(load_file(ck, "model.pt", meta, rt.device))
            if meta.get("final"):
                start_epoch = cfg.train.epochs  # finished run: only the final test evaluation remains
            else:
                opt.load_state_dict(load_file(ck, "optim.pt", meta, rt.device))
                start_epoch = meta["epoch"] + 1
            best, best_epoch, bad, history = meta["best"], meta["best_epoch"], meta["bad"], meta["history"]
            # the epochs at which this run continued from a checkpoint (worker restart, --resume)
            resumes = list(meta.get("resumes", [])) + [start_epoch]
            best_state = load_file(ck, "best_model.pt", meta, rt.device) if "best_model.pt" in meta["hashes"] else None
            for f in ("best_eval.pt", "eval_embeddings.pt"):
                if f in meta["hashes"]:
                    best_eval = tuple(load_file(ck, f, meta, rt.device)[k] for k in ("users", "items"))
        finally:
            rt.release(ck)
        log(f"resumed from {ck} at epoch {start_epoch}")
    model.item_shard = item_shard
    noise_rank = 0 if model.item_shard is not None else rt.rank  # sharded: one noise stream for all
    ddp = rt.wrap(model)

    # 3. this worker's shard
    sh_u, sh_i = rt.shard()
    sh_u, sh_i = sh_u.astype(np.int64), sh_i.astype(np.int64)
    o = np.lexsort((sh_i, sh_u))  # canonical order: Ray Data's block order varies between runs
    sh_u, sh_i = sh_u[o], sh_i[o]
    n_global = int(rt.all_reduce(torch.tensor([len(sh_u)], dtype=torch.float64, device=rt.device)).item())
    n_max = int(rt.all_reduce(torch.tensor([len(sh_u)], dtype=torch.float64, device=rt.device), "max").item())
    b_local = cfg.train.batch_size // rt.world_size if cfg.train.batch_scaling == "split" else cfg.train.batch_size
    b_local = max(1, b_local)
    steps = max(1, math.ceil(n_max / b_local))
    candidates = np.unique(seen.indices).astype(np.int64)  # items seen in training (spec §4)
    log(f"training on {n_global:,} interactions, {rt.world_size} worker(s), {b_local} rows/worker/step, "
        f"{steps} steps/epoch")

    metric = cfg.eval.valid_metric
    epochs_run = 0
    stop = start_epoch >= cfg.train.epochs
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        ddp.train()
        # 4. per-epoch randomness
        ug = sample_user_graph(inputs.user_user, cfg.model.user_graph_k, np.random.default_rng(derive_seed(seed, epoch, "ug")))
        model.set_user_graph(ug, rt.device)
        rng = np.random.default_rng(derive_seed(seed, epoch, rt.rank, "data"))
        order = rng.permutation(len(sh_u))
        neg_all = sample_negatives(sh_u[order], seen, candidates, rng)
        sums = torch.zeros(len(LOSS_KEYS), dtype=torch.float64)
        for s in range(steps):
            sl = slice(s * b_local, (s + 1) * b_local)  # the last batch may be partial (spec §4)
            if sl.start >= len(order):
                sl = slice(0, b_local)  # a shorter shard wraps around so every rank takes the same steps
            idx = order[sl]
            u = torch.from_numpy(sh_u[idx]).to(rt.device)
            p = torch.from_numpy(sh_i[idx]).to(rt.device)
            n = torch.from_numpy(neg_all[sl]).to(rt.device)
            out = ddp(u, p, n, seed=derive_seed(seed, epoch, s, noise_rank, "step"))
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            sums += torch.stack([out[k].detach() for k in LOSS_KEYS]).double().cpu()  # one device sync
        losses = (rt.all_reduce(sums.to(rt.device)) / (steps * rt.world_size)).cpu()
        if not torch.isfinite(losses).all():
            raise FloatingPointError(f"loss became {losses.tolist()} at epoch {epoch}; lower train.lr")
        train_s = time.perf_counter() - t0
        # 5. validation
        t1 = time.perf_counter()
        ddp.eval()
        rec = {"epoch": epoch, **{f"train_{k}": float(v) for k, v in zip(LOSS_KEYS, losses)}}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            vm = _evaluate(model, rt, *targets["valid"], cfg, derive_seed(seed, "eval"), balance=True)
            if "modality_balance" in vm:
                rec["modality_balance"] = vm.pop("modality_balance")
            rec.update({f"valid_{k}": v for k, v in vm.items()})
            # 6. early stopping: strict improvement resets the counter
            if vm[metric] > best:
                best, best_epoch, bad = vm[metric], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if stale:
                    best_eval = tuple(t.clone() for t in model.eval_embeddings(derive_seed(seed, "eval")))
            else:
                bad += 1
            stop = bad > cfg.train.patience
        rec.update({"train_seconds": train_s, "eval_seconds": time.perf_counter() - t1,
                    "best_valid": best, "best_epoch": best_epoch, "feature_mb": feature_mb})
        if rt.device.type == "cuda":
            rec["gpu_peak_mb"] = torch.cuda.max_memory_allocated(rt.device) / 2 ** 20
        history.append(rec)
        epochs_run += 1
        log(_progress_line(rec, metric))
        # 7. report (every rank) + checkpoint (rank 0)
        meta = {"epoch": epoch, "best": best, "best_epoch": best_epoch, "bad": bad, "history": history,
                "dataset": inputs.content_hash, "data_dir": inputs.location, "config": cfg.to_dict(), "final": False,
                "protocol": eval_protocol(cfg), "modalities": model.modalities, "resumes": resumes}
        extra = {"best_model.pt": best_state} if best_state is not None else {}
        if best_eval is not None:
            extra["best_eval.pt"] = {"users": best_eval[0], "items": best_eval[1]}
        rt.report(rec, _write_ckpt(rt, model.state_dict(), opt.state_dict(), extra, meta)
                  if epoch % cfg.train.checkpoint_every == 0 or stop else None)
        if stop:
            break

    # 8. test once, on exactly the state that selection saw: the best-validation weights (model.pt
    # of a finished run already holds them), the user graph sampled for that epoch (also when a
    # finished run is resumed or its worker restarted after the last report) and, in compat mode,
    # the stale embeddings that were scored
    if best_state is not None:
        model.load_state_dict(best_state)
    if best_epoch >= 0:
        model.set_user_graph(sample_user_graph(inputs.user_user, cfg.model.user_graph_k,
                                               np.random.default_rng(derive_seed(seed, best_epoch, "ug"))), rt.device)
    if stale:
        model._eval_cache = best_eval
    t2 = time.perf_counter()
    model.eval()
    vfinal = _evaluate(model, rt, *targets["valid"], cfg, derive_seed(seed, "eval"), balance=True)
    balance = vfinal.pop("modality_balance", None)
    # Tune trials skip the test split: only the selected trial is tested, once, by the search driver
    tm = _evaluate(model, rt, *targets["test"], cfg, derive_seed(seed, "eval")) \
        if config.get("evaluate_test", True) else {}
    rec = {"epoch": history[-1]["epoch"] if history else -1, "final": True,
           **{f"valid_{k}": v for k, v in vfinal.items()}, **{f"test_{k}": v for k, v in tm.items()},
           "best_valid": best, "best_epoch": best_epoch, "test_seconds": time.perf_counter() - t2}
    if balance is not None:
        rec["modality_balance"] = balance
    log(_progress_line(rec, metric))
    meta = {"epoch": rec["epoch"], "best": best, "best_epoch": best_epoch, "bad": bad, "history": history,
            "dataset": inputs.content_hash, "data_dir": inputs.location, "config": cfg.to_dict(), "final": True,
            "valid": vfinal, "test": tm, "protocol": eval_protocol(cfg), "modalities": model.modalities, "resumes": resumes}
    if balance is not None:
        meta["modality_balance"] = balance
    extra = {"eval_embeddings.pt": {"users": best_eval[0], "items": best_eval[1]}} if stale and best_eval else {}
    rt.report(rec, _write_ckpt(rt, model.state_dict(), None, extra, meta))


def _write_ckpt(rt: Runtime, model_state, optim_state, extra: dict, meta) -> Path | None:
    if rt.rank != 0:
        return None
    from gtc_ray.train.checkpoint import save_checkpoint
    import tempfile
    stage = getattr(rt, "stage_dir", None)
    if stage is not None:  # persistent staging (Ray Train local mode keeps the directory it is given)
        Path(stage).mkdir(parents=True, exist_ok=True)
        # time-ordered names: the runtime keeps the newest train.keep_checkpoints
        d = Path(tempfile.mkdtemp(prefix=f"checkpoint_{time.time_ns():020d}_", dir=stage)) / "checkpoint"
    else:
        d = Path(tempfile.mkdtemp(prefix="gtc-ckpt-")) / "checkpoint"
    return save_checkpoint(d, model_state, meta, optim_state, extra or None)


def _progress_line(rec: dict, metric: str) -> str:
    if rec.get("final") and "test_recall@20" not in rec:
        return f"final: best epoch {rec['best_epoch']}, valid {metric} {rec.get(f'valid_{metric}', float('nan')):.4f}"
    if rec.get("final"):
        return (f"test on best epoch {rec['best_epoch']}: recall@20={rec.get('test_recall@20', float('nan')):.4f}, "
                f"ndcg@20={rec.get('test_ndcg@20', float('nan')):.4f}"
                + (f", modality balance {rec['modality_balance']:.3f}" if "modality_balance" in rec else ""))
    s = (f"epoch {rec['epoch']:4d}  loss {rec['train_loss']:.4f} (bpr {rec['train_bpr']:.4f} tc {rec['train_tc']:.4f} "
         f"gen {rec['train_gen']:.4f} reg {rec['train_reg']:.5f})")
    if f"valid_{metric}" in rec:
        s += f"  valid {metric} {rec[f'valid_{metric}']:.4f} ndcg@20 {rec.get('valid_ndcg@20', float('nan')):.4f}"
    if "modality_balance" in rec:
        s += f" balance {rec['modality_balance']:.3f}"
    return s + f"  [{rec['train_seconds']:.1f}s train, {rec['eval_seconds']:.1f}s eval]"
