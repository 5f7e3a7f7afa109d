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

Once the parent run exists, every run of a search ends FINISHED, FAILED (an error) or KILLED (Ctrl-C),
never RUNNING. Ctrl-C stops Tune gracefully (it saves the experiment state); an interrupted search
names no winner, evaluates no test split, prints the `gtc-ray tune ... --resume` command that
continues it and ends with KeyboardInterrupt (exit code 130 from the CLI). `--resume` takes the
saved config and options of the search (search_args.json), so that command needs nothing else.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path

from ray.tune import Callback

from gtc_ray import storage as locations, tracking
from gtc_ray.config import Config, config_from_dict
from gtc_ray.errors import GtcInputError
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import prepare
from gtc_ray.tune.space import SearchSpace, load_space

METRIC = "valid_{}"  # formatted with cfg.eval.valid_metric
TRIAL_CPU = 0.1  # the trial driver itself only waits on its TorchTrainer (RAY_NOTES P2: not 0)


def trial_driver(config: dict, ingest=None) -> None:
    """One Tune trial: the sampled config -> a TorchTrainer fit (runs in a Tune trial actor). `ingest`
    (the search driver's Ray Datasets and WorkerInputs, built once for all trials) comes through
    tune.with_parameters."""
    import ray.train
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from gtc_ray.train.run import build_trainer
    ctx = ray.tune.get_context()
    tid = ctx.get_trial_id()
    gave_up = locations.join(config["trials_dir"], f"{tid}.failed")  # trials_dir: a local path or a URI
    if locations.exists(gave_up):  # see the FailureConfig note in _search
        raise RuntimeError(locations.read_text(gave_up))
    space = SearchSpace(**config["space"])
    cfg = space.config_for(config_from_dict(config["base"]), config.get("params", {}))
    loop_cfg = {"cfg": cfg.to_dict(), "data_dir": config["data_dir"], "evaluate_test": False}
    # name=trial id under the search's trials/ directory: a relaunched trial (Tune FailureConfig,
    # or --resume) finds its Train run there and resumes from its latest checkpoint
    trainer = build_trainer(ingest, cfg, loop_cfg, workers=config["workers"], use_gpu=config["use_gpu"],
                            name=tid, storage_path=config["trials_dir"], callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        locations.write_text(gave_up, f"trial {tid}: its Train run failed after ray.max_failures="
                             f"{cfg.ray.max_failures} worker-group restarts and is not relaunched: {e!r}"[:4000])
        raise


def _resolved(trial_config: dict) -> dict:
    space = SearchSpace(**trial_config["space"])
    return space.config_for(config_from_dict(trial_config["base"]), trial_config.get("params", {})).to_dict()


# parent run id -> what MlflowTrialLogger.on_experiment_end saw (read back by run_search)
_EXPERIMENT_END: dict[str, dict] = {}


class MlflowTrialLogger(Callback):
    """Child MLflow run per trial, reused (not duplicated) when a search is resumed.

    A module-level class: Tune pickles its callbacks into the search's tuner.pkl, and `--resume`
    runs the unpickled copy, which must still be this code (and write _EXPERIMENT_END here)."""

    def __init__(self, uri: str, experiment_id: str, parent_id: str, base_tags: dict, metric: str,
                 storage_root: str | None = None):
        self.uri, self.experiment_id, self.parent_id, self.base_tags, self.metric = (
            uri, experiment_id, parent_id, base_tags, metric)
        self.storage_root = storage_root  # the search's Tune storage (a checkpoint_path lies inside it)
        self.runs: dict[str, str] = {}
        self.history: dict[str, list] = {}
        self.open: dict[str, object] = {}  # trial id -> trial, for runs started and not yet ended here
        self._c = None

    @property
    def c(self):
        if self._c is None:
            self._c = tracking.client(self.uri)
        return self._c

    def __getstate__(self):
        return {**self.__dict__, "_c": None, "open": {}}

    def _run_for(self, trial) -> str:
        tid = trial.trial_id
        if tid in self.runs:
            return self.runs[tid]
        found = self.c.search_runs([self.experiment_id], filter_string=f"tags.`gtc.trial_id` = '{tid}' and "
                                   f"tags.`mlflow.parentRunId` = '{self.parent_id}'")
        if found:
            rid = found[0].info.run_id
            self.c.update_run(rid, status="RUNNING")
        else:
            run = self.c.create_run(self.experiment_id, run_name=trial.trial_id, tags={
                **self.base_tags, "mlflow.parentRunId": self.parent_id, "gtc.trial_id": tid, "gtc.kind": "trial"})
            rid = run.info.run_id
            params = tracking.flatten(_resolved(trial.config))
            params.update({f"search.{k}": v for k, v in trial.config.get("params", {}).items()})
            tracking.log_params(self.c, rid, params)
        self.runs[tid] = rid
        self.open[tid] = trial
        return rid

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    @staticmethod
    def _epoch_record(result: dict) -> dict:
        return {k: v for k, v in result.items() if k.startswith(("train_", "valid_")) or k in ("epoch", "best_valid", "modality_balance")}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self._run_for(trial)
        self.open[trial.trial_id] = trial
        rec = self._epoch_record(result)
        if "epoch" in rec and not result.get("final"):
            self.history.setdefault(trial.trial_id, []).append(rec)
            tracking.TrainTracker(self.uri, rid, self.c).log(rec)

    def _backfill(self, trial, rid) -> list[dict]:
        """The trial's whole per-epoch history from its final checkpoint; epochs missing from the
        run are logged. (An epoch that Train saved just before a Ctrl-C never reached Tune; the
        resumed trial starts after it.)"""
        from gtc_ray.train.checkpoint import checkpoint_location, read_meta_at
        ck = (trial.last_result or {}).get("checkpoint_path")
        if not ck:
            return []
        root = getattr(self, "storage_root", None)  # absent in a tuner.pkl of an older version
        hist = [self._epoch_record(r) for r in read_meta_at(checkpoint_location(ck, root) if root else ck)
                .get("history") or []]
        have = {m.step for m in self.c.get_metric_history(rid, tracking.metric_key(self.metric))}
        tracker = tracking.TrainTracker(self.uri, rid, self.c)
        for rec in hist:
            if "epoch" in rec and rec["epoch"] not in have:
                tracker.log(rec)
        return hist

    def _close(self, trial, status):
        rid = self._run_for(trial)
        self.open.pop(trial.trial_id, None)
        hist = self.history.get(trial.trial_id, [])
        try:  # the history and artifacts are a convenience; never fail the search for them
            if status == "FINISHED":
                hist = self._backfill(trial, rid) or hist
            if hist:
                tracking.log_config_artifacts(self.c, rid, _resolved(trial.config), hist)
        except Exception as e:
            print(f"warning: could not log the history or artifacts of trial {trial.trial_id}: {e}")
        self.c.set_terminated(rid, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        """Called once Tune has stopped every trial, also after Ctrl-C: a trial that started here and
        neither completed nor failed was cut short (Tune marks it TERMINATED, not ERROR, when it stops
        it), and so was a search with trials still PENDING or PAUSED."""
        cut = list(self.open)
        waiting = [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]
        for tid in cut:
            try:
                self._close(self.open[tid], "KILLED")
            except Exception as e:  # keep closing the others
                print(f"warning: could not mark the MLflow run of trial {tid} KILLED: {e}")
        _EXPERIMENT_END[self.parent_id] = {"unfinished": sorted(set(cut) | set(waiting)), "runs": dict(self.runs)}


def make_mlflow_callback(uri: str, experiment_id: str, parent_id: str, base_tags: dict, metric: str,
                         storage_root: str | None = None):
    return MlflowTrialLogger(uri, experiment_id, parent_id, base_tags, metric, storage_root)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the search; str() is the command that resumes it."""


def resume_command(data_dir, space_path, name: str, storage) -> str:
    cmd = ["gtc-ray", "tune", str(data_dir), "--space", str(space_path), "--name", name]
    if storage:
        cmd += ["--storage", str(storage)]
    return shlex.join(cmd + ["--resume"])


def _end_open_children(c, exp: str, parent: str, status: str) -> None:
    """Safety net after an error or Ctrl-C: no trial run of this search stays RUNNING (e.g. a second
    Ctrl-C that skipped Tune's clean-up, and with it MlflowTrialLogger.on_experiment_end)."""
    try:
        left = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and "
                             "attributes.status = 'RUNNING'")
        for r in left:
            c.set_terminated(r.info.run_id, status)
    except Exception as e:
        print(f"warning: could not end the trial runs of MLflow run {parent}: {e}")


SEARCH_ARGS = "search_args.json"  # the config and options a search started with (reused by --resume)


def run_search(data_dir: str | Path, space_path: str | Path, *, base: Config, samples: int | None = None,
               max_concurrent: int | None = None, name: str | None = None, storage: str | None = None,
               resume: bool = False, workers: int | None = None, use_gpu: bool = False,
               tracking_uri: str | None = None, log=print) -> dict:
    """Run (or with `resume`, continue) a search; returns the summary written to search.json.
    On resume, options left None come from the search's search_args.json."""
    from gtc_ray.train.cluster import check_local_resources, ensure_ray, preflight, resolve_cpus_per_worker
    from gtc_ray.train.checkpoint import check_storage_supports
    from gtc_ray.train.run import check_against_dataset, resolve_run_dir

    t0 = time.perf_counter()
    given_data, given_space = data_dir, space_path
    base_as_given = base.to_dict()  # before this function fits it to the dataset and machine
    data_dir = locations.normalize(data_dir)  # a local path (absolute) or a URI
    space = load_space(space_path, base)  # 1. validation before anything expensive
    ds = load_dataset(data_dir)
    check_against_dataset(base, ds, log)  # fits eval.topk to the catalogue for every trial
    check_against_dataset(space.config_for(base, {}), ds, lambda m: None)
    storage_path = locations.normalize(storage or base.ray.storage_path)  # a local path (absolute) or a URI
    name, search_dir = resolve_run_dir("search", storage_path, name, f"search-{Path(space_path).stem}", resume,
                                       state="tuner.pkl")
    saved = {}
    if resume and locations.is_file(locations.join(search_dir, SEARCH_ARGS)):
        saved = json.loads(locations.read_text(locations.join(search_dir, SEARCH_ARGS)))
    if resume and saved:
        _refuse_changes_on_resume(saved, base_as_given, workers, use_gpu, name)
    samples = samples or saved.get("samples") or space.samples
    max_concurrent = max_concurrent or saved.get("max_concurrent") or space.max_concurrent
    workers = workers if workers is not None else saved.get("workers", base.ray.workers)
    use_gpu = use_gpu or saved.get("use_gpu", False)
    check_storage_supports(storage_path, workers=workers)  # local mode stages checkpoints locally
    # one trial at a time is the safe default on small machines (RAY_NOTES P3)
    check_local_resources(base, workers * max_concurrent, TRIAL_CPU * max_concurrent)
    base.ray.cpus_per_worker = resolve_cpus_per_worker(base, workers * max_concurrent, TRIAL_CPU * max_concurrent)
    prior = locations.join(search_dir, "mlflow_parent.json")  # --resume: the search's own tracking URI
    prior_uri = json.loads(locations.read_text(prior)).get("tracking_uri") if resume and locations.exists(prior) else None
    preflight(base, tracking_uri=tracking_uri or prior_uri, log=log, workers=workers * max_concurrent,
              extra_cpu=TRIAL_CPU * max_concurrent)
    graphs = prepare(ds, space.config_for(base, {}).graph, log=log)  # once; trials share it read-only

    # 2. MLflow parent run (reused on --resume)
    state_file = locations.join(search_dir, "mlflow_parent.json")
    state = json.loads(locations.read_text(state_file)) if resume and locations.exists(state_file) else None
    uri = tracking.resolve_tracking_uri(tracking_uri or (state or {}).get("tracking_uri"))
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, uri)
    if state is not None:
        parent = state["run_id"]
        c.update_run(parent, status="RUNNING")
    else:
        run = c.create_run(exp, run_name=name, tags={**tracking.dataset_tags(ds), **tracking.protocol_tags(base),
                                                      "gtc.kind": "search",
                                                      "gtc.space": str(Path(space_path).absolute())})
        parent = run.info.run_id
    # the command that continues this search; it needs no other option (search_args.json)
    default_storage = storage is None and base.ray.storage_path == Config().ray.storage_path
    resume_cmd = resume_command(given_data, given_space, name, None if default_storage else storage or
                                base.ray.storage_path)
    # from here on the parent run ends FINISHED, FAILED (error) or KILLED (Ctrl-C), never RUNNING
    try:
        if state is None:
            tracking.log_params(c, parent, {"space": str(space_path), "samples": samples,
                                            "max_concurrent": max_concurrent, "workers": workers})
            _write_json(state_file, {"run_id": parent, "experiment_id": exp, "tracking_uri": uri})
            _write_json(locations.join(search_dir, SEARCH_ARGS), {
                "config": base_as_given, "samples": samples, "max_concurrent": max_concurrent, "workers": workers,
                "use_gpu": use_gpu})
        if resume:  # --resume retries errored trials for real (see the FailureConfig note in _search)
            for marker in locations.listdir(locations.join(search_dir, "trials")):
                if marker.endswith(".failed"):
                    locations.delete(locations.join(search_dir, "trials", marker))
        ensure_ray(base, log, workers * max_concurrent, TRIAL_CPU * max_concurrent)
        log(f"search {name}: {samples} sample(s) of {space_path}, {max_concurrent} at a time, {workers} worker(s) "
            f"per trial; MLflow parent run {parent}")
        summary = _search(space=space, base=base, ds=ds, data_dir=data_dir, search_dir=search_dir,
                          storage_path=storage_path, name=name, samples=samples, max_concurrent=max_concurrent,
                          workers=workers, use_gpu=use_gpu, resume=resume, uri=uri, c=c, exp=exp, parent=parent,
                          resume_cmd=resume_cmd, graphs=graphs, log=log)
        summary["seconds"] = time.perf_counter() - t0
        _write_json(locations.join(search_dir, "search.json"), summary)
        c.set_terminated(parent, "FINISHED")
    except BaseException as e:
        _EXPERIMENT_END.pop(parent, None)
        tracking.end_run_after(c, parent, e)
        _end_open_children(c, exp, parent, "KILLED")
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, SearchInterrupted) and \
                _exists_quietly(locations.join(search_dir, "tuner.pkl")):
            log(f"search {name} interrupted; continue it with:\n  {resume_cmd}")
        raise
    log(f"search summary {locations.join(search_dir, 'search.json')} ({summary['seconds']:.0f}s)")
    return summary


