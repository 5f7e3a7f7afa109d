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
@pytest.mark.timeout(600)
def test_registry_serves_the_checkpoint_without_ray(search, tiny, tmp_path):
    from mlflow.tracking import MlflowClient
    from gtc_ray.data.prepare import train_matrix
    from gtc_ray.registry.register import register
    from gtc_ray.train.loop import derive_seed
    from gtc_ray.train.run import load_checkpoint_model
    s, d, uri = search
    r = register(name="gtc", search="s", storage=d / "runs", alias="champion", tracking_uri=uri, **QUIET)
    assert r["created"] and r["version"] >= 1
    again = register(name="gtc", search="s", storage=d / "runs", alias="champion", tracking_uri=uri, **QUIET)
    assert not again["created"] and again["version"] == r["version"]  # same checkpoint, same version
    c = MlflowClient(uri, registry_uri=uri)
    mv = c.get_model_version_by_alias("gtc", "champion")
    assert mv.tags["gtc.source_run"] == s["best_run_id"] and "test.recall_at_20" in mv.tags
    assert mv.tags["gtc.dataset_hash"]

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


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_parallel_trials_share_the_dataset_read_only(ray_cluster, tiny, tmp_path):
    """Two trials at once on one dataset directory: neither writes outside its own trial directory."""
    import shutil
    from conftest import tiny_config
    from gtc_ray.data.dataset import load_dataset
    from gtc_ray.data.prepare import prepare
    from gtc_ray.tune.driver import run_search
    data = tmp_path / "data"
    shutil.copytree(tiny, data, ignore=shutil.ignore_patterns("prepared"))
    base = tiny_config(ray={"cpus_per_worker": 0.4})
    prepare(load_dataset(data), base.graph, log=lambda m: None)  # what the driver does before any trial
    snap = lambda: {str(p.relative_to(data)): (p.stat().st_mtime_ns, p.stat().st_size) for p in data.rglob("*")}
    before = snap()
    (tmp_path / "space.yaml").write_text("samples: 2\nfixed: {train.epochs: 3}\nparams: {train.lr: {grid: [0.01, 0.02]}}\n")
    s = run_search(data, tmp_path / "space.yaml", base=base, samples=1, max_concurrent=2, name="par",
                   storage=tmp_path / "runs", workers=1, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **QUIET)
    assert snap() == before  # the shared dataset and its prepared graphs are untouched
    trial_dirs = {Path(t["checkpoint"]).parent for t in s["trials"]}
    assert len(trial_dirs) == 2  # each trial wrote only under its own directory
    # (tiny trials may finish before the other starts: the snapshot above is the property checked)
