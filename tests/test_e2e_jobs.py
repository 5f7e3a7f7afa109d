"""End to end: a real Ray head node on loopback, `jobs/train.py` submitted with JobSubmissionClient.

Runs in its own pytest invocation (`-m e2e`, see the Makefile), apart from the suite's local cluster.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from raynodes import RayNodes

pytestmark = pytest.mark.e2e


def _create_store(uri: str) -> None:
    """Create and migrate the SQLite store before a subprocess and this test's polling both use it:
    two processes creating it at once race ("no such column" in one of them)."""
    from mlflow.tracking import MlflowClient
    MlflowClient(uri).search_experiments()


@pytest.fixture
def head_node():
    """A Ray head node of its own on loopback (tests/raynodes.py): free GCS, dashboard, Ray Client and
    dashboard-agent ports, so it coexists with any other Ray on the machine, and stopped by PID (a
    `ray stop` here used to end every Ray of the machine, other people's runs included)."""
    with RayNodes(workers=0, head_cpus=2) as c:
        yield c.address, c.env


@pytest.mark.timeout(600)
def test_submit_train_job_and_find_mlflow_run(head_node, tiny, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient
    address, env = head_node
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    data = tmp_path / "data"
    shutil.copytree(tiny, data, ignore=shutil.ignore_patterns("prepared"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the cluster runs the entrypoint through a shell: name the interpreter that has gtc-ray's requirements
    entry = (f"{sys.executable} jobs/train.py {data} --workers 1 --epochs 2 --set graph.knn_k=5 --set model.noise_steps=50 "
             f"--set model.embedding_size=16 --set train.batch_size=256 --set 'eval.topk=[5, 10, 20]' "
             f"--storage {tmp_path / 'runs'} --name jobrun --tracking-uri {uri}")
    client = JobSubmissionClient(address)
    job = client.submit_job(entrypoint=entry, runtime_env={
        "working_dir": str(ROOT),
        "excludes": [".venv", ".git", "runs", "gtc_runs", "mlruns", "mlartifacts", "mlflow.db", "*.egg-info"]})
    deadline = time.time() + 480
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "recall@20" in logs
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("gtc-ray").experiment_id], filter_string="attributes.run_name = 'jobrun'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(c.get_metric_history(runs[0].info.run_id, "valid_recall_at_20")) == 2


RESUME_SPACE = """
samples: 4
fixed:
  train.epochs: 3
  graph.knn_k: 5
  model.noise_steps: 50
  model.embedding_size: 16
  train.batch_size: 256
  eval.topk: [5, 10, 20]
params:
  train.lr: {loguniform: [1.0e-3, 3.0e-2]}
"""


@pytest.mark.timeout(900)
def test_tune_driver_sigkill_then_resume(tiny, tmp_path):
    """SIGKILL the `gtc-ray tune` process group mid-search; `--resume` finishes it without rerunning
    finished trials, and MLflow ends with one child run per trial, none left RUNNING."""
    import signal
    from mlflow.tracking import MlflowClient
    data = tmp_path / "data"
    shutil.copytree(tiny, data, ignore=shutil.ignore_patterns("prepared"))
    (tmp_path / "space.yaml").write_text(RESUME_SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli = [str(Path(sys.executable).with_name("gtc-ray")), "tune", str(data), "--space", str(tmp_path / "space.yaml"),
           "--workers", "1", "--name", "s", "--storage", str(tmp_path / "runs"), "--tracking-uri", uri]
    _create_store(uri)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    log = open(tmp_path / "first.log", "w")
    p = subprocess.Popen(cli, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    finished_before = []
    deadline = time.time() + 400
    try:
        while time.time() < deadline and p.poll() is None:
            time.sleep(1)
            try:
                c = MlflowClient(uri)
                exp = c.get_experiment_by_name("gtc-ray")
                if exp is None:
                    continue
                kids = c.search_runs([exp.experiment_id], filter_string="tags.`gtc.kind` = 'trial'")
                finished_before = [r.data.tags["gtc.trial_id"] for r in kids if r.info.status == "FINISHED"]
                running = [r for r in kids if r.info.status == "RUNNING"]
                if finished_before and running:  # one trial done, the next one mid-run
                    break
            except Exception:  # the store may be mid-migration on first use
                continue
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray it started: a lost driver machine
        p.wait()
    assert finished_before, (tmp_path / "first.log").read_text()[-3000:]
    r = subprocess.run(cli + ["--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((tmp_path / "runs" / "s" / "search.json").read_text())
    assert len(summary["trials"]) == 4
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("gtc-ray").experiment_id
    kids = c.search_runs([exp], filter_string="tags.`gtc.kind` = 'trial'")
    ids = [k.data.tags["gtc.trial_id"] for k in kids]
    assert len(ids) == len(set(ids)) == 4  # no duplicated trial runs
    assert {k.info.status for k in kids} == {"FINISHED"}  # none orphaned
    assert c.get_run(summary["parent_run_id"]).info.status == "FINISHED"
    for k in kids:
        steps = [m.step for m in c.get_metric_history(k.info.run_id, "valid_recall_at_20")]
        if k.data.tags["gtc.trial_id"] in finished_before:
            assert sorted(steps) == [0, 1, 2]  # finished before the kill: not rerun


SIGINT_SPACE = """
samples: 1
max_concurrent: 2
fixed:
  train.epochs: 4
  train.patience: 100
params:
  train.lr: {grid: [0.005, 0.02]}
"""


@pytest.mark.timeout(600)
def test_tune_ctrl_c_ends_every_run_then_resume(tiny, tmp_path):
    """A real SIGINT (Ctrl-C) to `gtc-ray tune` once a trial has reported an epoch: Tune stops
    gracefully, the search exits non-zero without a winner, every MLflow run of it has ended (the
    parent and the cut trials KILLED) and it prints the resume command; that command, run as
    printed, finishes the search: a winner, all runs FINISHED, no epoch logged twice or missing."""
    import shlex
    import signal
    from mlflow.tracking import MlflowClient
    from gtc_ray.tune.driver import resume_command
    data = tmp_path / "data"
    shutil.copytree(tiny, data, ignore=shutil.ignore_patterns("prepared"))
    (tmp_path / "space.yaml").write_text(SIGINT_SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "runs"
    bin_dir = Path(sys.executable).parent
    cli = [str(bin_dir / "gtc-ray"), "tune", str(data), "--space", str(tmp_path / "space.yaml"), "--workers", "1",
           "--name", "s", "--storage", str(storage), "--tracking-uri", uri,
           "--set", "graph.knn_k=5", "--set", "model.noise_steps=50", "--set", "model.embedding_size=16",
           "--set", "train.batch_size=256", "--set", "eval.topk=[5, 10, 20]"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def runs():
        c = MlflowClient(uri)
        exp = c.get_experiment_by_name("gtc-ray")
        return c, (c.search_runs([exp.experiment_id]) if exp is not None else [])

    _create_store(uri)
    log_path = tmp_path / "first.log"
    p = subprocess.Popen(cli, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                         start_new_session=True)
    sent = False
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not sent:
            time.sleep(0.5)
            try:
                c, found = runs()
                if any(c.get_metric_history(r.info.run_id, "valid_recall_at_20") for r in found
                       if r.data.tags.get("gtc.kind") == "trial"):
                    os.kill(p.pid, signal.SIGINT)  # Ctrl-C: to the driver, as a terminal would
                    sent = True
            except Exception:  # e.g. the store locked by the search's writes: poll again
                continue
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out = log_path.read_text()
    assert sent, out[-3000:]
    assert rc != 0, out[-3000:]
    c, found = runs()
    status = {r.info.run_name: (r.data.tags["gtc.kind"], r.info.status) for r in found}
    assert "RUNNING" not in {st for _, st in status.values()}, status
    assert status["s"] == ("search", "KILLED")
    assert ("trial", "KILLED") in status.values(), status  # the one that had reported an epoch, at least
    assert not (storage / "s" / "search.json").exists()
    cmd = resume_command(data, tmp_path / "space.yaml", "s", storage)
    assert cmd in out, out[-3000:]

    r = subprocess.run(shlex.split(cmd), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((storage / "s" / "search.json").read_text())
    assert summary["best_trial"] and len(summary["trials"]) == 2
    assert {t["epochs"] for t in summary["trials"]} == {4}
    c, found = runs()
    assert {r.info.status for r in found} == {"FINISHED"}
    kids = [r for r in found if r.data.tags["gtc.kind"] == "trial"]
    assert len(kids) == 2
    for k in kids:  # resumed from its checkpoint: no epoch twice (a restart would log 0.. again), none lost
        assert sorted(m.step for m in c.get_metric_history(k.info.run_id, "valid_recall_at_20")) == [0, 1, 2, 3]
