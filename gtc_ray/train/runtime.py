"""Where the training loop runs: the Runtime implementations (in-process, Ray Train worker), the
DDP options, the progress callback on the Train controller and the function Ray Train runs on
every worker. The loop itself (loop.py) knows none of them."""

from __future__ import annotations

import inspect
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from gtc_ray.data.dataset import load_dataset
from gtc_ray.train.loop import Runtime, train_loop


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

    def __init__(self, data_dir: str, run_dir: Path, device: str = "cpu", log=print, keep: int = 2, ds=None):
        self.data_dir, self.run_dir, self.device = data_dir, run_dir, torch.device(device)
        self.log, self.keep = log, keep
        self.reports: list[dict] = []
        self._ds = ds

    @property
    def ds(self):
        if self._ds is None:
            self._ds = load_dataset(self.data_dir, verify=False)
        return self._ds

    def inputs(self, config):
        """The driver's WorkerInputs, or (a loop called directly, as some tests do) built here."""
        if "inputs" in config:
            return super().inputs(config)
        from gtc_ray.config import config_from_dict
        from gtc_ray.data.prepare import prepare
        from gtc_ray.train.ingest import worker_inputs
        cfg = config_from_dict(config["cfg"])
        return worker_inputs(self.ds, cfg, prepare(self.ds, cfg.graph, log=lambda m: None))

    def features(self, inputs, modalities, lo, hi):
        return {m: self.ds.features[m][lo:hi] for m in modalities}

    def shard(self):
        return self.ds.split_pairs("train")

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

    def features(self, inputs, modalities, lo, hi):
        """This worker's feature rows, from the per-worker Ray Datasets the driver cut (ingest.py)."""
        import ray.train
        from gtc_ray.train.ingest import rows_from_batches
        return {m: rows_from_batches(ray.train.get_dataset_shard(f"feat_{m}_{self.rank}").iter_batches(
                    batch_size=4096, batch_format="pyarrow"), lo, hi, inputs.features[m],
                    f"features {m!r} of worker {self.rank}")
                for m in modalities}

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
