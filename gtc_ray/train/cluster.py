"""Ray start-up and resource sizing: join the cluster named by ray.address / RAY_ADDRESS, or start
an embedded local Ray, and size the Train workers' CPUs so that Ray Data always has room."""

from __future__ import annotations

import math
import os
import time

from gtc_ray.config import Config
from gtc_ray.errors import GtcInputError


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
