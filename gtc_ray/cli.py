"""`gtc-ray`: one verb per stage.

    gtc-ray data synth OUT --preset tiny|small|baby|sports|clothing|1m
    gtc-ray data import-mmrec SRC OUT
    gtc-ray data import INTERACTIONS OUT --features image=img.parquet ...
    gtc-ray data describe DIR [--json]
    gtc-ray prepare DIR [--config FILE] [--set graph.knn_k=10]
    gtc-ray train DATA_DIR [--config FILE] [--set k=v ...] [--workers N] [--gpu] [--resume] [--metrics-out F]
    gtc-ray evaluate CHECKPOINT [--data DIR]

User errors (bad input, config, paths) print one paragraph and exit with status 2; `--debug`
shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from gtc_ray.errors import GtcInputError


def _log(msg: str) -> None:
    print(msg, flush=True)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (sections: graph, model, compat, train, eval, ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set graph.knn_k=10 (repeatable; value parsed as YAML)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gtc-ray", description="Train the GTC multi-modal recommender on Ray.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    d = sub.add_parser("data", help="create, import and inspect datasets")
    dsub = d.add_subparsers(dest="data_verb", required=True, metavar="ACTION")
    s = dsub.add_parser("synth", help="generate a synthetic dataset with planted cluster structure")
    s.add_argument("out", help="output dataset: a directory or a URI such as s3://bucket/tiny (must not exist "
                   "unless --overwrite)")
    s.add_argument("--preset", default="tiny", help="size: tiny, small, baby, sports, clothing or 1m (default tiny)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--users", type=int, help="override the preset's number of users")
    s.add_argument("--items", type=int, help="override the preset's number of items")
    s.add_argument("--interactions", type=int, help="override the preset's number of interactions")
    s.add_argument("--overwrite", action="store_true", help="replace an existing (or partly written) output dataset")

    m = dsub.add_parser("import-mmrec", help="import an MMRec folder (<name>.inter + <modality>_feat.npy)")
    m.add_argument("src", help="MMRec dataset folder")
    m.add_argument("out", help="output dataset: a directory or a URI (s3://, gs://, abfs://, file://, ...)")
    m.add_argument("--dedup", action="store_true", help="keep the first row of duplicate (user, item) pairs")
    m.add_argument("--overwrite", action="store_true", help="replace an existing (or partly written) output dataset")

    g = dsub.add_parser("import", help="import raw interaction and feature tables (Parquet, CSV or TSV)")
    g.add_argument("interactions", help="interaction table with raw user and item ids")
    g.add_argument("out", help="output dataset: a directory or a URI (s3://, gs://, abfs://, file://, ...)")
    g.add_argument("--features", action="append", default=[], metavar="MODALITY=PATH",
                   help="feature table of one modality keyed by raw item id (repeatable)")
    g.add_argument("--user-column", default="user_id", help="raw user id column (default user_id)")
    g.add_argument("--item-column", default="item_id", help="raw item id column (default item_id)")
    g.add_argument("--time-column", default="timestamp", help="timestamp column, optional (default timestamp)")
    g.add_argument("--rating-column", default="rating", help="rating column, optional (default rating)")
    g.add_argument("--feature-id-column", default="item_id", help="item id column of the feature tables")
    g.add_argument("--kcore", type=int, default=5, help="iterative k-core filter (default 5; 1 disables)")
    g.add_argument("--split", default="random", choices=["random", "chrono"],
                   help="random: MMRec per-user 80/10/10 rule with --seed; chrono: latest rows per user held out")
    g.add_argument("--seed", type=int, default=2026, help="split seed (default 2026)")
    g.add_argument("--dedup", action="store_true", help="keep the earliest row of duplicate (user, item) pairs")
    g.add_argument("--fill-missing", choices=["mean"], help="give items without a feature row the mean vector")
    g.add_argument("--overwrite", action="store_true", help="replace an existing (or partly written) output dataset")

    ds = dsub.add_parser("describe", help="summarise a dataset directory")
    ds.add_argument("dir", help="dataset directory or URI")
    ds.add_argument("--json", action="store_true", help="print JSON instead of text")

    pr = sub.add_parser("prepare", help="build and cache the item-item and user-user graphs")
    pr.add_argument("dir", help="dataset directory or URI (the graphs are cached under it, in prepared/)")
    _add_config_args(pr)

    fe = sub.add_parser("features", help="encode raw item content into a modality table (Ray Data batch inference)")
    fsub = fe.add_subparsers(dest="features_verb", required=True, metavar="KIND")
    ft = fsub.add_parser("text", help="encode item texts with all-MiniLM-L6-v2 (384-d)")
    ft.add_argument("items", help="Parquet/CSV/TSV table with an item-id column and a text column")
    ft.add_argument("--column", default="text", help="text column (default text)")
    ft.add_argument("--id-column", help="item-id column (detected when unambiguous)")
    fi = fsub.add_parser("image", help="encode item images with EfficientNet-Lite0 (1,280-d pooled features)")
    fi.add_argument("images_dir", help="folder of <item id>.jpg|png|... files")
    for f, default_mod, bs in ((ft, "text", 64), (fi, "image", 32)):
        f.add_argument("--out", required=True, help="dataset directory to add the modality to")
        f.add_argument("--modality", default=default_mod, help=f"modality name (default {default_mod})")
        f.add_argument("--id-kind", default="raw", choices=["raw", "index"],
                       help="ids are raw ids from the id map (default) or the dataset's 0-based item indices")
        f.add_argument("--batch-size", type=int, default=bs, help=f"items per encoder call (default {bs})")
        f.add_argument("--concurrency", type=int, default=1, help="encoder actors (default 1)")

    tr = sub.add_parser("train", help="train GTC with Ray Train (local Ray unless an address is given)")
    tr.add_argument("data_dir", help="dataset directory")
    _add_config_args(tr)
    tr.add_argument("--workers", type=int, help="number of DDP workers (ray.workers, default 2; 0 = in-process local mode)")
    tr.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    tr.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
    tr.add_argument("--compat", action="store_true", help="reproduce the original code's behaviour (spec §10 B1/B5/B6)")
    tr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    tr.add_argument("--storage", help="directory for checkpoints and run state (ray.storage_path)")
    tr.add_argument("--name", help="run name (default gtc-<dataset>-<time>)")
    tr.add_argument("--resume", action="store_true", help="continue the named run from its latest checkpoint")
    tr.add_argument("--metrics-out", metavar="FILE", help="write final valid/test metrics and checkpoint as JSON")
    tr.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    tr.add_argument("--max-failures", type=int, metavar="N",
                    help="worker-group restarts before the run fails (ray.max_failures, default 3; 0 = none)")
    tr.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")

    tu = sub.add_parser("tune", help="hyper-parameter search with Ray Tune (ASHA), every trial logged to MLflow")
    tu.add_argument("data_dir", help="dataset directory")
    tu.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    _add_config_args(tu)
    tu.add_argument("--samples", type=int, help="number of sampled trials (default: the space's 'samples')")
    tu.add_argument("--max-concurrent", type=int, help="trials at once (default: the space's 'max_concurrent')")
    tu.add_argument("--name", help="search name (default search-<space>-<time>)")
    tu.add_argument("--resume", action="store_true", help="continue the named search without rerunning finished trials")
    tu.add_argument("--workers", type=int, help="DDP workers per trial (default ray.workers)")
    tu.add_argument("--gpu", action="store_true", help="one GPU per worker")
    tu.add_argument("--storage", help="directory for search state and checkpoints (ray.storage_path)")
    tu.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    tu.add_argument("--max-failures", type=int, metavar="N",
                    help="restarts of each trial's workers before the trial fails (ray.max_failures, default 3)")

    rg = sub.add_parser("register", help="export a trained model as an MLflow pyfunc and register it")
    rg.add_argument("--search", help="register the best trial of this search (its search.json)")
    rg.add_argument("--checkpoint", help="register this checkpoint directory")
    rg.add_argument("--name", default="gtc", help="registered model name (default gtc)")
    rg.add_argument("--alias", help="point this alias (e.g. champion) at the new version")
    rg.add_argument("--storage", help="where searches live (ray.storage_path, default gtc_runs)")
    rg.add_argument("--data", help="dataset directory (default: the one recorded in the checkpoint)")
    rg.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    rg.add_argument("--force-new-version", action="store_true",
                    help="register even if this checkpoint is already a version of the model")

    rc = sub.add_parser("recommend", help="top-K items for users from a registered model (no Ray needed)")
    rc.add_argument("--model", required=True, help="model URI, e.g. models:/gtc@champion or models:/gtc/3")
    rc.add_argument("--user", action="append", required=True, help="raw user id (repeatable)")
    rc.add_argument("--k", type=int, default=10, help="number of items (default 10)")
    rc.add_argument("--include-seen", action="store_true", help="do not exclude items the user interacted with")
    rc.add_argument("--json", action="store_true", help="print JSON records")
    rc.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")

    ev = sub.add_parser("evaluate", help="evaluate a checkpoint on the validation and test splits")
    ev.add_argument("checkpoint", help="checkpoint directory (holds model.pt and meta.json)")
    ev.add_argument("--data", help="dataset directory (default: the one recorded in the checkpoint)")
    ev.add_argument("--json", action="store_true", help="print JSON")
    return p


def _print_describe(info: dict) -> None:
    _log(f"dataset      {info['name']}  ({info['path']})")
    _log(f"users        {info['num_users']:,}")
    _log(f"items        {info['num_items']:,}")
    _log(f"interactions {info['num_interactions']:,}  (density {info['density']:.4%})")
    sp = info["splits"]
    _log(f"splits       train {sp['train']:,} / valid {sp['valid']:,} / test {sp['test']:,}  [{info['split_scheme']}]")
    mods = ", ".join(f"{k} ({v:,})" for k, v in info["modalities"].items()) or "none (ID only)"
    _log(f"modalities   {mods}")
    t = info["train_per_user"]
    _log(f"train/user   min {t['min']}, median {t['median']:g}, max {t['max']}")
    _log(f"content hash {info['content_hash']}")


def _cmd_data(a) -> int:
    from gtc_ray.data import dataset, importers, synth
    t0 = time.perf_counter()
    if a.data_verb == "synth":
        _log(f"generating synthetic dataset (preset {a.preset}, seed {a.seed}) -> {a.out}")
        man = synth.synth(a.out, a.preset, a.seed, overwrite=a.overwrite, users=a.users, items=a.items,
                          interactions=a.interactions)
    elif a.data_verb == "import-mmrec":
        man = importers.import_mmrec(a.src, a.out, overwrite=a.overwrite, dedup=a.dedup, log=_log)
    elif a.data_verb == "import":
        feats = {}
        for f in a.features:
            name, sep, path = f.partition("=")
            if not sep or not name or not path:
                raise GtcInputError(f"--features {f!r}", "must look like MODALITY=PATH", "e.g. --features image=img.parquet")
            feats[name] = path
        man = importers.import_tables(a.interactions, a.out, features=feats, user_col=a.user_column,
                                      item_col=a.item_column, time_col=a.time_column, rating_col=a.rating_column,
                                      feature_id_col=a.feature_id_column, kcore_k=a.kcore, split=a.split,
                                      seed=a.seed, dedup=a.dedup, fill_missing=a.fill_missing,
                                      overwrite=a.overwrite, log=_log)
    else:
        info = dataset.describe(a.dir)
        if a.json:
            print(json.dumps(info, indent=2))
        else:
            _print_describe(info)
        return 0
    _log(f"wrote {a.out}: {man['num_users']:,} users, {man['num_items']:,} items, "
         f"{man['num_interactions']:,} interactions in {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_prepare(a) -> int:
    from gtc_ray.config import load_config
    from gtc_ray.data.dataset import load_dataset
    from gtc_ray.data.prepare import prepare
    cfg = load_config(a.config, a.overrides)
    ds = load_dataset(a.dir)
    t0 = time.perf_counter()
    g = prepare(ds, cfg.graph, log=_log)
    _log(f"graphs ready at {g.path} ({time.perf_counter() - t0:.1f}s): item-item {g.item_item.nnz:,} edges, "
         f"user-user {g.user_user.nnz:,} edges")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.verb == "data":
            return _cmd_data(a)
        if a.verb == "prepare":
            return _cmd_prepare(a)
        if a.verb == "features":
            from gtc_ray.features import build
            if a.features_verb == "text":
                build.build_text(a.items, a.out, column=a.column, id_column=a.id_column, id_kind=a.id_kind,
                                 modality=a.modality, batch_size=a.batch_size, concurrency=a.concurrency, log=_log)
            else:
                build.build_image(a.images_dir, a.out, id_kind=a.id_kind, modality=a.modality,
                                  batch_size=a.batch_size, concurrency=a.concurrency, log=_log)
            return 0
        if a.verb == "train":
            from gtc_ray.train.run import cli_train
            return cli_train(a, log=_log)
        if a.verb == "tune":
            from gtc_ray.tune.driver import cli_tune
            return cli_tune(a, log=_log)
        if a.verb == "register":
            from gtc_ray.registry.register import cli_register
            return cli_register(a, log=_log)
        if a.verb == "recommend":
            from gtc_ray.registry.register import cli_recommend
            return cli_recommend(a, log=_log)
        if a.verb == "evaluate":
            from gtc_ray.train.evaluate import cli_evaluate
            return cli_evaluate(a, log=_log)
    except GtcInputError as e:
        if a.debug:
            raise
        print(f"gtc-ray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if a.debug:
            raise
        print("gtc-ray: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown verb {a.verb}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
