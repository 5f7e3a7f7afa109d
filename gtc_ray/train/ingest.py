"""Ray Data ingestion: read the interaction table and cut one deterministic shard per worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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