def _exists_quietly(loc) -> bool:
    """exists() for an error path: a storage that cannot be reached must not hide the error."""
    try:
        return locations.exists(loc)
    except Exception:
        return False


def _write_json(loc, data: dict) -> None:
    """search.json, search_args.json, mlflow_parent.json: whole-file writes (local or URI) that a
    reader sees complete or not at all."""
    locations.write_text(loc, json.dumps(data, indent=2))


def _search(*, space, base, ds, data_dir, search_dir, storage_path, name, samples, max_concurrent, workers,
            use_gpu, resume, uri, c, exp, parent, resume_cmd, graphs, log) -> dict:
    """Steps 3-5 of run_search: Tune, the ranking, the final test; returns the summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from gtc_ray.train.evaluate import evaluate_checkpoint
    metric = METRIC.format(base.eval.valid_metric)
    param_space = {"params": space.tune_param_space(), "base": base.to_dict(), "space": space.__dict__,
                   "data_dir": str(data_dir), "workers": workers, "use_gpu": use_gpu,
                   "trials_dir": locations.join(search_dir, "trials")}
    from gtc_ray.train.ingest import build_ingest
    trial_base = space.config_for(base, {})
    # read and cut once for every trial (ingest.py); trials then start without Ray Data work, so two
    # at once never wait on each other's reads
    ingest = build_ingest(ds, trial_base, graphs, workers, log,
                          content=True)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, ingest=ingest), {"cpu": TRIAL_CPU})
    cb = make_mlflow_callback(uri, exp, parent, {**tracking.dataset_tags(ds), **tracking.protocol_tags(base)}, metric,
                              storage_path)
    _EXPERIMENT_END.pop(parent, None)
    if resume:  # Tune restores its own config, including the callback, from tuner.pkl
        tuner = tune.Tuner.restore(locations.normalize(search_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space)
    else:
        sched = None
        if space.scheduler:
            s = space.scheduler
            sched = ASHAScheduler(time_attr="training_iteration", max_t=s.get("max_epochs", 100),
                                  grace_period=s.get("grace_period", 1), reduction_factor=s.get("reduction_factor", 2))
        # Fault tolerance at two levels, as Ray documents for Train inside Tune: each trial's
        # TorchTrainer restarts its worker group ray.max_failures times (build_trainer), and Tune
        # relaunches a trial whose driver itself failed (its actor or node lost) as many times;
        # the relaunched driver resumes its Train run from the latest checkpoint (same name =
        # trial id, same storage). A Train run that already used up its own restarts leaves a
        # `<trial>.failed` marker, so Tune's relaunches of it fail at once instead of running
        # (max_failures + 1)^2 attempts of a deterministic error; --resume clears the markers.
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=samples,
                                        max_concurrent_trials=max_concurrent, scheduler=sched),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=[cb],
                                      failure_config=tune.FailureConfig(max_failures=base.ray.max_failures)))
    grid = tuner.fit()  # after Ctrl-C, Tune stops the trials, saves its state and returns

    ended = _EXPERIMENT_END.pop(parent, {})
    unfinished = ended.get("unfinished", [])
    if unfinished or grid.num_terminated + grid.num_errors < len(grid):
        log(f"\nsearch {name} interrupted before trial(s) {', '.join(unfinished) or '(pending)'} finished: no "
            f"winner, no test evaluation. Continue it with:\n  {resume_cmd}")
        raise SearchInterrupted(resume_cmd)
    runs = ended.get("runs") or cb.runs

    # 5. rank on validation; test the best once
    rows = []
    for r in grid:
        hist = r.metrics_dataframe
        best_valid = float(hist[metric].max()) if hist is not None and metric in hist else float("nan")
        epochs = int(hist["epoch"].max()) + 1 if hist is not None and "epoch" in hist else 0
        rows.append({"trial": r.metrics.get("trial_id") if r.metrics else None, "params": r.config.get("params", {}),
                     "best_valid": best_valid, "epochs": epochs, "error": repr(r.error) if r.error else None,
                     "checkpoint": _location((r.metrics or {}).get("checkpoint_path"), storage_path),
                     "path": _location(r.path, storage_path)})
    rows.sort(key=lambda x: -x["best_valid"] if not math.isnan(x["best_valid"]) else math.inf)
    ok = [x for x in rows if x["checkpoint"] and not math.isnan(x["best_valid"])]
    if not ok:
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
               "valid": res["valid"], "test": res["test"], "protocol": res["protocol"], "parent_run_id": parent,
               "best_run_id": runs.get(best["trial"]) if best["trial"] else None,
               "tracking_uri": uri, "trials": rows, "stopped_early_or_converged": stopped,
               "data_dir": str(data_dir)}
    if summary["best_run_id"] is None:
        found = c.search_runs([exp], filter_string=f"tags.`gtc.trial_id` = '{best['trial']}'")
        summary["best_run_id"] = found[0].info.run_id if found else None
    final = {**{f"best_valid_{k}": v for k, v in res["valid"].items()}, **{f"test_{k}": v for k, v in res["test"].items()}}
    from mlflow.entities import Metric
    for rid in filter(None, (parent, summary["best_run_id"])):
        c.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in tracking.numeric_metrics(final).items()])
    c.set_tag(parent, "gtc.best_trial", best["trial"] or "")
    return summary


def _location(path: str | None, storage_path: str) -> str | None:
    """A path Tune reports (inside the storage's file system) as a location: the local path, or a
    URI under the search's storage."""
    from gtc_ray.train.checkpoint import checkpoint_location
    try:
        return checkpoint_location(path, storage_path) if path else path
    except ValueError:  # not under this storage (a search moved since): keep what Tune reported
        return path


# what a resumed search may change: only how the driver reaches Ray (trials keep the config they
# were started with, and the inputs the driver builds once must match it)
_RESUME_MAY_CHANGE = ("ray.address", "ray.num_cpus", "ray.object_store_memory")


def _refuse_changes_on_resume(saved: dict, given: dict, workers, use_gpu, name: str) -> None:
    """Tune restores every trial with the config it was started with: a --set, --config, --workers
    or --gpu given with --resume would not reach them (or would give them inputs cut for another
    config), so a change is refused rather than silently ignored."""
    flat_saved, flat_given = tracking.flatten(saved.get("config", {})), tracking.flatten(given)
    changed = sorted(k for k in set(flat_saved) | set(flat_given)
                     if flat_saved.get(k) != flat_given.get(k) and k not in _RESUME_MAY_CHANGE)
    if workers is not None and workers != saved.get("workers", workers):
        changed.append(f"--workers ({saved.get('workers')} -> {workers})")
    if use_gpu and not saved.get("use_gpu", False):
        changed.append("--gpu")
    if changed:
        shown = [c if c.startswith("--") else f"{c} ({flat_saved.get(c)!r} -> {flat_given.get(c)!r})" for c in changed]
        raise GtcInputError(f"--resume of search {name}", f"would change {', '.join(shown[:6])}"
                            + (f" and {len(shown) - 6} more" if len(shown) > 6 else "")
                            + ", which the search's trials keep from when they started",
                            "resume without these options, or start a new search (another --name) with them")


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def cli_tune(a, log=print) -> int:
    from gtc_ray.config import load_config
    overrides = list(a.overrides) + ([f"ray.max_failures={a.max_failures}"] if a.max_failures is not None else [])
    base = load_config(a.config, overrides)
    if a.resume and a.name:  # the search's own config; --config/--set given now apply on top of it
        saved = locations.join(a.storage or base.ray.storage_path, a.name, SEARCH_ARGS)
        if locations.is_file(saved):
            base = load_config(a.config, overrides, base=json.loads(locations.read_text(saved))["config"])
    run_search(a.data_dir, a.space, base=base, samples=a.samples, max_concurrent=a.max_concurrent, name=a.name,
               storage=a.storage, resume=a.resume, workers=a.workers, use_gpu=a.gpu, tracking_uri=a.tracking_uri,
               log=log)
    return 0
