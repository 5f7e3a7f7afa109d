"""Driver side of training: validate, prepare, start (or join) Ray, build the TorchTrainer, fit;
and the `gtc-ray train` verb. Runtimes live in runtime.py, Ray start-up in cluster.py, Ray Data
ingestion in ingest.py, checkpoint evaluation in evaluate.py.

    summary = run_training("data/ml100k", load_config(overrides=["train.epochs=5"]), workers=2)

`runner="inprocess"` runs the very same loop in this process without Ray (for benchmarks and
debugging); `workers=0` uses Ray Train's local mode.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from pathlib import Path

import torch

from gtc_ray.config import Config, load_config
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import prepare
from gtc_ray.errors import GtcInputError
from gtc_ray import storage as locations
from gtc_ray.train.checkpoint import check_storage_supports, checkpoint_location, local_checkpoint, read_meta
from gtc_ray.train.cluster import check_local_resources, ensure_ray, preflight, resolve_cpus_per_worker
from gtc_ray.train.ingest import build_ingest, worker_inputs
from gtc_ray.train.loop import train_loop
from gtc_ray.train.runtime import InProcessRuntime, make_progress_callback, ray_worker_entry


# ------------------------------------------------------------------ driver

def build_trainer(ingest, cfg: Config, loop_cfg: dict, *, workers: int, use_gpu: bool, name: str,
                  storage_path: Path, callbacks: list):
    """The TorchTrainer for one training run (used by `train` and by each Tune trial). The driver
    has resolved ray.cpus_per_worker (resolve_cpus_per_worker) before; fault tolerance is
    ray.max_failures restarts of the worker group, each resuming from the latest checkpoint."""
    import ray.train
    from ray.train import DataConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    if workers == 0:
        loop_cfg = {**loop_cfg, "stage_dir": locations.join(storage_path, name, "local_checkpoints")}  # local only
    cpw = cfg.ray.cpus_per_worker if cfg.ray.cpus_per_worker is not None else 1.0
    resources = None if workers == 0 else \
        {**cfg.ray.worker_resources, "CPU": cpw, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        ray_worker_entry, train_loop_config={**loop_cfg, "inputs": ingest.inputs_ref},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # each worker reads its own datasets whole (ingest.py): Train's streaming split would hand
        # blocks out dynamically (rows per worker changing between runs) and drop rows to equalise shards
        datasets=ingest.datasets, dataset_config=DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(
            name=name, storage_path=locations.normalize(storage_path), callbacks=callbacks,
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


def resolve_run_dir(kind: str, storage_path: str | Path, name: str | None, prefix: str, resume: bool,
                    state: str | None = None) -> tuple[str, Path | str]:
    """Name and location of a run or search: a fresh unique one, or (with resume) an existing one.
    The location is a local Path when the storage is local, else a URI (existence is checked
    through gtc_ray.storage either way)."""
    if resume and not name:
        raise GtcInputError("--resume", f"needs the --name of the {kind} to continue", "pass --name NAME --resume")
    name = name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    d = locations.join(storage_path, name)

    def present(loc) -> bool:
        try:
            return locations.exists(loc) or locations.is_dir(loc)
        except Exception as e:  # unreachable store, missing bucket, no credentials
            raise GtcInputError(f"--storage {storage_path}", f"cannot be read ({locations.describe_error(loc, e)})",
                                "check the location and the storage's credentials (e.g. the AWS_* variables)") from e
    if present(d) and not resume:
        raise GtcInputError(f"{kind} {name}", f"already exists in {storage_path}",
                            "pass --resume to continue it, or choose another --name")
    if resume and not present(locations.join(d, state) if state else d):
        raise GtcInputError(f"{kind} {name}", f"has nothing to resume in {storage_path}", "check --name and --storage")
    return name, locations.local_path(d) or d


def run_training(data_dir: str | Path, cfg: Config, *, workers: int | None = None, use_gpu: bool | None = None,
                 name: str | None = None, storage: str | None = None, resume: bool = False,
                 runner: str = "ray", log=print, track: bool = False, tracking_uri: str | None = None) -> dict:
    """Train GTC; returns {'valid', 'test', 'checkpoint', 'history', 'protocol', 'seconds', 'run_id'}.

    With `track`, one MLflow run records params, tags, per-epoch metrics (live, from the Train
    controller), final metrics and artifacts. Once created, the run always ends FINISHED, FAILED
    (any error) or KILLED (Ctrl-C), never RUNNING."""
    from gtc_ray.train.metrics import eval_protocol
    t_start = time.perf_counter()
    data_dir = locations.normalize(data_dir)  # a local path (absolute) or a URI
    workers = cfg.ray.workers if workers is None else workers
    use_gpu = cfg.ray.use_gpu if use_gpu is None else use_gpu
    if workers < 0:
        raise GtcInputError("--workers", f"must be >= 0, got {workers}", "use 0 (local mode), 1, 2, ...")
    ds = load_dataset(data_dir)  # validation and hash checks before anything expensive
    check_against_dataset(cfg, ds, log)
    if runner != "inprocess":
        check_local_resources(cfg, workers)
        cfg.ray.cpus_per_worker = resolve_cpus_per_worker(cfg, workers)
    storage_path = locations.normalize(storage or cfg.ray.storage_path)  # a local path (absolute) or a URI
    check_storage_supports(storage_path, runner=runner, workers=workers)
    name, run_dir = resolve_run_dir("run", storage_path, name, f"gtc-{ds.manifest['name']}", resume)
    loop_cfg = {"cfg": cfg.to_dict(), "data_dir": str(data_dir)}
    preflight(cfg, tracking_uri=tracking_uri, track=track, use_ray=runner != "inprocess", log=log, workers=workers)
    graphs = prepare(ds, cfg.graph, log=log)  # cached; reaches the workers through the object store
    tracker = None
    if track:
        from gtc_ray.tracking import TrainTracker
        tracker = TrainTracker.start(tracking_uri, name, cfg, ds, log)
    try:
        log(f"run {name}: {ds.num_users:,} users, {ds.num_items:,} items, modalities "
            f"{list(ds.features) if cfg.model.use_content else '(ID only)'}; storage {storage_path}")
        if runner == "inprocess":
            rt = InProcessRuntime(str(data_dir), run_dir, "cuda" if use_gpu and torch.cuda.is_available() else "cpu",
                                  log, keep=cfg.train.keep_checkpoints, ds=ds)
            train_loop({**loop_cfg, "inputs": worker_inputs(ds, cfg, graphs)}, rt)
            ckpt = rt.latest_checkpoint()
        else:
            ensure_ray(cfg, log, workers)
            callbacks = [make_progress_callback(cfg.eval.valid_metric)]
            if tracker is not None:
                callbacks.append(tracker.train_callback())
            ingest = build_ingest(ds, cfg, graphs, workers, log)
            trainer = build_trainer(ingest, cfg, loop_cfg, workers=workers, use_gpu=use_gpu, name=name,
                                    storage_path=storage_path, callbacks=callbacks)
            result = fit_interruptibly(trainer)
            if result.error:
                raise result.error
            ckpt = checkpoint_location(result.checkpoint.path, storage_path)  # local path or URI
        with local_checkpoint(ckpt) as ck_dir:
            meta = read_meta(ck_dir)
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
                + (f" --storage {shlex.quote(storage_path)}" if storage else ""))
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
        locations.write_text(a.metrics_out, json.dumps({k: summary[k] for k in keys if k in summary}, indent=2) + "\n")
    return 0
