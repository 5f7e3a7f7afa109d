"""Driver side of training: validate, prepare, start (or join) Ray, build the TorchTrainer, fit.

    summary = run_training("data/ml100k", load_config(overrides=["train.epochs=5"]), workers=2)

`runner="inprocess"` runs the very same loop in this process without Ray (for benchmarks and
debugging); `workers=0` uses Ray Train's local mode.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from gtc_ray.config import Config, load_config
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import prepare
from gtc_ray.errors import GtcInputError
from gtc_ray.train.checkpoint import read_meta
from gtc_ray.train.loop import Runtime, train_loop


# ------------------------------------------------------------------ runtimes

# names whose sort order is their age: in-process checkpoint_NNNNNN, local-mode checkpoint_<ns time>_*
_ORDERED_CHECKPOINT = re.compile(r"checkpoint_(\d{6}|\d{20}_\w+)")


def prune_checkpoints(parent: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints under `parent`. Each checkpoint also carries the best-so-far
    weights, so the newest is enough to finish the run. Directories named otherwise (an older
    version's local-mode checkpoints) are left alone."""
    found = sorted(p for p in parent.glob("checkpoint_*") if p.is_dir() and _ORDERED_CHECKPOINT.fullmatch(p.name)) \
        if parent.exists() else []
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


class InProcessRuntime(Runtime):
    """Single process, no Ray: checkpoints under `run_dir/checkpoint_NNNNNN`, the newest `keep`."""

    def __init__(self, data_dir: str, run_dir: Path, device: str = "cpu", log=print, keep: int = 2):
        self.data_dir, self.run_dir, self.device = data_dir, run_dir, torch.device(device)
        self.log, self.keep = log, keep
        self.reports: list[dict] = []

    def shard(self):
        ds = load_dataset(self.data_dir, verify=False)
        return ds.split_pairs("train")

    def latest_checkpoint(self):
        found = sorted(self.run_dir.glob("checkpoint_*")) if self.run_dir.exists() else []
        return found[-1] if found else None

    def report(self, metrics, checkpoint_dir):
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            last = self.latest_checkpoint()
            n = int(last.name.split("_")[1]) + 1 if last is not None else 0
            self.run_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(checkpoint_dir), self.run_dir / f"checkpoint_{n:06d}")
            shutil.rmtree(Path(checkpoint_dir).parent, ignore_errors=True)
            prune_checkpoints(self.run_dir, self.keep)


def ddp_kwargs() -> dict:
    """DistributedDataParallel options for GTC. The only buffers are the noise schedule's constants:
    broadcasting them from rank 0 at every forward would add a collective (a wait for the slower
    worker) to each step. torch >= 2.13 names the switch forward_sync_buffers (broadcast_buffers is
    deprecated); older builds (2.11 on the GPU machine) only know broadcast_buffers."""
    ddp_params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in ddp_params else "broadcast_buffers": False}


class RayTrainRuntime(Runtime):
    verbose = False  # progress is printed once, by ProgressCallback on the controller

    def __init__(self, stage_dir: str | None = None, keep: int = 2):
        import logging
        import ray.train
        import ray.train.torch
        # per-report INFO lines ("Reporting training result ...") would drown the progress output
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        try:  # Train V2 logs each report under a logger named after its file
            from ray.train.v2._internal.execution import context as _ctx
            logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
        except ImportError:
            pass
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.stage_dir = stage_dir  # set in local mode, where report() does not copy the checkpoint
        self.keep = keep
        self.verbose = stage_dir is not None  # local mode runs no Train callbacks: print from the loop
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def shard(self):
        """This worker's rows: its own dataset, cut by Ray Data on the driver (shard_datasets), so the
        rows a worker gets never depend on block scheduling and none are dropped."""
        import ray.train
        it = ray.train.get_dataset_shard(f"train_{self.rank}")
        us, its = [], []
        for b in it.iter_batches(batch_size=1 << 16, batch_format="numpy"):
            us.append(b["user"]); its.append(b["item"])
        return (np.concatenate(us) if us else np.zeros(0, np.int64)), (np.concatenate(its) if its else np.zeros(0, np.int64))

    def all_reduce(self, t, op="sum"):
        if self.world_size > 1 and torch.distributed.is_initialized():
            t = t.clone()
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX)
        return t

    def item_shard(self):
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return None
        from gtc_ray.model.sharding import ItemShard
        # a group of its own: the shard's collectives never interleave with DDP's gradient buckets
        return ItemShard(self.rank, self.world_size, torch.distributed.new_group())

    def wrap(self, model):
        import ray.train.torch
        if self.world_size > 1:
            return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_kwargs())
        return model

    def latest_checkpoint(self):
        import ray.train
        ck = ray.train.get_checkpoint()
        if ck is None:
            return None
        return Path(ck.to_directory(tempfile.mkdtemp(prefix="gtc-restore-")))

    def release(self, checkpoint):
        if checkpoint.name.startswith("gtc-restore-"):
            shutil.rmtree(checkpoint, ignore_errors=True)

    def report(self, metrics, checkpoint_dir):
        import ray.train
        ck = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=ck)
        if checkpoint_dir is not None and self.stage_dir is None:
            shutil.rmtree(Path(checkpoint_dir).parent, ignore_errors=True)
        elif checkpoint_dir is not None:  # local mode: Ray keeps what it is given, so prune here
            prune_checkpoints(Path(self.stage_dir), self.keep)


