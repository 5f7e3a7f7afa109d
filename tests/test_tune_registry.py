"""Search spaces, Ray Tune search with MLflow, registry hand-off and serving without Ray."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from gtc_ray.config import Config
from gtc_ray.errors import GtcInputError
from gtc_ray.tune.space import load_space

QUIET = dict(log=lambda *a, **k: None)


@pytest.mark.parametrize("name", ["wide", "paper", "ablation"])
def test_shipped_spaces_are_valid(name):
    s = load_space(ROOT / "tune_spaces" / f"{name}.yaml")
    assert s.params
    cfg = s.config_for(Config(), {k: (a[0] if d in ("grid", "choice") else a[0]) for k, (d, a) in s.params.items()})
    assert cfg.train.lr > 0


@pytest.mark.parametrize("body, needle", [
    ("params: {train.lrate: {uniform: [0.1, 1]}}", "unknown config key"),
    ("params: {trainer.lr: {uniform: [0.1, 1]}}", "unknown config section"),
    ("params: {train.lr: {gaussian: [0.1, 1]}}", "unknown distribution"),
    ("params: {model.tc_weight: {choice: []}}", "has no values"),
    ("params: {train.lr: {uniform: [1.0, 0.1]}}", "bounds reversed"),
    ("params: {train.lr: {loguniform: [0, 0.1]}}", "needs low > 0"),
    ("params: {train.lr: {uniform: 0.1}}", "needs a list"),
    ("params: {model.tc_mode: {choice: [n, cubic]}}", "is not valid"),
    ("params: {}", "non-empty mapping"),
    ("params: {graph.knn_k: {grid: [5, 10]}}", "fixed for the whole search"),
    ("params: {eval.mask_valid_in_test: {choice: [true, false]}}", "fixed for the whole search"),
    ("samples: 0\nparams: {train.lr: {uniform: [0.1, 1]}}", "positive integer"),
    ("scheduler: {type: hyperband}\nparams: {train.lr: {uniform: [0.1, 1]}}", "unknown scheduler"),
    ("budget: 3\nparams: {train.lr: {uniform: [0.1, 1]}}", "unknown top-level key"),
    ("params: {ablation: {grid: [gtc, magic]}}", "needs a grid or choice"),
    ("params: [train.lr", "not valid YAML"),
])
def test_bad_search_spaces(tmp_path, body, needle):
    f = tmp_path / "s.yaml"
    f.write_text(body + "\n")
    with pytest.raises(GtcInputError) as e:
        load_space(f)
    assert needle in str(e.value) and "Fix:" in str(e.value) and "s.yaml" in str(e.value)


TINY_SPACE = """
samples: 3
scheduler: {type: asha, max_epochs: 3, grace_period: 1, reduction_factor: 2}
fixed:
  train.epochs: 3
params:
  train.lr: {loguniform: [1.0e-3, 3.0e-2]}
  model.tc_weight: {uniform: [0.1, 1.0]}
