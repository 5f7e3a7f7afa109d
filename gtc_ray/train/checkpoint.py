"""Checkpoints: a directory holding model.pt, optim.pt (optional) and meta.json.

meta.json carries the config, epoch, best validation metric, history, the dataset's content hash
and the sha256 of every tensor file, so a truncated or edited checkpoint is detected and reported
instead of loaded. Tensors are saved with torch.save and loaded with `weights_only=True` (no
arbitrary unpickling). Writes go to a temporary directory renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

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
    try:
        meta = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise GtcInputError(str(mf), f"is corrupted ({e})", "use another checkpoint of the run") from e
    if meta.get("format") != CKPT_FORMAT:
        raise GtcInputError(str(mf), "is not a gtc-ray checkpoint", "pass a checkpoint written by gtc-ray train")
    return meta


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
