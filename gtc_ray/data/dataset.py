"""The gtc-ray dataset format: a directory of Parquet tables plus a JSON manifest.

    DIR/manifest.json              format version, counts, split scheme, modalities, provenance, hashes
    DIR/interactions.parquet       user:int32, item:int32, split:int8 (0 train, 1 valid, 2 test)
                                   [, timestamp:int64] [, rating:float32]
    DIR/features/<modality>.parquet item:int32, feature:fixed_size_list<float32>[dim]   (one per modality)
    DIR/users.parquet, items.parquet   index:int32, raw_id:string   (maps back to the raw ids)
    DIR/prepared/<key>/            graphs built by `gtc-ray prepare` (see prepare.py)

DIR is a location (gtc_ray.storage): a local path or a URI (`s3://bucket/ml100k`, `gs://...`,
`file://...`, any fsspec scheme). `write_dataset` validates everything first, builds the dataset
in a local staging directory and publishes it with `storage.publish_dir`: renamed into place
locally; on an object store uploaded with manifest.json last (the commit), the old manifest
deleted first. A reader that finds manifest.json therefore never sees half a dataset, and a
location with files but no manifest is an interrupted import (read_manifest says so).
`load_dataset` re-checks the content hashes (streamed from the file system) and the tables, so a
file edited after import is caught before training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gtc_ray import storage
from gtc_ray.errors import GtcInputError

FORMAT = "gtc-ray-dataset"
VERSION = 1
SPLITS = ("train", "valid", "test")
HASHED_FILES = ("interactions.parquet", "users.parquet", "items.parquet")


@dataclass
class Dataset:
    """An in-memory dataset: contiguous 0-based user and item indices."""

    users: np.ndarray  # int32 [N]
    items: np.ndarray  # int32 [N]
    split: np.ndarray  # int8 [N]
    num_users: int
    num_items: int
    features: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float32 [num_items, dim]
    timestamps: np.ndarray | None = None
    ratings: np.ndarray | None = None
    user_ids: np.ndarray | None = None  # raw ids (str) by index
    item_ids: np.ndarray | None = None
    manifest: dict = field(default_factory=dict)
    path: str | None = None  # the normalized location (storage.normalize): absolute local path or URI

    def split_mask(self, name: str) -> np.ndarray:
        return self.split == SPLITS.index(name)

    def split_pairs(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        m = self.split_mask(name)
        return self.users[m], self.items[m]

    @property
    def content_hash(self) -> str:
        return self.manifest.get("content_hash", "")


# ----------------------------------------------------------------------------------------- checks

def _examples(mask: np.ndarray, *cols: np.ndarray, n: int = 3) -> list[str]:
    rows = np.flatnonzero(mask)[:n]
    return [f"row {r}: " + "/".join(str(c[r]) for c in cols) for r in rows]


def validate_arrays(ds: Dataset, source: str) -> dict:
    """Check a dataset's invariants. Returns per-split counts. Raises GtcInputError naming `source`."""
    inter = f"{source}/interactions"
    n = len(ds.users)
    if not (len(ds.items) == n == len(ds.split)):
        raise GtcInputError(inter, "columns user, item and split have different lengths",
                            "rebuild the table so that every row has a user, an item and a split")
    if n == 0:
        raise GtcInputError(inter, "has no rows", "import a non-empty interaction table")
    for col, arr, count, what in (("user", ds.users, ds.num_users, "users"), ("item", ds.items, ds.num_items, "items")):
        bad = (arr < 0) | (arr >= count)
        if bad.any():
            raise GtcInputError(f"{inter}, column {col!r}", f"{int(bad.sum())} ids out of range [0, {count})",
                                f"ids must be 0-based and below the number of {what} ({count}); re-import "
                                "with `gtc-ray data import`, which re-indexes raw ids",
                                _examples(bad, ds.users, ds.items))
        present = np.bincount(arr, minlength=count) > 0
        if not present.all():
            missing = np.flatnonzero(~present)
            raise GtcInputError(f"{inter}, column {col!r}",
                                f"ids are not contiguous: {len(missing)} of {count} {what} have no interaction",
                                "re-index ids to 0..n-1 (`gtc-ray data import` does this) or drop those "
                                f"{what} from the feature tables", [f"{col} {m}" for m in missing[:5]])
    bad = ~np.isin(ds.split, (0, 1, 2))
    if bad.any():
        raise GtcInputError(f"{inter}, column 'split'", "labels must be 0 (train), 1 (valid) or 2 (test)",
                            "relabel the split column", _examples(bad, ds.split))
    key = ds.users.astype(np.int64) * ds.num_items + ds.items
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    if len(uniq) != n:
        dup = np.zeros(n, bool)
        dup[np.setdiff1d(np.arange(n), first)] = True
        raise GtcInputError(inter, f"{n - len(uniq)} duplicate (user, item) pairs",
                            "keep one row per pair (the generic importer's --dedup keeps the earliest)",
                            _examples(dup, ds.users, ds.items))
    counts_by_split = {s: int((ds.split == i).sum()) for i, s in enumerate(SPLITS)}
    for s, c in counts_by_split.items():
        if c == 0:
            raise GtcInputError(inter, f"the {s} split is empty",
                                "give every split rows (re-split with `gtc-ray data import --split random`)")
    for name, f in ds.features.items():
        check_features(f"{source}/features/{name}", f, ds.num_items,
                       ds.manifest.get("modalities", {}).get(name, {}).get("dim"))
    return counts_by_split


