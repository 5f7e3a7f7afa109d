"""Checkpoints and search state in Ray Train/Tune storage on a URI (the session's S3 test server):
`gtc-ray train/tune --storage s3://...`, their --resume, and `evaluate` / `register` of what they
left there, read back through Ray's checkpoint API without a Ray cluster. The in-process runner
and Ray Train local mode keep checkpoints in local directories and are refused with a URI."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from gtc_ray import storage
from gtc_ray.cli import main
from gtc_ray.errors import GtcInputError

QUIET = dict(log=lambda *a, **k: None)

# tests/conftest.py's tiny_config as a config file, for the CLI
TINY = {"graph": {"knn_k": 5}, "model": {"noise_steps": 50, "embedding_size": 16, "user_graph_k": 5},
        "train": {"epochs": 2, "batch_size": 256, "lr": 0.01}, "eval": {"topk": [5, 10, 20]}}


def _config_file(d: Path) -> Path:
    f = d / "tiny.yaml"
    f.write_text(yaml.safe_dump(TINY))
    return f


def _local_leftovers(root: Path) -> list[str]:
    """Anything under `root` that looks like run storage: a checkpoint, a runs dir, an 's3:' dir."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith("checkpoint_") or p.name in ("gtc_runs", "s3:", "runs", "trials"))


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3, tiny, tmp_path_factory):
    """One `gtc-ray train --workers 1 --storage s3://BUCKET/runs`, run from an empty directory."""
    root = tmp_path_factory.mktemp("s3train")
    runs = f"{s3()}/runs"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        rc = main(["train", str(tiny), "--config", str(_config_file(root)), "--workers", "1", "--storage", runs,
                   "--name", "r", "--tracking-uri", uri, "--metrics-out", str(root / "m.json")])
    assert rc == 0
    return {"root": root, "runs": runs, "uri": uri, "m": json.loads((root / "m.json").read_text())}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_leaves_its_checkpoints_in_the_bucket(s3_run):
    from mlflow.tracking import MlflowClient
    m, runs = s3_run["m"], s3_run["runs"]
    ck = m["checkpoint"]
    assert ck.startswith(f"{runs}/r/checkpoint_"), ck  # a URI, not <cwd>/s3:/...
    assert storage.is_file(storage.join(ck, "meta.json")) and storage.is_file(storage.join(ck, "model.pt"))
    kept = [n for n in storage.listdir(f"{runs}/r") if n.startswith("checkpoint_") and not n.endswith(".json")]
    assert storage.name(ck) in kept and 1 <= len(kept) <= 2  # train.keep_checkpoints, applied by Ray
    assert _local_leftovers(s3_run["root"]) == []  # nothing landed in a local runs dir
    assert not (ROOT / "s3:").exists()
    c = MlflowClient(s3_run["uri"])
    [run] = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id],
                          filter_string="tags.`gtc.kind` = 'train'")
    assert run.info.status == "FINISHED" and run.data.tags["gtc.checkpoint"] == ck


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_evaluate_and_register_a_checkpoint_uri_without_ray(s3_run, tiny, tmp_path):
    """From another directory and a process with no Ray cluster: `gtc-ray evaluate s3://...` gives
    the run's metrics and `gtc-ray register --checkpoint s3://...` registers it (on the train run
    that produced it); neither starts Ray, and neither leaves its downloaded copy behind."""
    from mlflow.tracking import MlflowClient
    from gtc_ray.data.dataset import load_dataset
    from gtc_ray.registry.register import recommend
    m, uri = s3_run["m"], s3_run["uri"]
    ck = m["checkpoint"]
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys, tempfile
        import ray
        from gtc_ray.cli import main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main(["evaluate", {ck!r}, "--json"])
        out = buf.getvalue()
        rc2 = main(["register", "--checkpoint", {ck!r}, "--name", "gtc_s3", "--tracking-uri", {uri!r}])
        left = [p for p in __import__("os").listdir(tempfile.gettempdir()) if p.startswith("gtc-ckpt-dl-")]
        print("RESULT " + json.dumps({{"rc": rc, "rc2": rc2, "eval": json.loads(out[out.index("{{"):]),
                                      "ray": ray.is_initialized(), "left": left}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TMPDIR"] = str(tmp_path)  # a temp dir of its own: only its own downloads can be there
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    assert res["rc"] == 0 and res["rc2"] == 0 and not res["ray"] and res["left"] == []
    for split in ("valid", "test"):
        assert res["eval"][split] == pytest.approx(m[split], abs=1e-6)
    c = MlflowClient(uri)
    [v] = c.search_model_versions("name = 'gtc_s3'")
    [train_run] = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id],
                                filter_string="tags.`gtc.kind` = 'train'")
    assert v.tags["gtc.checkpoint"] == ck and v.tags["gtc.source_run"] == train_run.info.run_id
    assert float(v.tags["test.recall_at_20"]) == pytest.approx(m["test"]["recall@20"], abs=1e-6)
    user = str(load_dataset(tiny).user_ids[0])
    assert len(recommend("models:/gtc_s3/1", [user], k=5, tracking_uri=uri)) == 5


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_evaluate_a_missing_checkpoint_uri_is_a_user_error(s3_run, capsys):
    assert main(["evaluate", f"{s3_run['runs']}/r/checkpoint_nope"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_nope" in err and "has no meta.json" in err and "Fix:" in err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_resume_of_the_finished_run_from_its_uri_gives_the_same_result(s3_run, tiny):
    root, runs = s3_run["root"], s3_run["runs"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        rc = main(["train", str(tiny), "--config", str(_config_file(root)), "--workers", "1", "--storage", runs,
                   "--name", "r", "--resume", "--tracking-uri", s3_run["uri"], "--metrics-out", str(root / "m2.json")])
    assert rc == 0
    a, b = s3_run["m"], json.loads((root / "m2.json").read_text())
    assert b["valid"] == pytest.approx(a["valid"], abs=1e-9) and b["test"] == pytest.approx(a["test"], abs=1e-9)
    assert b["best_epoch"] == a["best_epoch"]
    assert b["checkpoint"].startswith(f"{runs}/r/checkpoint_") and storage.is_file(storage.join(b["checkpoint"],
                                                                                              "meta.json"))
    assert _local_leftovers(root) == []


@pytest.mark.timeout(120)
def test_inprocess_and_local_mode_refuse_a_uri_storage(tiny, tmp_path, monkeypatch, capsys):
    """Both keep checkpoints in local directories: refused before any work (no Ray, no MLflow run,
    nothing written anywhere), with the fix (--workers >= 1)."""
    import gtc_ray.train.cluster as cluster_mod
    import gtc_ray.train.run as run_mod
    from conftest import tiny_config
    from gtc_ray.train.run import run_training

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(run_mod, "ensure_ray", no_ray)
    monkeypatch.setattr(cluster_mod, "ensure_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GtcInputError, match=r"in-process runner.*--workers >= 1"):
        run_training(tiny, tiny_config(), runner="inprocess", storage="s3://no-such-bucket/runs", name="x", **QUIET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", str(tiny), "--workers", "0", "--storage", "s3://no-such-bucket/runs",
                 "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "local mode" in err and "--workers >= 1" in err and "s3://no-such-bucket/runs" in err
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no runs dir, no 's3:' dir


@pytest.mark.timeout(120)
def test_a_search_in_local_mode_refuses_a_uri_storage(s3, tiny, tmp_path, monkeypatch):
    import gtc_ray.train.cluster as cluster_mod
    from conftest import tiny_config
    from gtc_ray.tune.driver import run_search

    def no_ray(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(cluster_mod, "ensure_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("samples: 1\nparams: {train.lr: {grid: [0.01]}}\n")
    bucket = s3()
    with pytest.raises(GtcInputError, match=r"local mode.*--workers >= 1"):
        run_search(tiny, tmp_path / "space.yaml", base=tiny_config(), name="s", storage=f"{bucket}/runs", workers=0,
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **QUIET)
    assert storage.walk_files(bucket) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_search_on_s3_then_register_and_resume(ray_cluster, s3, tiny, tmp_path, monkeypatch):
    """`gtc-ray tune --storage s3://...` (1 trial, 2 epochs): its state, trial checkpoints and
    search.json are in the bucket, the summary names checkpoint URIs, `register --search NAME
    --storage s3://...` registers the winner, and `--resume` of the finished search from the URI
    (with a stale trials/<id>.failed marker, which it clears) gives the same winner."""
    from mlflow.tracking import MlflowClient
    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text("samples: 1\nfixed: {train.epochs: 2}\nparams: {train.lr: {grid: [0.01]}}\n")
    runs = f"{s3()}/runs"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["tune", str(tiny), "--space", str(tmp_path / "space.yaml"), "--config", str(_config_file(tmp_path)),
            "--workers", "1", "--storage", runs, "--name", "s", "--tracking-uri", uri]
    assert main(argv) == 0
    sdir = f"{runs}/s"
    for f in ("search.json", "search_args.json", "mlflow_parent.json", "tuner.pkl"):
        assert storage.is_file(storage.join(sdir, f)), f
    s = json.loads(storage.read_text(storage.join(sdir, "search.json")))
    assert s["checkpoint"].startswith(f"{sdir}/trials/") and storage.is_file(storage.join(s["checkpoint"], "meta.json"))
    assert s["trials"][0]["checkpoint"] == s["checkpoint"] and s["trials"][0]["path"].startswith(f"{sdir}/")
    assert _local_leftovers(tmp_path) == []
    c = MlflowClient(uri)
    [kid] = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id],
                          filter_string="tags.`gtc.kind` = 'trial'")
    assert kid.info.status == "FINISHED"
    # the trial logger read the trial's history back from its checkpoint URI
    assert {a.path for a in c.list_artifacts(kid.info.run_id)} >= {"config.yaml"}

    assert main(["register", "--search", "s", "--storage", runs, "--name", "gtc_search", "--tracking-uri", uri]) == 0
    [v] = c.search_model_versions("name = 'gtc_search'")
    assert v.tags["gtc.checkpoint"] == s["checkpoint"] and v.tags["gtc.source_run"] == s["best_run_id"]

    marker = storage.join(sdir, "trials", f"{s['best_trial']}.failed")
    storage.write_text(marker, "stale")
    assert main(argv + ["--resume"]) == 0
    assert not storage.exists(marker)
    r = json.loads(storage.read_text(storage.join(sdir, "search.json")))
    assert r["best_trial"] == s["best_trial"] and r["checkpoint"] == s["checkpoint"]
    assert r["test"] == pytest.approx(s["test"], abs=1e-9) and r["parent_run_id"] == s["parent_run_id"]
