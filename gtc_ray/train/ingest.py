"""What reaches the workers, and how: Ray Data for the tables, Ray's object store for the rest.

The driver has loaded and checked the dataset and prepared its graphs. It then builds, once:
 - `shard_datasets`: Ray Data reads the interaction table and cuts one deterministic shard of
   training rows per worker (`train_<rank>`);
 - `feature_datasets`: Ray Data reads each modality's feature table and keeps, for each worker,
   only the rows of its item block (`feat_<modality>_<rank>`): with item-sharded training
   (train.shard_item_work) a worker computes only those rows, so it never holds the whole table;
 - `WorkerInputs`: the small derived data every worker needs (counts, the training matrix for
   negative sampling, the evaluation targets, the normalised adjacency and the prepared graphs),
   put in Ray's object store once.
So a worker never opens the dataset location itself, and never a path on the driver's disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from gtc_ray import storage


@dataclass
class WorkerInputs:
    """Everything a worker needs besides its Ray Data shards (see the module docstring)."""

    location: str  # the dataset, for the record (checkpoint meta); workers do not read it
    name: str
    content_hash: str
    num_users: int
    num_items: int
    features: dict[str, int]  # modality -> width, in the manifest's order
    seen: sp.csr_matrix  # [U, I] training interactions
    targets: dict  # split -> (users to rank, true items, items to mask), as loop.eval_targets
    adj: sp.csr_matrix  # normalised user-item adjacency of the training graph
    item_item: sp.csr_matrix
    user_user: sp.csr_matrix

    @property
    def nbytes(self) -> int:
        mats = [self.seen, self.adj, self.item_item, self.user_user] + \
            [m for t in self.targets.values() for m in t[1:]]
        return sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes for m in mats)


def worker_inputs(ds, cfg, graphs) -> WorkerInputs:
    from gtc_ray.model.propagation import bipartite_adjacency
    from gtc_ray.train.loop import eval_targets
    seen, targets = eval_targets(ds, cfg.eval.mask_valid_in_test)
    tr_u, tr_i = ds.split_pairs("train")
    dims = {m: int(f.shape[1]) for m, f in ds.features.items()}
    return WorkerInputs(location=str(ds.path), name=ds.manifest.get("name", ""), content_hash=ds.content_hash,
                        num_users=ds.num_users, num_items=ds.num_items, features=dims, seen=seen, targets=targets,
                        adj=bipartite_adjacency(tr_u, tr_i, ds.num_users, ds.num_items),
                        item_item=graphs.item_item, user_user=graphs.user_user)


def item_block(num_items: int, world: int, rank: int, sharded: bool) -> tuple[int, int]:
    """The item rows [lo, hi) whose features worker `rank` holds: its ItemShard block when the
    full-item work is split across workers, else every item."""
    if not sharded or world <= 1:
        return 0, num_items
    from gtc_ray.model.sharding import ItemShard
    return ItemShard(rank, world).bounds(num_items)


# ------------------------------------------------------------------ interactions

def _keep_train_rows(batch: dict) -> dict:
    m = batch["split"] == 0
    return {"user": batch["user"][m].astype(np.int64), "item": batch["item"][m].astype(np.int64)}


def train_dataset(location: str):
    """Ray Data: read the interactions table and keep the training rows."""
    import ray.data
    # a quarter CPU per Ray Data task: ingestion still runs when trainers hold most CPUs (RAY_NOTES P3)
    return ray.data.read_parquet(storage.join(location, "interactions.parquet"), num_cpus=0.25) \
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


def shard_datasets(location: str, world: int) -> dict:
    """One materialised Ray Dataset per worker (`train_<rank>`), cut deterministically by shard_of.
    Materialised before the workers reserve their CPUs: reading never competes with (or waits on)
    the trainers, and each epoch costs no task start-up (RAY_NOTES P3, §2)."""
    rows = train_dataset(location).materialize()
    if world <= 1:
        return {"train_0": rows}
    return {f"train_{r}": rows.map_batches(_ShardFilter(r, world), batch_format="numpy", num_cpus=0.25).materialize()
            for r in range(world)}


# ------------------------------------------------------------------ features

class _RowRange:
    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, batch):
        import pyarrow.compute as pc
        item = batch.column("item")
        return batch.filter(pc.and_(pc.greater_equal(item, self.lo), pc.less(item, self.hi)))


def feature_datasets(location: str, manifest: dict, modalities: list[str], num_items: int, world: int,
                     sharded: bool) -> dict:
    """Per worker and modality, a materialised Ray Dataset of the feature rows of its item block
    (`feat_<modality>_<rank>`). Each is read from the table and filtered to the block's rows before it
    is materialised, so the object store and each worker hold only those rows (the read itself
    scans the table once per worker)."""
    import ray.data
    out = {}
    for m in modalities:
        uri = storage.join(location, manifest["modalities"][m]["file"])
        for r in range(max(world, 1)):
            lo, hi = item_block(num_items, world, r, sharded)
            ds = ray.data.read_parquet(uri, columns=["item", "feature"], num_cpus=0.25)
            if (lo, hi) != (0, num_items):
                ds = ds.map_batches(_RowRange(lo, hi), batch_format="pyarrow", num_cpus=0.25)
            out[f"feat_{m}_{r}"] = ds.materialize()
    return out


def rows_from_batches(batches, lo: int, hi: int, dim: int, where: str) -> np.ndarray:
    """Assemble feature rows [lo, hi) from pyarrow batches of (item, feature); every row once."""
    out = np.empty((hi - lo, dim), np.float32)
    got = np.zeros(hi - lo, bool)
    for b in batches:
        items = b.column("item").to_numpy().astype(np.int64) - lo
        if len(items) and (items.min() < 0 or items.max() >= hi - lo or got[items].any()
                           or len(np.unique(items)) != len(items)):
            raise RuntimeError(f"{where}: rows outside this worker's item block [{lo}, {hi}) or given twice "
                               "(the driver cut the features for another configuration)")
        col = b.column("feature")
        col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
        vals = col.flatten().to_numpy(zero_copy_only=False).reshape(len(items), -1)
        out[items] = vals
        got[items] = True
    if not got.all():
        raise RuntimeError(f"{where}: {int((~got).sum())} of the item rows [{lo}, {hi}) are missing")
    return out


@dataclass
class Ingest:
    """What the driver hands to build_trainer: the Ray Datasets and the object-store reference to
    the WorkerInputs (one build, shared by every trial of a search)."""

    datasets: dict
    inputs_ref: object
    world: int
    feature_bytes_per_worker: list[int]


def used_modalities(inputs: WorkerInputs, cfg) -> dict[str, int]:
    """The modalities whose features a worker loads: all of the dataset's, unless ID-only."""
    return dict(inputs.features) if cfg.model.use_content else {}