def make_progress_callback(metric: str):
    from ray.train import UserCallback
    from gtc_ray.train.loop import _progress_line

    class ProgressCallback(UserCallback):
        """Prints one progress line per epoch (rank 0's metrics), on the Train controller."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and "epoch" in metrics[0]:
                print(_progress_line(metrics[0], metric), flush=True)

    return ProgressCallback()


def ray_worker_entry(config: dict) -> None:
    """The function Ray Train runs on every worker."""
    train_loop(config, RayTrainRuntime(config.get("stage_dir"), config["cfg"]["train"]["keep_checkpoints"]))


# ------------------------------------------------------------------ Ray setup

def _on_local_ray(cfg: Config) -> bool:
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def resolve_cpus_per_worker(cfg: Config, workers: int, extra_cpu: float = 0.0) -> float:
    """CPUs per Train worker: the configured value, or (ray.cpus_per_worker null) on the embedded
    local Ray what leaves one CPU to Ray Data, shared by the workers and capped at 1; on a cluster 1.
    `workers` counts every worker that runs at once (all concurrent trials' workers)."""
    if cfg.ray.cpus_per_worker is not None:
        return float(cfg.ray.cpus_per_worker)
    if not _on_local_ray(cfg):
        return 1.0
    spare = cfg.ray.num_cpus - 1 - extra_cpu
    if spare <= 0:
        raise GtcInputError("config key ray.num_cpus", f"the local Ray's {cfg.ray.num_cpus} CPUs leave none for "
                            "training after one for Ray Data", "raise ray.num_cpus, or run fewer trials at once")
    return math.floor(min(1.0, spare / max(workers, 1)) * 1e4) / 1e4  # down: the total must still fit


def check_local_resources(cfg: Config, workers: int, extra_cpu: float = 0.0) -> None:
    """On the embedded local Ray, leave a whole CPU to Ray Data, or ingestion waits forever (RAY_NOTES P3)."""
    if not _on_local_ray(cfg):
        return
    cpw = resolve_cpus_per_worker(cfg, workers, extra_cpu)
    if workers * cpw + extra_cpu > cfg.ray.num_cpus - 1 + 1e-9:
        raise GtcInputError("config keys ray.workers/ray.cpus_per_worker",
                            f"{workers} workers x {cpw} CPU leave less than one of the "
                            f"local Ray's {cfg.ray.num_cpus} CPUs for Ray Data, which would hang",
                            f"use ray.cpus_per_worker <= {(cfg.ray.num_cpus - 1 - extra_cpu) / max(workers, 1):g} "
                            "or null (sized automatically; CPUs are logical, torch threads are set by "
                            "train.num_threads), or raise ray.num_cpus")


def ensure_ray(cfg: Config, log=print, workers: int = 0, extra_cpu: float = 0.0) -> None:
    import ray
    check_local_resources(cfg, workers, extra_cpu)
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # end-of-run detection (RAY_NOTES §2)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    addr = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    if addr:
        ray.init(address=addr)  # a cluster brings its own resources (RAY_NOTES §3)
        log(f"connected to Ray at {addr} ({time.perf_counter() - t0:.1f}s)")
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory,
                 log_to_driver=True)
        log(f"started a local Ray with {cfg.ray.num_cpus} CPUs ({time.perf_counter() - t0:.1f}s)")


def _keep_train_rows(batch: dict) -> dict:
    m = batch["split"] == 0
    return {"user": batch["user"][m].astype(np.int64), "item": batch["item"][m].astype(np.int64)}


