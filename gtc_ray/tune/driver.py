"""Ray Tune searches over GTC configs, every trial a nested MLflow run.

Walk-through:
 1. the driver validates the dataset and the search space, and prepares the graphs once (trials
    share them read-only);
 2. one MLflow parent run per search; its id is kept in the search directory so `--resume` reuses it;
 3. each Tune trial runs `trial_driver`, which builds and fits a TorchTrainer (Ray Train V2 pattern:
    a function trainable, not `Tuner(trainer)`), with `TuneReportCallback` forwarding rank 0's
    per-epoch metrics, so ASHA can stop bad trials on validation Recall@20;
 4. `MlflowTrialLogger` (a Tune callback, in this driver process: one writer) opens a child run per
    trial and logs params, per-epoch metrics, tags and artifacts;
 5. the best trial is chosen on VALIDATION; only its checkpoint is evaluated on the test split, once;
    a ranked table is printed and `search.json` records the winner for `gtc-ray register --search`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from gtc_ray import tracking
from gtc_ray.config import Config, config_from_dict
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import prepare
from gtc_ray.tune.space import SearchSpace, load_space

METRIC = "valid_{}"  # formatted with cfg.eval.valid_metric
TRIAL_CPU = 0.1  # the trial driver itself only waits on its TorchTrainer (RAY_NOTES P2: not 0)


def trial_driver(config: dict) -> None:
    """One Tune trial: the sampled config -> a TorchTrainer fit (runs in a Tune trial actor)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from gtc_ray.train.run import build_trainer
    ctx = ray.tune.get_context()
    space = SearchSpace(**config["space"])
    cfg = space.config_for(config_from_dict(config["base"]), config.get("params", {}))
    loop_cfg = {"cfg": cfg.to_dict(), "data_dir": config["data_dir"], "evaluate_test": False}
    trainer = build_trainer(Path(config["data_dir"]), cfg, loop_cfg, workers=config["workers"], use_gpu=config["use_gpu"],
                            name=ctx.get_trial_id(), storage_path=Path(config["trials_dir"]),
                            callbacks=[TuneReportCallback()])
    trainer.fit()


def _resolved(trial_config: dict) -> dict:
    space = SearchSpace(**trial_config["space"])
    return space.config_for(config_from_dict(trial_config["base"]), trial_config.get("params", {})).to_dict()


