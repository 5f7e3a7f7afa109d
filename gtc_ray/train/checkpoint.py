"""Checkpoints: a directory holding model.pt, optim.pt (optional) and meta.json.

meta.json carries the config, epoch, best validation metric, history, the dataset's content hash
and the sha256 of every tensor file, so a truncated or edited checkpoint is detected and reported
instead of loaded. Tensors are saved with torch.save and loaded with `weights_only=True` (no
arbitrary unpickling). Writes go to a temporary directory renamed into place.

A checkpoint's location is a local directory or a URI in Ray Train/Tune storage (`s3://...`):
read_meta and load_file read a local directory; `local_checkpoint(loc)` gives one for any location
(a URI is copied locally through Ray's checkpoint API), `read_meta_at(loc)` reads only meta.json,
and `checkpoint_location` turns the path Ray reports for a checkpoint into its location.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from gtc_ray import storage
from gtc_ray.data.dataset import sha256_file
from gtc_ray.errors import GtcInputError

CKPT_FORMAT = "gtc-ray-checkpoint"


def save_checkpoint(path: str | Path, model_state: dict, meta: dict, optim_state: dict | None = None,
                    extra: dict[str, dict] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        files = {"model.pt": model_state}
        if optim_state is not None:
            files["optim.pt"] = optim_state
        for name, state in (extra or {}).items():
            files[name] = state
        hashes = {}
        for name, state in files.items():
            torch.save(state, tmp / name)
            hashes[name] = sha256_file(tmp / name)
        (tmp / "meta.json").write_text(json.dumps({"format": CKPT_FORMAT, **meta, "hashes": hashes}, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    mf = path / "meta.json"
    if not mf.is_file():
        raise GtcInputError(f"checkpoint {path}", "has no meta.json (not a gtc-ray checkpoint)",
                            "pass the checkpoint directory printed at the end of `gtc-ray train`")
    return _parse_meta(mf.read_text(), str(mf))


def _parse_meta(text: str, where: str) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise GtcInputError(where, f"is corrupted ({e})", "use another checkpoint of the run") from e
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        raise GtcInputError(where, "is not a gtc-ray checkpoint", "pass a checkpoint written by gtc-ray train")
    return meta


def _require_remote_checkpoint(loc: str) -> str:
    """The meta.json location of a checkpoint URI, after checking that it is there."""
    mf = storage.join(loc, "meta.json")
    try:
        found = storage.is_file(mf)
    except Exception as e:  # unreachable store, missing bucket, no credentials
        raise GtcInputError(f"checkpoint {loc}", f"cannot be read ({storage.describe_error(loc, e)})",
                            "check the URI and the storage's credentials (e.g. the AWS_* variables)") from e
    if not found:
        raise GtcInputError(f"checkpoint {loc}", "has no meta.json (no checkpoint there, or not a gtc-ray one)",
                            "pass the checkpoint location printed at the end of `gtc-ray train`")
    return mf


def read_meta_at(loc: str | Path) -> dict:
    """meta.json of the checkpoint at a location (local directory or URI), without its tensors."""
    loc = storage.normalize(loc)
    if not storage.is_uri(loc):
        return read_meta(loc)
    mf = _require_remote_checkpoint(loc)
    return _parse_meta(storage.read_text(mf), mf)


@contextlib.contextmanager
def local_checkpoint(loc: str | Path) -> Iterator[Path]:
    """A local directory holding the checkpoint at `loc`. A local location is used in place; a URI
    (Ray Train/Tune storage on S3, GCS, ...) is copied to a temporary directory with Ray's
    checkpoint API, `ray.train.Checkpoint(...).to_directory()` (no Ray cluster needed), and the
    copy is deleted when the block ends."""
    loc = storage.normalize(loc)
    if not storage.is_uri(loc):
        yield Path(loc)
        return
    _require_remote_checkpoint(loc)
    from ray.train import Checkpoint
    fs, fs_path = storage.filesystem(loc)  # also covers schemes only fsspec knows
    tmp = Path(tempfile.mkdtemp(prefix="gtc-ckpt-dl-"))
    try:
        yield Path(Checkpoint(path=fs_path, filesystem=fs).to_directory(str(tmp / "checkpoint")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_location(path: str, root: str | Path) -> str:
    """The location of a checkpoint that Ray reports as `path` (`Checkpoint.path`, or Tune's
    `checkpoint_path` metric: a path inside the storage's file system, the bucket's scheme
    stripped) in Train/Tune storage `root`: the local path itself, or a URI under `root`."""
    root = storage.normalize(root)
    if not storage.is_uri(root):
        return str(Path(path))
    _, base = storage.filesystem(root)
    base, path = base.rstrip("/"), str(path).rstrip("/")
    if path == base:
        return root
    if path.startswith(base + "/"):
        return storage.join(root, path[len(base) + 1:])
    raise ValueError(f"checkpoint path {path!r} is not inside the storage {root}")


def check_storage_supports(loc: str | Path, *, runner: str = "ray", workers: int = 1, where: str = "--storage") -> None:
    """The in-process runner and Ray Train local mode (workers == 0) write checkpoints to local
    directories: they need local storage. Refused up front with a URI storage."""
    loc = storage.normalize(loc)
    if not storage.is_uri(loc):
        return
    if runner == "inprocess":
        mode = "the in-process runner"
    elif workers == 0:
        mode = "Ray Train local mode (--workers 0)"
    else:
        return
    raise GtcInputError(f"{where} {loc}", f"is a URI, and {mode} keeps its checkpoints in a local directory",
                        "use --workers >= 1 (Ray Train workers write checkpoints to the storage URI), "
                        "or a local --storage directory")


def load_file(path: str | Path, name: str, meta: dict | None = None, map_location="cpu") -> dict:
    path = Path(path)
    meta = meta or read_meta(path)
    f = path / name
    expected = meta.get("hashes", {}).get(name)
    if expected is None or not f.is_file():
        raise GtcInputError(f"checkpoint {path}", f"lacks {name}", "use a complete checkpoint of the run")
    if sha256_file(f) != expected:
        raise GtcInputError(f"checkpoint file {f}", "does not match the hash in meta.json (truncated or corrupted)",
                            "use another checkpoint of the run, or retrain")
    return torch.load(f, map_location=map_location, weights_only=True)


def check_modality_order(meta: dict, ds, ckpt) -> None:
    """Checkpoints before meta["modalities"] indexed per-representation weights in the manifest's
    order; the model now uses name order. Refuse the one case where the two differ."""
    if "modalities" not in meta and list(ds.features) != sorted(ds.features) and \
            meta.get("config", {}).get("model", {}).get("use_content", True):
        raise GtcInputError(f"checkpoint {ckpt}", f"was written by an older gtc-ray for modalities in the order "
                            f"{list(ds.features)}, which this version reads in name order",
                            "retrain the model with this version")