def train_dataset(data_dir: Path):
    """Ray Data: read the interactions table and keep the training rows."""
    import ray.data
    # a quarter CPU per Ray Data task: ingestion still runs when trainers hold most CPUs (RAY_NOTES P3)
    return ray.data.read_parquet(str(data_dir / "interactions.parquet"), num_cpus=0.25) \
        .select_columns(["user", "item", "split"]).map_batches(_keep_train_rows, batch_format="numpy", num_cpus=0.25)


def shard_of(users: np.ndarray, items: np.ndarray, world: int) -> np.ndarray:
    """The worker (0..world-1) that trains on each (user, item) row: a fixed hash of the pair, so the
    split is the same in every run, whatever the order of Ray Data's blocks, and balanced to within
    sampling noise. Every row goes to exactly one worker."""
    key = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + items.astype(np.uint64)
    key ^= key >> np.uint64(31)
    key *= np.uint64(0xBF58476D1CE4E5B9)  # splitmix64 finaliser: mixes all bits (wraps mod 2^64)
    key ^= key >> np.uint64(29)
    return (key % np.uint64(world)).astype(np.int64)


class _ShardFilter:
    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def __call__(self, batch: dict) -> dict:
        keep = shard_of(batch["user"], batch["item"], self.world) == self.rank
        return {"user": batch["user"][keep], "item": batch["item"][keep]}


def shard_datasets(data_dir: Path, world: int) -> dict:
    """One materialised Ray Dataset per worker (`train_<rank>`), cut deterministically by shard_of.
    Materialised before the workers reserve their CPUs: reading never competes with (or waits on)
    the trainers, and each epoch costs no task start-up (RAY_NOTES P3, §2)."""
    rows = train_dataset(data_dir).materialize()
    if world <= 1:
        return {"train_0": rows}
    return {f"train_{r}": rows.map_batches(_ShardFilter(r, world), batch_format="numpy", num_cpus=0.25).materialize()
            for r in range(world)}


# ------------------------------------------------------------------ driver

def build_trainer(data_dir: Path, cfg: Config, loop_cfg: dict, *, workers: int, use_gpu: bool, name: str,
                  storage_path: Path, callbacks: list):
    """The TorchTrainer for one training run (used by `train` and by each Tune trial). The driver
    has resolved ray.cpus_per_worker (resolve_cpus_per_worker) before; fault tolerance is
    ray.max_failures restarts of the worker group, each resuming from the latest checkpoint."""
    import ray.train
    from ray.train import DataConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    if workers == 0:
        loop_cfg = {**loop_cfg, "stage_dir": str(storage_path / name / "local_checkpoints")}
    cpw = cfg.ray.cpus_per_worker if cfg.ray.cpus_per_worker is not None else 1.0
    resources = None if workers == 0 else ({"CPU": cpw, "GPU": 1} if use_gpu else {"CPU": cpw})
    return TorchTrainer(
        ray_worker_entry, train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # each worker reads its own dataset whole: Train's streaming split would hand blocks out
        # dynamically (rows per worker changing between runs) and drop rows to equalise shards
        datasets=shard_datasets(data_dir, max(workers, 1)), dataset_config=DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures)))


def check_against_dataset(cfg: Config, ds, log=print) -> None:
    """Fit the config to the dataset before any work: top-K cut-offs larger than the catalogue are
    dropped with a note (the smallest presets have fewer items than the default K=50); the
    validation metric's own K and graph.knn_k must fit."""
    if cfg.graph.knn_k > ds.num_items:
        raise GtcInputError("config key graph.knn_k", f"k={cfg.graph.knn_k} exceeds the {ds.num_items} items",
                            f"set graph.knn_k <= {ds.num_items}")
    k_valid = int(cfg.eval.valid_metric.partition("@")[2])
    if k_valid > ds.num_items:
        raise GtcInputError("config key eval.valid_metric", f"{cfg.eval.valid_metric} needs more than the "
                            f"{ds.num_items} items", f"use a cut-off <= {ds.num_items}, e.g. --set eval.valid_metric=recall@10")
    too_big = [k for k in cfg.eval.topk if k > ds.num_items]
    if too_big:
        cfg.eval.topk = [k for k in cfg.eval.topk if k <= ds.num_items]
        log(f"note: the dataset has {ds.num_items} items; metrics @{', @'.join(map(str, too_big))} are not computed "
            f"(eval.topk = {cfg.eval.topk})")