def build_ingest(ds, cfg, graphs, world: int, log=print, content: bool | None = None) -> Ingest:
    """Read and cut everything the workers need (see the module docstring); `world` counts the
    workers of one training run; `content` (default: cfg.model.use_content) whether to ship the
    feature tables (a search ships them whenever any trial may use them)."""
    import ray
    world = max(world, 1)
    inputs = worker_inputs(ds, cfg, graphs)
    sharded = bool(cfg.train.shard_item_work) and world > 1
    mods = list(inputs.features) if (cfg.model.use_content if content is None else content) else []
    datasets = shard_datasets(inputs.location, world)
    datasets.update(feature_datasets(inputs.location, ds.manifest, mods, inputs.num_items, world, sharded))
    for d in datasets.values():  # each worker reads these once: its progress bars would only
        d.context.enable_progress_bars = False  # repeat a line per dataset, with terminal escapes
    per_worker = []
    for r in range(world):
        lo, hi = item_block(inputs.num_items, world, r, sharded)
        per_worker.append(sum((hi - lo) * inputs.features[m] * 4 for m in mods))
    if mods:
        log(f"features per worker: {', '.join(f'{b / 2**20:.1f} MiB' for b in per_worker)} "
            f"({'item blocks' if sharded else 'every item'}); shared inputs {inputs.nbytes / 2**20:.1f} MiB")
    return Ingest(datasets, ray.put(inputs), world, per_worker)