def check_features(where: str, f: np.ndarray, num_items: int, dim: int | None = None) -> None:
    """One finite row per item (and the manifest's width, when given)."""
    if f.ndim != 2 or f.shape[0] != num_items:
        raise GtcInputError(where, f"has {f.shape[0] if f.ndim else 0} rows for {num_items} items",
                            "provide exactly one feature row per item index")
    finite = np.isfinite(f).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise GtcInputError(where, f"{len(bad)} rows contain NaN or infinite values",
                            "fix or impute those rows (e.g. with the mean feature vector)",
                            [f"item {b}" for b in bad[:5]])
    if dim is not None and f.shape[1] != dim:
        raise GtcInputError(where, f"width {f.shape[1]} differs from the manifest's {dim}",
                            "re-import the features or fix manifest.json")


# ----------------------------------------------------------------------------------------- write

def sha256_file(loc) -> str:
    """sha256 of a file at a location (local path or URI), streamed from its file system."""
    fs, p = storage.filesystem(loc)
    h = hashlib.sha256()
    with fs.open_input_stream(p) as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_hash(hashes: dict) -> str:
    """The dataset's identity: a hash over every table's sha256 (keys prepared graphs, checkpoints)."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]


def file_uri(ds_or_location, rel: str) -> str:
    """Where one file of a dataset lives, as `ray.data.read_parquet` (or pyarrow) accepts it: an
    absolute local path, or a URI for a dataset on an object store.

        file_uri(ds, "interactions.parquet")
        file_uri(ds, ds.manifest["modalities"]["image"]["file"])
        file_uri("s3://bucket/ml100k", "items.parquet")     # -> "s3://bucket/ml100k/items.parquet"
    """
    loc = ds_or_location.path if isinstance(ds_or_location, Dataset) else ds_or_location
    if loc is None:
        raise ValueError("this Dataset was not loaded from a location (its path is None)")
    return storage.join(loc, rel)


def _io_error(loc, e: BaseException, doing: str) -> GtcInputError:
    return GtcInputError(f"dataset {loc}", f"cannot be {doing} ({storage.describe_error(loc, e)})",
                         "check the path or URI, and for an object store its credentials and endpoint "
                         "(the standard AWS_* variables for S3)")


def _refuse_bucket_root(out: str) -> None:
    if storage.is_uri(out) and "/" not in out.split("://", 1)[1].strip("/"):
        raise GtcInputError(f"output {out}", "is the root of a bucket or container",
                            f"write the dataset under a prefix, e.g. {out.rstrip('/')}/mydata")


def replace_modality(path, modality: str, features: np.ndarray, provenance: dict) -> dict:
    """Add or replace one modality's feature table, atomically for readers of manifest.json.

    Local: the new dataset version is built in a sibling directory (unchanged files hard-linked)
    and swapped in with renames. Object store: only the new table and manifest are built locally;
    the old manifest is deleted before the new table is uploaded, and the new manifest is written
    last (storage.publish_files), so no reader sees a manifest that does not match the files."""
    loc = storage.normalize(path)
    manifest = read_manifest(loc)
    check_features(f"features for {modality}", features, manifest["num_items"])
    rel = f"features/{modality}.parquet"
    lp = storage.local_path(loc)
    tmp = storage.staging_dir(loc)
    try:
        if lp is not None:
            for src in lp.rglob("*"):
                dst = tmp / src.relative_to(lp)
                if src.is_dir():
                    dst.mkdir(parents=True, exist_ok=True)
                elif src.name != "manifest.json" and src.relative_to(lp).as_posix() != rel:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.link(src, dst)
        (tmp / "features").mkdir(exist_ok=True)
        pq.write_table(_features_table(features), tmp / rel)
        manifest["modalities"][modality] = {"dim": int(features.shape[1]), "file": rel}
        manifest["hashes"][rel] = sha256_file(tmp / rel)
        manifest["content_hash"] = content_hash(manifest["hashes"])
        manifest.setdefault("provenance", {}).setdefault("features", {})[modality] = provenance
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if lp is not None:
            storage.publish_dir(tmp, loc, commit="manifest.json")
        else:
            storage.publish_files(tmp, loc, commit="manifest.json")
    except OSError as e:
        raise GtcInputError(f"dataset {loc}", f"could not be updated ({storage.describe_error(loc, e)})",
                            "check the store's credentials; if it now has no manifest.json, re-import it with "
                            "--overwrite and add the modality again") from e
    return manifest


def _features_table(f: np.ndarray) -> pa.Table:
    f = np.ascontiguousarray(f, dtype=np.float32)
    flat = pa.array(f.reshape(-1), type=pa.float32())
    col = pa.FixedSizeListArray.from_arrays(flat, f.shape[1])
    return pa.table({"item": pa.array(np.arange(f.shape[0], dtype=np.int32)), "feature": col})


def _id_table(raw: np.ndarray | None, n: int) -> pa.Table:
    raw = np.arange(n).astype(str) if raw is None else np.asarray(raw).astype(str)
    return pa.table({"index": pa.array(np.arange(n, dtype=np.int32)), "raw_id": pa.array(raw, pa.string())})


def _exists(loc: str) -> bool:
    """Anything at a location: a file, a directory, or (object stores) a prefix with objects."""
    try:
        return storage.exists(loc) or (storage.is_uri(loc) and storage.is_dir(loc))
    except OSError as e:
        raise _io_error(loc, e, "reached") from e


def write_dataset(ds: Dataset, out, *, name: str, split_scheme: str, provenance: dict,
                  overwrite: bool = False) -> dict:
    """Validate, then write `ds` atomically to `out` (a local path or URI). Returns the manifest."""
    out = storage.normalize(out)
    _refuse_bucket_root(out)
    if _exists(out) and not overwrite:
        raise GtcInputError(f"output {out}", "already exists", "choose a new directory or pass --overwrite")
    counts = validate_arrays(ds, out)
    tmp = storage.staging_dir(out)
    try:
        cols = {"user": pa.array(ds.users.astype(np.int32)), "item": pa.array(ds.items.astype(np.int32)),
                "split": pa.array(ds.split.astype(np.int8))}
        if ds.timestamps is not None:
            cols["timestamp"] = pa.array(ds.timestamps.astype(np.int64))
        if ds.ratings is not None:
            cols["rating"] = pa.array(ds.ratings.astype(np.float32))
        pq.write_table(pa.table(cols), tmp / "interactions.parquet")
        pq.write_table(_id_table(ds.user_ids, ds.num_users), tmp / "users.parquet")
        pq.write_table(_id_table(ds.item_ids, ds.num_items), tmp / "items.parquet")
        (tmp / "features").mkdir()
        modalities = {}
        for m, f in ds.features.items():
            pq.write_table(_features_table(f), tmp / "features" / f"{m}.parquet")
            modalities[m] = {"dim": int(f.shape[1]), "file": f"features/{m}.parquet"}
        hashes = {p: sha256_file(tmp / p) for p in HASHED_FILES}
        hashes.update({v["file"]: sha256_file(tmp / v["file"]) for v in modalities.values()})
        content = content_hash(hashes)
        manifest = {
            "format": FORMAT, "version": VERSION, "name": name,
            "num_users": ds.num_users, "num_items": ds.num_items, "num_interactions": int(len(ds.users)),
            "splits": counts, "split_scheme": split_scheme, "modalities": modalities,
            "has_timestamp": ds.timestamps is not None, "has_rating": ds.ratings is not None,
            "provenance": {**provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "hashes": hashes, "content_hash": content,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # local: renames (an old copy is moved aside first, so a crash leaves one complete copy);
    # object store: old manifest deleted first, stale objects removed, manifest uploaded last
    try:
        storage.publish_dir(tmp, out, commit="manifest.json")
    except OSError as e:
        raise GtcInputError(f"output {out}", f"could not be written ({storage.describe_error(out, e)}); it holds "
                            "no manifest.json, so no reader will take it for a dataset",
                            "check the path or URI and the store's credentials (AWS_* for S3), then re-run "
                            "with --overwrite") from e
    return manifest


# ----------------------------------------------------------------------------------------- read

def read_manifest(path) -> dict:
    """The manifest of the dataset at a location (local path or URI), checked."""
    loc = storage.normalize(path)
    mf = storage.join(loc, "manifest.json")
    try:
        found = storage.is_file(mf)
        # only an object store can hold part of a dataset (a local one is renamed into place whole):
        # elsewhere a directory without a manifest is simply not a dataset, and must not be overwritten
        leftovers = [] if found or not storage.is_uri(loc) else storage.listdir(loc)
    except OSError as e:
        raise _io_error(loc, e, "read") from e
    if not found:
        if leftovers:
            raise GtcInputError(f"dataset {loc}", "has files but no manifest.json: an import into it was "
                                "interrupted (the manifest is written last), or it is not a gtc-ray dataset",
                                "re-run the import (`gtc-ray data import-mmrec`, `gtc-ray data import` or "
                                "`gtc-ray data synth`) into it with --overwrite",
                                leftovers[:5])
        raise GtcInputError(f"dataset {loc}", "has no manifest.json (not a gtc-ray dataset directory)",
                            "create one with `gtc-ray data import-mmrec`, `gtc-ray data import` or `gtc-ray data synth`")
    try:
        manifest = json.loads(storage.read_text(mf))
    except json.JSONDecodeError as e:
        raise GtcInputError(mf, f"is not valid JSON ({e})", "re-import the dataset") from e
    except OSError as e:
        raise _io_error(loc, e, "read") from e
    if not isinstance(manifest, dict):
        raise GtcInputError(mf, "is not a JSON object", "re-import the dataset")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise GtcInputError(mf, f"format {manifest.get('format')!r} version {manifest.get('version')!r} "
                            f"is not {FORMAT!r} version {VERSION}", "re-import the dataset with this gtc-ray")
    for k in ("num_users", "num_items", "modalities", "hashes", "splits"):
        if k not in manifest:
            raise GtcInputError(mf, f"is missing the field {k!r}", "re-import the dataset")
    return manifest


def verify_hashes(path, manifest: dict) -> None:
    """Re-hash every file the manifest lists (streamed from its file system)."""
    for rel, expected in manifest["hashes"].items():
        p = storage.join(path, rel)
        if not storage.is_file(p):
            raise GtcInputError(p, "is listed in manifest.json but missing", "re-import the dataset")
        if sha256_file(p) != expected:
            raise GtcInputError(p, "content no longer matches the hash in manifest.json (edited or corrupted "
                                "after import)", "re-import the dataset rather than editing its files")


def _read_parquet(loc: str) -> pa.Table:
    try:
        with storage.open_input(loc) as f:
            return pq.read_table(f)
    except FileNotFoundError as e:
        raise GtcInputError(loc, "is missing", "re-import the dataset") from e
    except pa.ArrowInvalid as e:
        raise GtcInputError(loc, f"is not a readable Parquet table ({e})", "re-import the dataset") from e


def _require_columns(table: pa.Table, where: str, required: dict) -> None:
    for col, pred in required.items():
        if col not in table.column_names:
            raise GtcInputError(where, f"missing column {col!r} (has {table.column_names})",
                                f"add the column {col!r} or re-import the dataset")
        if not pred(table.schema.field(col).type):
            raise GtcInputError(where, f"column {col!r} has type {table.schema.field(col).type}",
                                f"store {col!r} as an integer column")


def read_features(path, name: str, info: dict, num_items: int) -> np.ndarray:
    where = storage.join(path, info["file"])
    t = _read_parquet(where)
    _require_columns(t, where, {"item": pa.types.is_integer, "feature": lambda ty: True})
    ftype = t.schema.field("feature").type
    if not (pa.types.is_fixed_size_list(ftype) or pa.types.is_list(ftype) or pa.types.is_large_list(ftype)):
        raise GtcInputError(where, f"column 'feature' has type {ftype}", "store features as a list<float32> column")
    col = t.column("feature").combine_chunks()
    if pa.types.is_fixed_size_list(ftype):
        f = col.values.to_numpy(zero_copy_only=False).reshape(len(t), ftype.list_size)
    else:
        lens = np.unique(col.value_lengths().to_numpy(zero_copy_only=False))
        if len(lens) != 1:
            raise GtcInputError(where, f"rows have different widths {lens[:5].tolist()}",
                                "give every item a feature vector of the same width")
        f = col.flatten().to_numpy(zero_copy_only=False).reshape(len(t), int(lens[0]))
    items = t.column("item").to_numpy()
    if len(items) != num_items or not np.array_equal(np.sort(items), np.arange(num_items)):
        missing = np.setdiff1d(np.arange(num_items), items)
        raise GtcInputError(where, f"rows do not cover every item exactly once ({len(items)} rows for "
                            f"{num_items} items, {len(missing)} items missing)",
                            "provide one feature row per item", [f"item {m}" for m in missing[:5]])
    out = np.empty((num_items, f.shape[1]), np.float32)
    out[items] = f
    return out


def load_dataset(path, *, verify: bool = True, modalities: list[str] | None = None) -> Dataset:
    """Read and check a dataset at a location (local path or URI). `verify` re-hashes the files
    against the manifest. The result's `path` is the normalized location (a str)."""
    path = storage.normalize(path)
    manifest = read_manifest(path)
    if verify:
        verify_hashes(path, manifest)
    where = storage.join(path, "interactions.parquet")
    t = _read_parquet(where)
    _require_columns(t, where, {"user": pa.types.is_integer, "item": pa.types.is_integer,
                                "split": pa.types.is_integer})
    feats = {}
    for name, info in manifest["modalities"].items():
        if modalities is None or name in modalities:
            feats[name] = read_features(path, name, info, manifest["num_items"])
    ids = {}
    for kind in ("users", "items"):
        p = storage.join(path, f"{kind}.parquet")
        ids[kind] = _read_parquet(p).column("raw_id").to_numpy(zero_copy_only=False) if storage.is_file(p) else None
    ds = Dataset(
        users=t.column("user").to_numpy().astype(np.int32), items=t.column("item").to_numpy().astype(np.int32),
        split=t.column("split").to_numpy().astype(np.int8), num_users=manifest["num_users"],
        num_items=manifest["num_items"], features=feats,
        timestamps=t.column("timestamp").to_numpy() if "timestamp" in t.column_names else None,
        ratings=t.column("rating").to_numpy() if "rating" in t.column_names else None,
        user_ids=ids["users"], item_ids=ids["items"], manifest=manifest, path=path)
    validate_arrays(ds, path)
    return ds


def describe(path) -> dict:
    """A summary of a dataset (what `gtc-ray data describe` prints)."""
    ds = load_dataset(path)
    m = ds.manifest
    train_u, _ = ds.split_pairs("train")
    per_user = np.bincount(train_u, minlength=ds.num_users)
    return {
        "path": ds.path, "name": m["name"], "num_users": ds.num_users, "num_items": ds.num_items,
        "num_interactions": m["num_interactions"], "splits": m["splits"], "split_scheme": m["split_scheme"],
        "modalities": {k: v["dim"] for k, v in m["modalities"].items()},
        "density": m["num_interactions"] / (ds.num_users * ds.num_items),
        "train_per_user": {"min": int(per_user.min()), "median": float(np.median(per_user)),
                           "max": int(per_user.max())},
        "content_hash": m["content_hash"], "provenance": m["provenance"],
    }