def resolve_run_dir(kind: str, storage_path: Path, name: str | None, prefix: str, resume: bool,
                    state: str | None = None) -> tuple[str, Path]:
    """Name and directory of a run or search: a fresh unique one, or (with resume) an existing one."""
    if resume and not name:
        raise GtcInputError("--resume", f"needs the --name of the {kind} to continue", "pass --name NAME --resume")
    name = name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    d = storage_path / name
    if d.exists() and not resume:
        raise GtcInputError(f"{kind} {name}", f"already exists in {storage_path}",
                            "pass --resume to continue it, or choose another --name")
    if resume and not (d / state if state else d).exists():
        raise GtcInputError(f"{kind} {name}", f"has nothing to resume in {storage_path}", "check --name and --storage")
    return name, d


def run_training(data_dir: str | Path, cfg: Config, *, workers: int | None = None, use_gpu: bool | None = None,
                 name: str | None = None, storage: str | None = None, resume: bool = False,
                 runner: str = "ray", log=print, track: bool = False, tracking_uri: str | None = None) -> dict:
    """Train GTC; returns {'valid', 'test', 'checkpoint', 'history', 'protocol', 'seconds', 'run_id'}.

    With `track`, one MLflow run records params, tags, per-epoch metrics (live, from the Train
    controller), final metrics and artifacts. Once created, the run always ends FINISHED, FAILED
    (any error) or KILLED (Ctrl-C), never RUNNING."""
    from gtc_ray.train.metrics import eval_protocol
    t_start = time.perf_counter()
    data_dir = Path(data_dir).absolute()
    workers = cfg.ray.workers if workers is None else workers
    use_gpu = cfg.ray.use_gpu if use_gpu is None else use_gpu
    if workers < 0:
        raise GtcInputError("--workers", f"must be >= 0, got {workers}", "use 0 (local mode), 1, 2, ...")
    ds = load_dataset(data_dir)  # validation and hash checks before anything expensive
    check_against_dataset(cfg, ds, log)
    if runner != "inprocess":
        check_local_resources(cfg, workers)
        cfg.ray.cpus_per_worker = resolve_cpus_per_worker(cfg, workers)
    storage_path = Path(storage or cfg.ray.storage_path).absolute()
    name, run_dir = resolve_run_dir("run", storage_path, name, f"gtc-{ds.manifest['name']}", resume)
    loop_cfg = {"cfg": cfg.to_dict(), "data_dir": str(data_dir)}
    prepare(ds, cfg.graph, log=log)  # cached: workers only load it
    tracker = None
    if track:
        from gtc_ray.tracking import TrainTracker
        tracker = TrainTracker.start(tracking_uri, name, cfg, ds, log)
    try:
        log(f"run {name}: {ds.num_users:,} users, {ds.num_items:,} items, modalities "
            f"{list(ds.features) if cfg.model.use_content else '(ID only)'}; storage {storage_path}")
        if runner == "inprocess":
            rt = InProcessRuntime(str(data_dir), run_dir, "cuda" if use_gpu and torch.cuda.is_available() else "cpu",
                                  log, keep=cfg.train.keep_checkpoints)
            train_loop(loop_cfg, rt)
            ckpt = rt.latest_checkpoint()
        else:
            ensure_ray(cfg, log, workers)
            callbacks = [make_progress_callback(cfg.eval.valid_metric)]
            if tracker is not None:
                callbacks.append(tracker.train_callback())
            trainer = build_trainer(data_dir, cfg, loop_cfg, workers=workers, use_gpu=use_gpu, name=name,
                                    storage_path=storage_path, callbacks=callbacks)
            result = fit_interruptibly(trainer)
            if result.error:
                raise result.error
            ckpt = Path(result.checkpoint.path)
        meta = read_meta(ckpt)
        if not meta.get("final"):
            raise RuntimeError(f"training ended without a final evaluation (last checkpoint {ckpt})")
        out = {"valid": meta["valid"], "test": meta["test"], "checkpoint": str(ckpt), "history": meta["history"],
               "best_epoch": meta["best_epoch"], "protocol": meta.get("protocol", eval_protocol(cfg)),
               "seconds": time.perf_counter() - t_start, "name": name}
        if "modality_balance" in meta:
            out["modality_balance"] = meta["modality_balance"]
        if tracker is not None:
            tracker.finish(out, cfg, live=runner != "inprocess" and workers > 0)  # local mode runs no callbacks
            out["run_id"] = tracker.run_id
            log(f"MLflow run {tracker.run_id} in {tracker.uri}")
        return out
    except BaseException as e:
        if tracker is not None:
            tracker.end_after(e)
        if isinstance(e, KeyboardInterrupt):
            log(f"\ninterrupted; continue the run with: gtc-ray train {data_dir} --name {name} --resume"
                + (f" --storage {storage_path}" if storage else ""))
        raise