"""


@pytest.fixture(scope="module")
def search(ray_cluster, tiny, tmp_path_factory):
    from conftest import tiny_config
    from gtc_ray.tune.driver import run_search
    d = tmp_path_factory.mktemp("search")
    (d / "space.yaml").write_text(TINY_SPACE)
    uri = f"sqlite:///{d / 'mlflow.db'}"
    s = run_search(tiny, d / "space.yaml", base=tiny_config(), name="s", storage=d / "runs", workers=1,
                   tracking_uri=uri, **QUIET)
    return s, d, uri


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_search_logs_nested_runs(search):
    from mlflow.tracking import MlflowClient
    s, d, uri = search
    assert len(s["trials"]) == 3 and s["best_trial"] and 0 < s["valid"]["recall@20"] <= 1 and s["test"]
    best = max(t["best_valid"] for t in s["trials"])
    assert s["trials"][0]["best_valid"] == best  # ranked on validation
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("gtc-ray").experiment_id
    parent = c.get_run(s["parent_run_id"])
    assert parent.info.status == "FINISHED" and "test_recall_at_20" in parent.data.metrics
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{s['parent_run_id']}'")
    assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
    for r in children:
        hist = c.get_metric_history(r.info.run_id, "valid_recall_at_20")
        assert len(hist) >= 1 and sorted(h.step for h in hist) == list(range(len(hist)))
        assert "train.lr" in r.data.params and r.data.tags["gtc.dataset_hash"]
        assert {a.path for a in c.list_artifacts(r.info.run_id)} >= {"config.yaml", "training_curves.png"}
    assert (d / "runs" / "s" / "search.json").is_file()



@pytest.mark.ray
@pytest.mark.timeout(300)
def test_failure_in_the_final_evaluation_ends_the_search_failed(search, tiny, tmp_path, monkeypatch):
    """The search's last step, the test evaluation of the winner, fails: its MLflow parent run ends
    FAILED (not RUNNING) and no search.json names a winner. Runs on a copy of the finished search,
    resumed (every trial is done, so Tune has nothing to rerun and the driver goes straight on)."""
    import shutil
    from mlflow.tracking import MlflowClient
    import gtc_ray.train.evaluate as eval_mod
    from conftest import tiny_config
    from gtc_ray.tune.driver import run_search
    s, d, uri = search
    shutil.copytree(d / "runs" / "s", tmp_path / "runs" / "s", ignore=shutil.ignore_patterns("search.json"))
    shutil.copy(d / "mlflow.db", tmp_path / "mlflow.db")
    copy_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def broken(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(eval_mod, "evaluate_checkpoint", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_search(tiny, d / "space.yaml", base=tiny_config(), name="s", storage=tmp_path / "runs", resume=True,
                   workers=1, tracking_uri=copy_uri, **QUIET)
    c = MlflowClient(copy_uri)
    assert c.get_run(s["parent_run_id"]).info.status == "FAILED"
    kids = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{s['parent_run_id']}'")
    assert len(kids) == 3 and {k.info.status for k in kids} == {"FINISHED"}
    assert not (tmp_path / "runs" / "s" / "search.json").exists()
    assert MlflowClient(uri).get_run(s["parent_run_id"]).info.status == "FINISHED"  # the original is untouched

@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("argv, needle", [
    (["--set", "graph.knn_k=7"], "graph.knn_k ('5' -> '7')"),
    (["--workers", "2"], "--workers (1 -> 2)"),
    (["--set", "train.lr=0.5"], "train.lr"),
])
def test_resume_refuses_options_the_trials_would_not_get(search, tiny, tmp_path, capsys, argv, needle):
    """Tune restores the trials with the config they started with: a changed option on --resume is
    refused (exit 2, naming it) before any work, not silently ignored."""
    import shutil
    from gtc_ray.cli import main
    s, d, uri = search
    shutil.copytree(d / "runs" / "s", tmp_path / "runs" / "s", ignore=shutil.ignore_patterns("search.json"))
    cmd = ["tune", str(tiny), "--space", str(d / "space.yaml"), "--name", "s", "--resume",
           "--storage", str(tmp_path / "runs"), "--tracking-uri", uri]
    rc = main(cmd + argv)  # the search's saved config and options, plus what argv changes
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "start a new search" in err, err
    assert not (tmp_path / "runs" / "s" / "search.json").exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_registry_serves_the_checkpoint_without_ray(search, tiny, tmp_path):
    from mlflow.tracking import MlflowClient
    from gtc_ray.data.prepare import train_matrix
    from gtc_ray.registry.register import register
    from gtc_ray.train.loop import derive_seed
    from gtc_ray.train.evaluate import load_checkpoint_model
    s, d, uri = search
    r = register(name="gtc", search="s", storage=d / "runs", alias="champion", tracking_uri=uri, **QUIET)
    assert r["created"] and r["version"] >= 1
    again = register(name="gtc", search="s", storage=d / "runs", alias="champion", tracking_uri=uri, **QUIET)
    assert not again["created"] and again["version"] == r["version"]  # same checkpoint, same version
    c = MlflowClient(uri, registry_uri=uri)
    mv = c.get_model_version_by_alias("gtc", "champion")
    assert mv.tags["gtc.source_run"] == s["best_run_id"] and "test.recall_at_20" in mv.tags
    assert mv.tags["gtc.dataset_hash"]
    assert mv.tags["gtc.eval_protocol"] == "spec"  # the version's metrics say what produced them

    # reference top-10 from the checkpoint
    model, ds, cfg, meta = load_checkpoint_model(s["checkpoint"])
    scores = model.full_sort_predict(torch.arange(ds.num_users), seed=derive_seed(cfg.train.seed, "eval")).numpy()
    seen = train_matrix(ds.users, ds.items, ds.num_users, ds.num_items).toarray() > 0
    scores = np.where(seen, -np.inf, scores)
    test_users = np.unique(ds.split_pairs("test")[0])
    ref = {str(ds.user_ids[u]): [str(ds.item_ids[i]) for i in np.lexsort((np.arange(ds.num_items), -scores[u]))[:10]]
           for u in test_users}

    # serve in a fresh process, no Ray imported
    script = textwrap.dedent(f"""
        import json, sys, mlflow, pandas as pd
        mlflow.set_tracking_uri({uri!r}); mlflow.set_registry_uri({uri!r})
        m = mlflow.pyfunc.load_model("models:/gtc@champion")
        users = json.loads(sys.stdin.read())
        out = m.predict(pd.DataFrame({{"user_id": users, "k": [10] * len(users), "exclude_seen": [True] * len(users)}}))
        sig = m.metadata.signature
        print(json.dumps({{"recs": out.groupby("user_id", sort=False)["item_id"].apply(list).to_dict(),
                          "ray": "ray" in sys.modules, "torch": "torch" in sys.modules,
                          "inputs": sig.inputs.input_names(), "outputs": sig.outputs.input_names()}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", script], input=json.dumps(list(ref)), capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert not res["ray"] and not res["torch"]
    assert res["inputs"] == ["user_id", "k", "exclude_seen"] and res["outputs"] == ["user_id", "rank", "item_id", "score"]
    assert res["recs"] == ref  # every test user, same top-10


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_recommend_cli_errors(search, capsys):
    from gtc_ray.cli import main
    s, d, uri = search
    from gtc_ray.registry.register import register
    register(name="gtc", search="s", storage=d / "runs", alias="champion", tracking_uri=uri, **QUIET)
    assert main(["recommend", "--model", "models:/gtc@champion", "--user", "nobody", "--tracking-uri", uri]) == 2
    assert "unknown to this model" in capsys.readouterr().err
    assert main(["recommend", "--model", "models:/nope@champion", "--user", "u1", "--tracking-uri", uri]) == 2
    assert main(["register", "--name", "gtc", "--tracking-uri", uri]) == 2
    assert "exactly one of --search" in capsys.readouterr().err


def _training_window(c, run_id) -> tuple[float, float]:
    """(start, end) in seconds of one trial's training, conservatively: from its first epoch report's
    time less that epoch's training seconds (so later than the real start, by the epoch's
    evaluation and the report's way to the driver) to its last epoch report."""
    first = min(c.get_metric_history(run_id, "train_seconds"), key=lambda m: m.step)
    reports = c.get_metric_history(run_id, "valid_recall_at_20")
    t_first = min(m.timestamp for m in reports if m.step == first.step) / 1000
    return t_first - first.value, max(m.timestamp for m in reports) / 1000


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_parallel_trials_overlap_and_share_the_dataset_read_only(ray_cluster, tiny, tmp_path):
    """Two trials at once on one dataset directory: they train at the same time (their training
    windows intersect) and neither writes outside its own trial directory."""
    import shutil
    from mlflow.tracking import MlflowClient
    from conftest import tiny_config
    from gtc_ray.data.dataset import load_dataset
    from gtc_ray.data.prepare import prepare
    from gtc_ray.tune.driver import run_search
    data = tmp_path / "data"
    shutil.copytree(tiny, data, ignore=shutil.ignore_patterns("prepared"))
    # 2 trials x 1 worker x 0.4 CPU + 2 x 0.1 trial driver = 1 CPU, the other one stays with Ray Data
    base = tiny_config(ray={"cpus_per_worker": 0.4})
    prepare(load_dataset(data), base.graph, log=lambda m: None)  # what the driver does before any trial
    snap = lambda: {str(p.relative_to(data)): (p.stat().st_mtime_ns, p.stat().st_size) for p in data.rglob("*")}
    before = snap()
    # 60 tiny epochs (~13 s of training each here) outlast the trials' differences in start-up (2-5 s)
    (tmp_path / "space.yaml").write_text("samples: 1\nfixed: {train.epochs: 60, train.patience: 100}\n"
                                         "params: {train.lr: {grid: [0.01, 0.02]}}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = run_search(data, tmp_path / "space.yaml", base=base, max_concurrent=2, name="par",
                   storage=tmp_path / "runs", workers=1, tracking_uri=uri, **QUIET)
    assert snap() == before  # the shared dataset and its prepared graphs are untouched
    trial_dirs = {Path(t["checkpoint"]).parent for t in s["trials"]}
    assert len(trial_dirs) == 2  # each trial wrote only under its own directory
    c = MlflowClient(uri)
    kids = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{s['parent_run_id']}'")
    (a0, a1), (b0, b1) = (_training_window(c, k.info.run_id) for k in kids)
    assert max(a0, b0) < min(a1, b1), ((a0, a1), (b0, b1))  # both were training at once


class _Trial:
    """The few attributes of a Tune Trial that MlflowTrialLogger reads."""

    def __init__(self, tid, status="RUNNING"):
        from gtc_ray.tune.space import SearchSpace
        self.trial_id, self.status, self.last_result = tid, status, {}
        space = SearchSpace(path="s.yaml", params={"train.lr": ("uniform", [0.001, 0.01])})
        self.config = {"params": {"train.lr": 0.005}, "base": Config().to_dict(), "space": space.__dict__}


@pytest.mark.timeout(120)
def test_trial_logger_ends_every_child_run(tmp_path):
    """After Ctrl-C Tune stops the running trials without on_trial_complete/on_trial_error: the
    callback ends their runs KILLED at the end of the experiment and reports them unfinished."""
    from mlflow.tracking import MlflowClient
    from gtc_ray import tracking
    from gtc_ray.tune import driver
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.experiment_id(c, uri)
    parent = c.create_run(exp, run_name="p").info.run_id
    cb = driver.make_mlflow_callback(uri, exp, parent, {}, "valid_recall@20")
    done, failed, cut, waiting = _Trial("t_done"), _Trial("t_failed"), _Trial("t_cut"), _Trial("t_wait", "PENDING")
    for t in (done, failed, cut):
        cb.on_trial_start(0, [], t)
        cb.on_trial_result(0, [], t, {"epoch": 0, "train_loss": 1.0, "valid_recall@20": 0.5})
    cb.on_trial_complete(0, [], done)
    cb.on_trial_error(0, [], failed)
    done.status, failed.status, cut.status = "TERMINATED", "ERROR", "TERMINATED"  # what Tune's clean-up sets
    cb.on_experiment_end([done, failed, cut, waiting])
    ended = driver._EXPERIMENT_END.pop(parent)
    assert ended["unfinished"] == ["t_cut", "t_wait"]
    m = MlflowClient(uri)
    status = {r.data.tags["gtc.trial_id"]: r.info.status
              for r in m.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert status == {"t_done": "FINISHED", "t_failed": "FAILED", "t_cut": "KILLED"}
    assert [h.step for h in m.get_metric_history(ended["runs"]["t_cut"], "valid_recall_at_20")] == [0]


class _RayReached(Exception):
    pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("error, rc, status", [(_RayReached("start Ray here"), None, "FAILED"),
                                               (KeyboardInterrupt(), 130, "KILLED")])
def test_readme_wide_search_passes_every_check_with_the_defaults(tiny, tmp_path, monkeypatch, error, rc, status):
    """`gtc-ray tune D --space tune_spaces/wide.yaml` as the README gives it (2 workers per trial,
    default config, 2 local CPUs) gets past every check up to starting Ray (it exited 2 before
    ray.cpus_per_worker was sized automatically); a failure or Ctrl-C there ends the search's
    MLflow run FAILED or KILLED."""
    import shutil
    from mlflow.tracking import MlflowClient
    import gtc_ray.train.cluster as cluster_mod
    from gtc_ray.cli import main
    seen = {}

    def start_ray(cfg, log, workers, extra_cpu):
        seen.update(cpw=cfg.ray.cpus_per_worker, workers=workers, extra=extra_cpu)
        raise error

    monkeypatch.setattr(cluster_mod, "ensure_ray", start_ray)
    shutil.copytree(tiny, tmp_path / "D", ignore=shutil.ignore_patterns("prepared"))
    monkeypatch.chdir(ROOT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["tune", str(tmp_path / "D"), "--space", "tune_spaces/wide.yaml", "--storage", str(tmp_path / "runs"),
            "--tracking-uri", uri]
    if rc is None:
        with pytest.raises(_RayReached):
            main(argv)
    else:
        assert main(argv) == rc
    assert seen == {"cpw": 0.45, "workers": 2, "extra": pytest.approx(0.1)}  # 2 x 0.45 + 0.1 leaves Ray Data 1 CPU
    c = MlflowClient(uri)
    [run] = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id])
    assert run.info.status == status and run.data.tags["gtc.kind"] == "search"
    assert run.data.tags["gtc.eval_protocol"] == "spec"
    assert not list((tmp_path / "runs").glob("*/search.json"))


@pytest.mark.timeout(120)
def test_trial_whose_train_run_gave_up_is_not_relaunched(tmp_path, monkeypatch):
    """A trial's TorchTrainer failed after its own ray.max_failures restarts: Tune's relaunches of
    the trial (its FailureConfig) fail at once instead of repeating the Train run's restarts."""
    import ray.train
    import ray.tune
    import gtc_ray.train.run as run_mod
    from gtc_ray.tune.driver import trial_driver
    from gtc_ray.tune.space import SearchSpace
    built = []

    class Trainer:
        def fit(self):
            raise ray.train.WorkerGroupError("worker 0 raised ValueError", {})

    class Ctx:
        def get_trial_id(self):
            return "t1"

    monkeypatch.setattr(ray.tune, "get_context", lambda: Ctx())
    monkeypatch.setattr("ray.tune.integration.ray_train.TuneReportCallback", lambda: None)
    monkeypatch.setattr(run_mod, "build_trainer", lambda *a, **k: built.append(1) or Trainer())
    space = SearchSpace(path="s.yaml", params={"train.lr": ("uniform", [0.001, 0.01])})
    config = {"space": space.__dict__, "base": Config().to_dict(), "params": {"train.lr": 0.005},
              "data_dir": str(tmp_path), "workers": 1, "use_gpu": False, "trials_dir": str(tmp_path / "trials")}
    with pytest.raises(ray.train.WorkerGroupError):
        trial_driver(config)
    with pytest.raises(RuntimeError, match="failed after ray.max_failures=3 worker-group restarts"):
        trial_driver(config)  # Tune's relaunch
    assert built == [1]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_lost_trial_driver_is_relaunched_and_resumes_its_train_run(ray_cluster, tiny, tmp_path):
    """SIGKILL of a trial's driver process (the Tune trial actor; Ray Train cannot handle its own
    driver's loss): Tune's FailureConfig (ray.max_failures) relaunches the trial, its Train run
    resumes from the latest checkpoint (no epoch trained twice), and the search ends normally."""
    import signal
    import threading
    import time
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors
    from conftest import tiny_config
    from gtc_ray.tune.driver import run_search
    # 60 tiny epochs: long enough to kill the driver mid-run (trials start with their data ingested)
    (tmp_path / "space.yaml").write_text("samples: 1\nfixed: {train.epochs: 60, train.patience: 100}\n"
                                         "params: {train.lr: {grid: [0.01]}}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the store before polling it from this thread
    out, errors = {}, []

    def target():
        try:
            out["s"] = run_search(tiny, tmp_path / "space.yaml", base=tiny_config(), name="ft", workers=1,
                                  storage=tmp_path / "runs", tracking_uri=uri, **QUIET)
        except BaseException as e:  # surfaced below
            errors.append(e)

    th = threading.Thread(target=target)
    th.start()
    killed, deadline = None, time.time() + 300
    c = MlflowClient(uri)
    while time.time() < deadline and th.is_alive() and killed is None:
        time.sleep(0.3)
        try:
            exp = c.get_experiment_by_name("gtc-ray")
            kids = c.search_runs([exp.experiment_id], filter_string="tags.`gtc.kind` = 'trial'") if exp else []
            if kids and len(c.get_metric_history(kids[0].info.run_id, "valid_recall_at_20")) >= 2:
                drivers = list_actors(address=ray_cluster.get_runtime_context().gcs_address,
                                      filters=[("class_name", "=", "ImplicitFunc"), ("state", "=", "ALIVE")])
                if drivers:
                    killed = drivers[0].pid
                    os.kill(killed, signal.SIGKILL)
        except Exception:  # the store busy with the search's writes: poll again
            continue
    th.join(timeout=400)
    assert not errors, errors
    assert killed is not None, "the trial finished before its driver could be killed"
    s = out["s"]
    assert s["best_trial"] and s["trials"][0]["epochs"] == 60 and not s["trials"][0]["error"]
    [kid] = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id],
                          filter_string="tags.`gtc.kind` = 'trial'")
    assert kid.info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(kid.info.run_id, "valid_recall_at_20")) == list(range(60))
