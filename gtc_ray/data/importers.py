"""Importers: MMRec folders and generic raw tables -> the gtc-ray dataset format.

MMRec folder (spec §1): `<name>.inter` (TSV: userID itemID [rating] [timestamp] x_label), one
`<modality>_feat.npy` per modality, optional `u_id_mapping.csv` / `i_id_mapping.csv`.
`user_graph_dict.npy` is never read: it is a pickle, and `gtc-ray prepare` rebuilds that graph.

Generic tables: interactions (Parquet/CSV/TSV with raw user and item ids, optional timestamp and
rating) plus one feature table per modality keyed by raw item id. Steps: drop rows with missing
ids, optional de-duplication, iterative k-core, contiguous re-indexing, then a seeded split.

The raw inputs are local files; the output `out` is a location (gtc_ray.storage): a local path or
a URI such as `s3://bucket/ml100k`, published with its manifest last (see dataset.write_dataset).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from gtc_ray import storage
from gtc_ray.data.dataset import Dataset, write_dataset
from gtc_ray.errors import GtcInputError


# ----------------------------------------------------------------------------------------- splits

def split_random_per_user(users: np.ndarray, seed: int, order: np.ndarray | None = None) -> np.ndarray:
    """MMRec's per-user rule (spec §2.2), seeded and stable (fixes B12).

    Per user with n rows in a (seeded random, or given) order: n < 10 -> [0]*(n-2)+[1]+[2];
    otherwise vt = int(0.2 n), val = vt // 2, test = vt - val, labels [0]*(n-vt)+[1]*val+[2]*test.
    """
    n = len(users)
    if order is None:
        order = np.random.default_rng(seed).permutation(n)
    order = order[np.argsort(users[order], kind="stable")]  # group by user, keep the order inside
    u_sorted = users[order]
    starts = np.r_[0, np.flatnonzero(np.diff(u_sorted)) + 1]
    counts = np.diff(np.r_[starts, n])
    pos = np.arange(n) - np.repeat(starts, counts)  # rank of the row within its user
    cnt = np.repeat(counts, counts)
    vt = np.where(cnt < 10, 2, (0.2 * cnt).astype(np.int64))
    val = np.where(cnt < 10, 1, vt // 2)
    label = np.zeros(n, np.int8)
    label[pos >= cnt - vt] = 1
    label[pos >= cnt - vt + val] = 2
    label[cnt < 3] = 0  # too few rows to hold out anything
    out = np.empty(n, np.int8)
    out[order] = label
    return out


def split_chronological(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """The same per-user counts as the random rule, with the latest rows held out."""
    order = np.lexsort((np.arange(len(users)), timestamps))
    return split_random_per_user(users, 0, order=order)


def drop_cold_eval_rows(users: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Mask of rows to keep: valid/test rows of users with no train row are dropped (spec §1)."""
    has_train = np.zeros(users.max() + 1, bool)
    has_train[users[split == 0]] = True
    return (split == 0) | has_train[users]


def kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Iterative k-core (spec §2.1): a mask of rows whose user and item both keep >= k rows."""
    keep = np.ones(len(users), bool)
    if k <= 1:
        return keep
    while True:
        uc = np.bincount(users[keep], minlength=users.max() + 1)
        ic = np.bincount(items[keep], minlength=items.max() + 1)
        new = keep & (uc[users] >= k) & (ic[items] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


# ----------------------------------------------------------------------------------------- tables

def _local_source(path: str | Path, what: str) -> Path:
    """A raw input file or folder: a local path (file:// accepted); other URIs are refused clearly."""
    if storage.is_uri(path):
        if not storage.is_local(path):
            raise GtcInputError(f"{what} {path}", "is a remote URI; raw import inputs must be local files",
                                "copy it to a local path first (only the output dataset may be a URI)")
        return storage.local_path(path)
    return Path(path)


def read_table(path: str | Path, what: str) -> pa.Table:
    """Parquet, CSV or TSV by extension (delimiter sniffed for .csv/.txt)."""
    p = _local_source(path, what)
    if not p.is_file():
        raise GtcInputError(f"{what} {p}", "does not exist", "check the path")
    suf = p.suffix.lower()
    try:
        if suf in (".parquet", ".pq"):
            return pq.read_table(p)
        if suf in (".csv", ".tsv", ".txt", ".inter"):
            with open(p, newline="") as fh:
                head = fh.readline()
            delim = "\t" if "\t" in head else ","
            return pacsv.read_csv(p, parse_options=pacsv.ParseOptions(delimiter=delim))
    except (pa.ArrowInvalid, OSError) as e:
        raise GtcInputError(f"{what} {p}", f"cannot be parsed ({e})", "fix the file's format") from e
    raise GtcInputError(f"{what} {p}", f"has an unknown extension {suf!r}", "use .parquet, .csv or .tsv")


def _column(t: pa.Table, name: str, where: str, integer: bool = False) -> np.ndarray:
    if name not in t.column_names:
        raise GtcInputError(where, f"missing column {name!r} (columns: {t.column_names})",
                            "add the column or name the right one with the matching --*-column option")
    col = t.column(name)
    if integer and not pa.types.is_integer(col.type):
        raise GtcInputError(where, f"column {name!r} has type {col.type}, not integer",
                            f"store {name!r} as 0-based integers")
    return col.to_numpy(zero_copy_only=False)


def _read_id_map(path: Path, n: int) -> np.ndarray | None:
    """u_id_mapping.csv / i_id_mapping.csv: (raw id, index) pairs -> raw ids by index."""
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t" if "\t" in fh.readline() else ","))
    raw = np.array([str(i) for i in range(n)], dtype=object)
    for r in rows:
        if len(r) >= 2 and r[1].strip().lstrip("-").isdigit() and 0 <= int(r[1]) < n:
            raw[int(r[1])] = r[0]
    return raw


def import_mmrec(src: str | Path, out, *, overwrite: bool = False, dedup: bool = False,
                 log=print) -> dict:
    """Import an MMRec folder (see module docstring). Returns the manifest.

    dedup: keep the first row (in file order) of each duplicate (user, item) pair; without it
    duplicates are an error. Every check runs before anything is written."""
    src = _local_source(src, "MMRec folder")
    if not src.is_dir():
        raise GtcInputError(f"MMRec folder {src}", "does not exist", "pass the folder holding <name>.inter")
    inters = sorted(src.glob("*.inter"))
    if len(inters) != 1:
        raise GtcInputError(f"MMRec folder {src}", f"has {len(inters)} .inter files ({[p.name for p in inters]})",
                            "keep exactly one <name>.inter file in the folder")
    inter = inters[0]
    log(f"reading {inter}")
    t = read_table(inter, "interaction file")
    where = str(inter)
    users = _column(t, "userID", where, integer=True)
    items = _column(t, "itemID", where, integer=True)
    split = _column(t, "x_label", where, integer=True)
    ts = _column(t, "timestamp", where).astype(np.int64) if "timestamp" in t.column_names else None
    rating = _column(t, "rating", where).astype(np.float32) if "rating" in t.column_names else None
    feats = {}
    for f in sorted(src.glob("*_feat.npy")):
        name = f.name[: -len("_feat.npy")]
        try:
            arr = np.load(f, allow_pickle=False)  # never unpickle user files
        except ValueError as e:
            raise GtcInputError(str(f), f"cannot be read as a plain numeric array ({e})",
                                "save it with np.save on a float array") from e
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise GtcInputError(str(f), f"has shape {arr.shape} dtype {arr.dtype}",
                                "save a 2-D float array [num_items, dim]")
        arr = arr.astype(np.float32)  # spec P9: float64 image files are cast once here
        # name the user's file here: the dataset's own check would name <out>/features/<name>
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise GtcInputError(str(f), f"{len(bad)} of {arr.shape[0]} rows contain NaN or infinite values "
                                f"(first bad item row {int(bad[0])})",
                                f"replace those rows with finite values (e.g. the mean of the other rows) and "
                                f"save {f.name} again", [f"item row {b}" for b in bad[:5]])
        feats[name] = arr
        log(f"  modality {name}: {arr.shape[0]} x {arr.shape[1]}")
    if not feats:
        log("  warning: no <modality>_feat.npy found; the dataset is ID-only")
    # spec §1: user_num = max(userID)+1, item_num = max(itemID)+1 over the whole file
    num_users = int(users.max()) + 1 if len(users) else 0
    num_items = int(items.max()) + 1 if len(items) else 0
    for name, arr in feats.items():
        if arr.shape[0] != num_items:
            raise GtcInputError(str(src / f"{name}_feat.npy"), f"has {arr.shape[0]} rows but the interactions "
                                f"name {num_items} items", "provide one feature row per item id (0..max itemID)")
    # duplicate (user, item) pairs: the first row in file order is the one kept with --dedup
    _, first_idx = np.unique(np.stack([users, items], 1).reshape(-1, 2), axis=0, return_index=True)  # exact, even for bad ids
    first = np.zeros(len(users), bool)
    first[first_idx] = True
    n_dup = int((~first).sum())
    if n_dup and not dedup:
        dup = np.flatnonzero(~first)[:3]
        raise GtcInputError(where, f"{n_dup} duplicate (user, item) pairs",
                            "pass --dedup to `gtc-ray data import-mmrec` (dedup=True) to keep the first row of "
                            "each pair in file order", [f"row {d}: user {users[d]}, item {items[d]}" for d in dup])
    if n_dup:
        log(f"  dropped {n_dup} duplicate (user, item) rows (first in file order kept)")
    keep = first.copy()
    if len(users):
        keep[first] = drop_cold_eval_rows(users[first], split[first])
    dropped = int((~keep).sum()) - n_dup
    if dropped:
        log(f"  dropped {dropped} valid/test rows of users with no training row")
    sel = lambda a: None if a is None else a[keep]
    ds = Dataset(users=users[keep].astype(np.int32), items=items[keep].astype(np.int32),
                 split=split[keep].astype(np.int8), num_users=num_users, num_items=num_items,
                 features=feats, timestamps=sel(ts), ratings=sel(rating),
                 user_ids=_read_id_map(src / "u_id_mapping.csv", num_users),
                 item_ids=_read_id_map(src / "i_id_mapping.csv", num_items))
    return write_dataset(ds, out, name=inter.stem, split_scheme="given (MMRec x_label)",
                         provenance={"importer": "mmrec", "source": str(src.absolute()),
                                     "dropped_cold_eval_rows": dropped, "dedup": dedup,
                                     "dropped_duplicate_rows": n_dup},
                         overwrite=overwrite)


def _feature_matrix(t: pa.Table, id_col: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A feature table: an id column plus one list column, or plus numeric columns."""
    ids = _column(t, id_col, where).astype(str)
    rest = [c for c in t.column_names if c != id_col]
    lists = [c for c in rest if pa.types.is_list(t.schema.field(c).type)
             or pa.types.is_fixed_size_list(t.schema.field(c).type) or pa.types.is_large_list(t.schema.field(c).type)]
    if len(lists) == 1:
        col = t.column(lists[0]).combine_chunks()
        lens = np.unique(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if len(lens) != 1:
            raise GtcInputError(where, f"feature vectors have different widths {lens[:5].tolist()}",
                                "give every item a vector of the same width")
        mat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(t), int(lens[0]))
    else:
        num = [c for c in rest if pa.types.is_floating(t.schema.field(c).type) or pa.types.is_integer(t.schema.field(c).type)]
        if not num or len(num) != len(rest):
            raise GtcInputError(where, f"needs one list column or only numeric columns beside {id_col!r} "
                                f"(columns: {t.column_names})", "store the vector as a list column 'feature'")
        mat = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in num], 1).astype(np.float32)
    return ids, mat


def import_tables(interactions: str | Path, out, *, features: dict[str, str] | None = None,
                  user_col: str = "user_id", item_col: str = "item_id", time_col: str | None = "timestamp",
                  rating_col: str | None = "rating", feature_id_col: str = "item_id", kcore_k: int = 5,
                  split: str = "random", seed: int = 2026, dedup: bool = False, fill_missing: str | None = None,
                  overwrite: bool = False, log=print) -> dict:
    """Import raw tables (see module docstring). Returns the manifest."""
    if split not in ("random", "chrono"):
        raise GtcInputError("--split", f"unknown split {split!r}", "use 'random' or 'chrono'")
    interactions = _local_source(interactions, "interaction table")
    features = {k: str(_local_source(v, f"feature table {k}")) for k, v in (features or {}).items()}
    t = read_table(interactions, "interaction table")
    where = str(interactions)
    raw_u = _column(t, user_col, where)
    raw_i = _column(t, item_col, where)
    has_t = time_col is not None and time_col in t.column_names
    has_r = rating_col is not None and rating_col in t.column_names
    if split == "chrono" and not has_t:
        raise GtcInputError(where, f"--split chrono needs a timestamp column {time_col!r}",
                            "name it with --time-column or use --split random")
    ts = _column(t, time_col, where).astype(np.int64) if has_t else None
    rt = _column(t, rating_col, where).astype(np.float32) if has_r else None
    ok = ~(_isnull(raw_u) | _isnull(raw_i))
    log(f"read {len(raw_u)} rows from {where}; {int((~ok).sum())} with missing ids dropped")
    raw_u, raw_i = raw_u[ok].astype(str), raw_i[ok].astype(str)
    ts = ts[ok] if ts is not None else None
    rt = rt[ok] if rt is not None else None
    # features first: items without content are dropped or imputed before k-core
    feat_raw = {}
    for name, fpath in (features or {}).items():
        ids, mat = _feature_matrix(read_table(fpath, f"feature table {name}"), feature_id_col, str(fpath))
        if not np.isfinite(mat).all():
            bad = ids[~np.isfinite(mat).all(1)]
            raise GtcInputError(str(fpath), f"{len(bad)} rows contain NaN or infinite values",
                                "fix or drop those rows", [f"item {b}" for b in bad[:5]])
        feat_raw[name] = (ids, mat)
        log(f"  modality {name}: {mat.shape[0]} x {mat.shape[1]} from {fpath}")
    _, ui = np.unique(raw_u, return_inverse=True)
    uniq_i, ii = np.unique(raw_i, return_inverse=True)
    key = ui.astype(np.int64) * len(uniq_i) + ii
    order = np.lexsort((np.arange(len(key)), ts if ts is not None else np.zeros(len(key)), key))
    first = np.ones(len(key), bool)
    first[order[1:]] = key[order[1:]] != key[order[:-1]]
    if not first.all():
        if not dedup:
            dup = np.flatnonzero(~first)[:3]
            raise GtcInputError(where, f"{int((~first).sum())} duplicate (user, item) rows",
                                "pass --dedup to keep the earliest row of each pair",
                                [f"{raw_u[d]}/{raw_i[d]}" for d in dup])
        log(f"  {int((~first).sum())} duplicate (user, item) rows dropped (earliest kept)")
    keep = first
    for name, (ids, _) in feat_raw.items():
        has = np.isin(raw_i, ids)
        if (~has & keep).any() and fill_missing != "mean":
            miss = np.unique(raw_i[~has])
            raise GtcInputError(f"feature table {name}", f"{len(miss)} interacted items have no feature row",
                                "add rows for them, or pass --fill-missing mean", list(miss[:5]))
    ui, ii = ui[keep], ii[keep]
    core = kcore(ui, ii, kcore_k)
    log(f"  {kcore_k}-core keeps {int(core.sum())} of {len(core)} rows")
    if not core.any():
        raise GtcInputError(where, f"no rows survive the {kcore_k}-core filter",
                            "lower --kcore or import more interactions")
    idx = np.flatnonzero(keep)[core]
    # contiguous re-indexing in order of first appearance (spec §2.1)
    u_raw, i_raw = raw_u[idx], raw_i[idx]
    uu, ufirst, users = np.unique(u_raw, return_index=True, return_inverse=True)
    iu, ifirst, items = np.unique(i_raw, return_index=True, return_inverse=True)
    urank = np.empty(len(uu), np.int64); urank[np.argsort(ufirst)] = np.arange(len(uu))
    irank = np.empty(len(iu), np.int64); irank[np.argsort(ifirst)] = np.arange(len(iu))
    users, items = urank[users], irank[items]
    user_ids = uu[np.argsort(urank)]
    item_ids = iu[np.argsort(irank)]
    ts_k = ts[idx] if ts is not None else None
    labels = split_random_per_user(users, seed) if split == "random" else split_chronological(users, ts_k)
    feats = {}
    for name, (ids, mat) in feat_raw.items():
        pos = {r: j for j, r in enumerate(ids)}
        rows = np.array([pos.get(r, -1) for r in item_ids])
        f = np.empty((len(item_ids), mat.shape[1]), np.float32)
        f[rows >= 0] = mat[rows[rows >= 0]]
        if (rows < 0).any():
            f[rows < 0] = mat[rows[rows >= 0]].mean(0)
            log(f"  modality {name}: {int((rows < 0).sum())} items without features get the mean vector")
        feats[name] = f
    ds = Dataset(users=users.astype(np.int32), items=items.astype(np.int32), split=labels,
                 num_users=len(uu), num_items=len(iu), features=feats, timestamps=ts_k,
                 ratings=rt[idx] if rt is not None else None, user_ids=user_ids, item_ids=item_ids)
    scheme = f"random per user (MMRec rule, seed {seed})" if split == "random" else "chronological per user"
    return write_dataset(ds, out, name=Path(interactions).stem, split_scheme=scheme,
                         provenance={"importer": "tables", "source": str(Path(interactions).absolute()),
                                     "kcore": kcore_k, "dedup": dedup,
                                     "features": {k: str(Path(v).absolute()) for k, v in (features or {}).items()}},
                         overwrite=overwrite)


def _isnull(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return np.isnan(a)
    if a.dtype == object:
        return np.array([x is None or (isinstance(x, float) and np.isnan(x)) for x in a], bool)
    return np.zeros(len(a), bool)