def make_mlflow_callback(uri: str, experiment_id: str, parent_id: str, base_tags: dict, metric: str):
    from ray import tune

    class MlflowTrialLogger(tune.Callback):
        """Child MLflow run per trial, reused (not duplicated) when a search is resumed."""

        def __init__(self):
            self.runs: dict[str, str] = {}
            self.history: dict[str, list] = {}
            self._c = None

        @property
        def c(self):
            if self._c is None:
                self._c = tracking.client(uri)
            return self._c

        def __getstate__(self):
            return {"runs": self.runs, "history": self.history, "_c": None}

        def _run_for(self, trial) -> str:
            tid = trial.trial_id
            if tid in self.runs:
                return self.runs[tid]
            found = self.c.search_runs([experiment_id], filter_string=f"tags.`gtc.trial_id` = '{tid}' and "
                                       f"tags.`mlflow.parentRunId` = '{parent_id}'")
            if found:
                rid = found[0].info.run_id
                self.c.update_run(rid, status="RUNNING")
            else:
                run = self.c.create_run(experiment_id, run_name=trial.trial_id, tags={
                    **base_tags, "mlflow.parentRunId": parent_id, "gtc.trial_id": tid, "gtc.kind": "trial"})
                rid = run.info.run_id
                params = tracking.flatten(_resolved(trial.config))
                params.update({f"search.{k}": v for k, v in trial.config.get("params", {}).items()})
                tracking.log_params(self.c, rid, params)
            self.runs[tid] = rid
            return rid

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run_for(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            rid = self._run_for(trial)
            rec = {k: v for k, v in result.items() if k.startswith(("train_", "valid_")) or k in ("epoch", "best_valid")}
            if "epoch" in rec and not result.get("final"):
                self.history.setdefault(trial.trial_id, []).append(rec)
                tracking.TrainTracker(uri, rid, self.c).log(rec)

        def _close(self, trial, status):
            rid = self._run_for(trial)
            hist = self.history.get(trial.trial_id, [])
            if hist:
                try:
                    tracking.log_config_artifacts(self.c, rid, _resolved(trial.config), hist)
                except Exception as e:  # artifacts are a convenience; never fail the search for them
                    print(f"warning: could not log artifacts for {trial.trial_id}: {e}")
            self.c.set_terminated(rid, status)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._close(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED")

    return MlflowTrialLogger()


def run_search(data_dir: str | Path, space_path: str | Path, *, base: Config, samples: int | None = None,
               max_concurrent: int | None = None, name: str | None = None, storage: str | None = None,
               resume: bool = False, workers: int | None = None, use_gpu: bool = False,
               tracking_uri: str | None = None, log=print) -> dict:
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from gtc_ray.train.run import (check_against_dataset, check_local_resources, ensure_ray, evaluate_checkpoint,
                                   resolve_run_dir)

    t0 = time.perf_counter()
    data_dir = Path(data_dir).absolute()
    space = load_space(space_path, base)  # 1. validation before anything expensive
    ds = load_dataset(data_dir)
    check_against_dataset(space.config_for(base, {}), ds)
    samples = samples or space.samples
    max_concurrent = max_concurrent or space.max_concurrent
    workers = base.ray.workers if workers is None else workers
    storage_path = Path(storage or base.ray.storage_path).absolute()
    name, search_dir = resolve_run_dir("search", storage_path, name, f"search-{Path(space_path).stem}", resume,
                                       state="tuner.pkl")
    # one trial at a time is the safe default on small machines (RAY_NOTES P3)
    check_local_resources(base, workers * max_concurrent, TRIAL_CPU * max_concurrent)
    prepare(ds, space.config_for(base, {}).graph, log=log)  # once; trials share it read-only
    ensure_ray(base, log, workers * max_concurrent, TRIAL_CPU * max_concurrent)

    # 2. MLflow parent run (reused on --resume)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, uri)
    state_file = search_dir / "mlflow_parent.json"
    if resume and state_file.exists():
        parent = json.loads(state_file.read_text())["run_id"]
        c.update_run(parent, status="RUNNING")
    else:
        run = c.create_run(exp, run_name=name, tags={**tracking.dataset_tags(ds), "gtc.kind": "search",
                                                      "gtc.space": str(Path(space_path).absolute())})
        parent = run.info.run_id
        tracking.log_params(c, parent, {"space": str(space_path), "samples": samples,
                                        "max_concurrent": max_concurrent, "workers": workers})
        search_dir.mkdir(parents=True, exist_ok=True)
        tracking.write_json(state_file, {"run_id": parent, "experiment_id": exp, "tracking_uri": uri})
    log(f"search {name}: {samples} sample(s) of {space_path}, {max_concurrent} at a time, {workers} worker(s) "
        f"per trial; MLflow parent run {parent}")

    metric = METRIC.format(base.eval.valid_metric)
    param_space = {"params": space.tune_param_space(), "base": base.to_dict(), "space": space.__dict__,
                   "data_dir": str(data_dir), "workers": workers, "use_gpu": use_gpu,
                   "trials_dir": str(search_dir / "trials")}
    trainable = ray.tune.with_resources(trial_driver, {"cpu": TRIAL_CPU})
    cb = make_mlflow_callback(uri, exp, parent, tracking.dataset_tags(ds), metric)
    try:
        if resume:
            tuner = ray.tune.Tuner.restore(str(search_dir), trainable=trainable, resume_unfinished=True,
                                           resume_errored=True, param_space=param_space)
        else:
            sched = None
            if space.scheduler:
                s = space.scheduler
                sched = ASHAScheduler(time_attr="training_iteration", max_t=s.get("max_epochs", 100),
                                      grace_period=s.get("grace_period", 1), reduction_factor=s.get("reduction_factor", 2))
            tuner = ray.tune.Tuner(
                trainable, param_space=param_space,
                tune_config=ray.tune.TuneConfig(metric=metric, mode="max", num_samples=samples,
                                                max_concurrent_trials=max_concurrent, scheduler=sched),
                run_config=ray.tune.RunConfig(name=name, storage_path=str(storage_path), callbacks=[cb]))
        grid = tuner.fit()
    except BaseException:
        c.set_terminated(parent, "KILLED")
        raise

    # 5. rank on validation; test the best once
    rows = []
    for r in grid:
        hist = r.metrics_dataframe
        best_valid = float(hist[metric].max()) if hist is not None and metric in hist else float("nan")
        epochs = int(hist["epoch"].max()) + 1 if hist is not None and "epoch" in hist else 0
        rows.append({"trial": r.metrics.get("trial_id") if r.metrics else None, "params": r.config.get("params", {}),
                     "best_valid": best_valid, "epochs": epochs, "error": repr(r.error) if r.error else None,
                     "checkpoint": (r.metrics or {}).get("checkpoint_path"), "path": r.path})
    rows.sort(key=lambda x: -x["best_valid"] if not math.isnan(x["best_valid"]) else math.inf)
    ok = [x for x in rows if x["checkpoint"] and not math.isnan(x["best_valid"])]
    if not ok:
        c.set_terminated(parent, "FAILED")
        raise RuntimeError(f"no trial of search {name} produced a checkpoint; see {search_dir}")
    best = ok[0]
    log(f"\n{'rank':<5}{'trial':<12}{metric:>22}{'epochs':>8}  params")
    for i, x in enumerate(rows, 1):
        ps = ", ".join(f"{k}={_fmt(v)}" for k, v in x["params"].items())
        log(f"{i:<5}{(x['trial'] or '?'):<12}{x['best_valid']:>22.4f}{x['epochs']:>8}  {ps}{'  ERROR' if x['error'] else ''}")
    res = evaluate_checkpoint(best["checkpoint"], data_dir)
    log(f"\nbest trial {best['trial']}: valid {base.eval.valid_metric} {res['valid'][base.eval.valid_metric]:.4f}, "
        f"test recall@20 {res['test'].get('recall@20', float('nan')):.4f}, ndcg@20 {res['test'].get('ndcg@20', float('nan')):.4f}")
    stopped = sum(1 for x in rows if x["epochs"] < space.config_for(base, {}).train.epochs and not x["error"])
    summary = {"name": name, "best_trial": best["trial"], "params": best["params"], "checkpoint": best["checkpoint"],
               "valid": res["valid"], "test": res["test"], "parent_run_id": parent,
               "best_run_id": cb.runs.get(best["trial"]) if best["trial"] else None,
               "tracking_uri": uri, "trials": rows, "stopped_early_or_converged": stopped,
               "seconds": time.perf_counter() - t0, "data_dir": str(data_dir)}
    if summary["best_run_id"] is None:
        found = c.search_runs([exp], filter_string=f"tags.`gtc.trial_id` = '{best['trial']}'")
        summary["best_run_id"] = found[0].info.run_id if found else None
    final = {**{f"best_valid_{k}": v for k, v in res["valid"].items()}, **{f"test_{k}": v for k, v in res["test"].items()}}
    from mlflow.entities import Metric
    for rid in filter(None, (parent, summary["best_run_id"])):
        c.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in tracking.numeric_metrics(final).items()])
    c.set_tag(parent, "gtc.best_trial", best["trial"] or "")
    c.set_terminated(parent, "FINISHED")
    tracking.write_json(search_dir / "search.json", summary)
    log(f"search summary {search_dir / 'search.json'} ({summary['seconds']:.0f}s)")
    return summary


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def cli_tune(a, log=print) -> int:
    from gtc_ray.config import load_config
    base = load_config(a.config, a.overrides)
    run_search(a.data_dir, a.space, base=base, samples=a.samples, max_concurrent=a.max_concurrent, name=a.name,
               storage=a.storage, resume=a.resume, workers=a.workers, use_gpu=a.gpu, tracking_uri=a.tracking_uri,
               log=log)
    return 0
