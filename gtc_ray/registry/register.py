"""Registry hand-off: checkpoint -> MLflow pyfunc (numpy-only serving) -> registered version + alias.

    gtc-ray register --search NAME --name gtc --alias champion
    gtc-ray register --checkpoint PATH --name gtc
    gtc-ray recommend --model models:/gtc@champion --user 196 --k 10

The exported model holds the final user and item embeddings, the raw-id maps and each user's
interacted items (all splits) as one .npz artifact; `serving.py` is logged as the model's code
("models from code"), so serving needs neither Ray nor torch nor gtc-ray. The model version records
the source run, validation and test metrics, the dataset hash and the checkpoint's hash; the same
checkpoint is not registered twice unless asked (`--force-new-version`).

Checkpoints and searches may live in Ray Train/Tune storage on a URI (`--storage s3://bucket/runs`,
`--checkpoint s3://bucket/runs/RUN/checkpoint_...`): they are read through gtc_ray.storage and Ray's
checkpoint API, from any machine that can reach the storage, without a Ray cluster.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from gtc_ray import storage as locations, tracking
from gtc_ray.config import config_from_dict
from gtc_ray.errors import GtcInputError

SERVING = Path(__file__).with_name("serving.py")
PIP_REQUIREMENTS = ["mlflow==3.17.2", "numpy==2.4.6", "pandas==3.1.1"]


def export_embeddings(ckpt: str | Path, out: Path, data_dir: str | Path | None = None) -> dict:
    """Write the serving artifact; returns {'dataset': hash, 'num_users', 'num_items'}."""
    from gtc_ray.data.prepare import train_matrix
    from gtc_ray.train.loop import derive_seed
    from gtc_ray.train.evaluate import load_checkpoint_model
    model, ds, cfg, meta = load_checkpoint_model(ckpt, data_dir)
    zu, yi = model.eval_embeddings(derive_seed(cfg.train.seed, "eval"))
    seen = train_matrix(ds.users, ds.items, ds.num_users, ds.num_items)
    seen.sort_indices()
    np.savez(out, user_emb=zu.cpu().numpy().astype(np.float32), item_emb=yi.cpu().numpy().astype(np.float32),
             seen_indptr=seen.indptr.astype(np.int64), seen_indices=seen.indices.astype(np.int64),
             user_ids=np.asarray(ds.user_ids).astype(str), item_ids=np.asarray(ds.item_ids).astype(str))
    return {"dataset": ds.content_hash, "num_users": ds.num_users, "num_items": ds.num_items, "meta": meta,
            "example_user": str(ds.user_ids[0])}


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id"), ColSpec("long", "k"), ColSpec("boolean", "exclude_seen")]),
        outputs=Schema([ColSpec("string", "user_id"), ColSpec("long", "rank"), ColSpec("string", "item_id"),
                        ColSpec("double", "score")]))


def _checkpoint_sha(meta: dict) -> str:
    weights = "model.pt" if meta.get("final") or "best_model.pt" not in meta["hashes"] else "best_model.pt"
    return meta["hashes"][weights]


def resolve_source(search: str | None, checkpoint: str | None, storage: str | Path) -> dict:
    if bool(search) == bool(checkpoint):
        raise GtcInputError("gtc-ray register", "needs exactly one of --search NAME or --checkpoint PATH",
                            "name the search whose best trial to register, or a checkpoint directory")
    if search:
        f = locations.join(storage, search, "search.json")  # a local path or a URI
        try:
            found = locations.is_file(f)
        except Exception as e:  # unreachable store, missing bucket, no credentials
            raise GtcInputError(f"--storage {locations.normalize(storage)}",
                                f"cannot be read ({locations.describe_error(f, e)})",
                                "check the location and the storage's credentials (e.g. the AWS_* variables)") from e
        if not found:
            raise GtcInputError(f"search {search}", f"has no summary at {f} (not finished, or another --storage)",
                                "finish it with `gtc-ray tune --name NAME --resume`, or pass --storage")
        s = json.loads(locations.read_text(f))
        return {"checkpoint": s["checkpoint"], "run_id": s.get("best_run_id"), "valid": s["valid"], "test": s["test"],
                "data_dir": s.get("data_dir")}
    from gtc_ray.train.checkpoint import read_meta_at
    meta = read_meta_at(checkpoint)
    return {"checkpoint": locations.normalize(checkpoint), "run_id": None, "valid": meta.get("valid"),
            "test": meta.get("test") or None, "data_dir": None}


def register(*, name: str, search: str | None = None, checkpoint: str | None = None, alias: str | None = None,
             storage: str | Path = "gtc_runs", tracking_uri: str | None = None, force_new_version: bool = False,
             data_dir: str | None = None, log=print) -> dict:
    import mlflow
    src = resolve_source(search, checkpoint, storage)
    tracking.check_server(tracking_uri)  # an http(s) server answers, within seconds
    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)
    if not src["valid"] or not src["test"]:  # an intermediate checkpoint: evaluate it once
        from gtc_ray.train.evaluate import evaluate_checkpoint
        res = evaluate_checkpoint(src["checkpoint"], data_dir or src["data_dir"])
        src["valid"], src["test"] = res["valid"], res["test"]
    from gtc_ray.train.checkpoint import read_meta_at
    sha = _checkpoint_sha(read_meta_at(src["checkpoint"]))
    if not force_new_version:
        existing = [v for v in c.search_model_versions(f"name = '{name}'") if v.tags.get("gtc.checkpoint_sha") == sha]
        if existing:
            v = existing[0]
            log(f"checkpoint already registered as {name} version {v.version}; not creating another "
                "(pass --force-new-version to do so)")
            if alias:
                c.set_registered_model_alias(name, alias, v.version)
                log(f"alias {alias} -> version {v.version}")
            return {"name": name, "version": int(v.version), "created": False, "uri": f"models:/{name}/{v.version}"}
    with tempfile.TemporaryDirectory() as d:
        npz = Path(d) / "gtc_embeddings.npz"
        info = export_embeddings(src["checkpoint"], npz, data_dir or src["data_dir"])
        import pandas as pd
        example = pd.DataFrame({"user_id": [info["example_user"]], "k": [10], "exclude_seen": [True]})
        if src["run_id"] is None:  # a train run that produced this checkpoint, else a new run
            found = c.search_runs([tracking.experiment_id(c, uri)],
                                  filter_string=f"tags.`gtc.checkpoint` = '{src['checkpoint']}'")
            src["run_id"] = found[0].info.run_id if found else None
        if src["run_id"] is None:
            run = c.create_run(tracking.experiment_id(c, uri), run_name=f"register-{name}",
                               tags={"gtc.kind": "register", "gtc.checkpoint": src["checkpoint"],
                                     "gtc.dataset_hash": info["dataset"]})
            src["run_id"] = run.info.run_id
            c.set_terminated(src["run_id"], "FINISHED")
        with mlflow.start_run(run_id=src["run_id"]):
            mi = mlflow.pyfunc.log_model(
                name="model", python_model=str(SERVING), artifacts={"embeddings": str(npz)},
                signature=_signature(), input_example=example, pip_requirements=PIP_REQUIREMENTS)
    tags = {"gtc.source_run": src["run_id"], "gtc.checkpoint": src["checkpoint"], "gtc.checkpoint_sha": sha,
            "gtc.dataset_hash": info["dataset"],
            **tracking.protocol_tags(config_from_dict(info["meta"]["config"])),
            **{f"valid.{tracking.metric_key(k)}": f"{v:.6f}" for k, v in src["valid"].items()},
            **{f"test.{tracking.metric_key(k)}": f"{v:.6f}" for k, v in src["test"].items()}}
    # the version is created with its tags in one call: no half-described version is ever visible
    mv = mlflow.register_model(mi.model_uri, name, tags=tags)
    version = int(mv.version)
    if alias:
        c.set_registered_model_alias(name, alias, str(version))
    log(f"registered {name} version {version} from {src['checkpoint']}"
        + (f"; alias {alias} -> version {version}" if alias else ""))
    log(f"load it with mlflow.pyfunc.load_model('models:/{name}/{version}') (tracking URI {uri})")
    return {"name": name, "version": version, "created": True, "uri": f"models:/{name}/{version}"}


def recommend(model_uri: str, users: list[str], k: int = 10, exclude_seen: bool = True,
              tracking_uri: str | None = None):
    import mlflow
    import pandas as pd
    tracking.check_server(tracking_uri)  # an http(s) server answers, within seconds
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.set_fluent_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:
        raise GtcInputError(f"--model {model_uri}", f"cannot be loaded ({type(e).__name__}: {e})",
                            f"check the name/version/alias in the registry at {uri}") from e
    try:
        return model.predict(pd.DataFrame({"user_id": [str(u) for u in users], "k": [k] * len(users),
                                           "exclude_seen": [exclude_seen] * len(users)}))
    except Exception as e:
        if "unknown to this model" in str(e):
            raise GtcInputError("--user", str(e).split("; fix:")[0], "pass a raw user id from the training data") from None
        raise


def cli_register(a, log=print) -> int:
    register(name=a.name, search=a.search, checkpoint=a.checkpoint, alias=a.alias, storage=a.storage or "gtc_runs",
             tracking_uri=a.tracking_uri, force_new_version=a.force_new_version, data_dir=a.data, log=log)
    return 0


def cli_recommend(a, log=print) -> int:
    df = recommend(a.model, a.user, a.k, not a.include_seen, a.tracking_uri)
    if a.json:
        print(df.to_json(orient="records"))
    else:
        log(df.to_string(index=False))
    return 0