def fit_interruptibly(trainer):
    """trainer.fit(), with Ctrl-C as a KeyboardInterrupt. Ray Train's fit() installs a SIGINT handler
    that aborts the run and then either raises the controller's death (RayActorError) or calls
    sys.exit(0), and leaves that handler installed; here any SIGINT during fit() ends in
    KeyboardInterrupt (exit 130, MLflow run KILLED) and the previous handler is restored."""
    import signal
    import threading
    main = threading.current_thread() is threading.main_thread()
    seen: list[int] = []
    prev = signal.getsignal(signal.SIGINT) if main else None
    register = getattr(trainer, "_register_sigint_handler", None)  # Ray 2.60's hook; absent: plain fit
    if main and register is not None:
        def register_and_watch(controller):
            register(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def on_sigint(signum, frame):
                seen.append(signum)
                if callable(ray_handler):
                    ray_handler(signum, frame)
            signal.signal(signal.SIGINT, on_sigint)
        trainer._register_sigint_handler = register_and_watch
    try:
        result = trainer.fit()
    except BaseException as e:
        if seen:
            raise KeyboardInterrupt from e
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, prev)
    if seen:
        raise KeyboardInterrupt
    return result


def format_table(summary: dict, topk=(5, 10, 20, 50)) -> str:
    lines = [f"{'metric':<14}{'valid':>10}{'test':>10}"]
    for m in ("recall", "ndcg", "precision", "map"):
        for k in topk:
            key = f"{m}@{k}"
            if key in summary["valid"]:
                lines.append(f"{key:<14}{summary['valid'][key]:>10.4f}{summary['test'][key]:>10.4f}")
    return "\n".join(lines)


COMPAT = {"compat": {"freeze_denoiser": True, "stale_eval": True, "unstable_bpr": True}}


def require_compat_protocol(cfg: Config) -> None:
    """--compat reproduces the original, which evaluates with the spec's protocol only."""
    if cfg.eval.mask_valid_in_test:
        raise GtcInputError("--compat with eval.mask_valid_in_test=true", "compat mode always uses the spec's "
                            "protocol (test masks training items only), as the original code",
                            "drop eval.mask_valid_in_test=true, or drop --compat")


def protocol_line(p: dict) -> str:
    return (f"{p['name']} ({p['ranking']}; test masks {p['test_mask']}; {p['selection']}; seed {p['seed']})")


def cli_train(a, log=print) -> int:
    overrides = list(a.overrides)
    if a.epochs is not None:
        overrides.append(f"train.epochs={a.epochs}")
    if a.max_failures is not None:
        overrides.append(f"ray.max_failures={a.max_failures}")
    cfg = load_config(a.config, overrides, base=COMPAT if a.compat else None)
    if a.compat:
        require_compat_protocol(cfg)
    if a.address:
        cfg.ray.address = a.address
    summary = run_training(a.data_dir, cfg, workers=a.workers, use_gpu=a.gpu or None, name=a.name,
                           storage=a.storage, resume=a.resume, log=log, track=not a.no_mlflow,
                           tracking_uri=a.tracking_uri)
    log("")
    log(format_table(summary, cfg.eval.topk))
    log(f"protocol: {protocol_line(summary['protocol'])}")
    bal = summary.get("modality_balance")
    log(f"best epoch {summary['best_epoch']}; " + (f"modality balance {bal:.3f}; " if bal is not None else "")
        + f"checkpoint {summary['checkpoint']}; {summary['seconds']:.0f}s")
    if a.metrics_out:
        keys = ("valid", "test", "protocol", "modality_balance", "checkpoint", "best_epoch", "name", "seconds")
        Path(a.metrics_out).write_text(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2) + "\n")
    return 0


def load_checkpoint_model(ckpt: str | Path, data_dir: str | Path | None = None):
    """Rebuild the trained model from a checkpoint: (model, dataset, config, meta).

    A final checkpoint holds the best-validation weights as model.pt; an intermediate one (e.g. a
    trial stopped by ASHA) keeps them as best_model.pt. The user graph is the one sampled for the
    epoch those weights come from, so the embeddings equal the ones validation saw."""
    from gtc_ray.config import config_from_dict
    from gtc_ray.model.propagation import sample_user_graph
    from gtc_ray.train.checkpoint import check_modality_order, load_file
    from gtc_ray.train.loop import build_model, derive_seed
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
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
    model.load_state_dict(load_file(ckpt, weights, meta))
    stale = "eval_embeddings.pt" if meta.get("final") else "best_eval.pt"
    if cfg.compat.stale_eval and stale in meta["hashes"]:  # compat (B5): the embeddings selection scored
        e = load_file(ckpt, stale, meta)
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
