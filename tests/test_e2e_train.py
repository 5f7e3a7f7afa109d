"""End to end: Ctrl-C on `gtc-ray train` as a user gives it, in a terminal, mid-run.

In the e2e invocation (`-m e2e`): the subprocess starts its own local Ray, and the signal goes to
its whole process group, as a terminal's Ctrl-C does."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(400)
def test_ctrl_c_on_train_ends_the_mlflow_run_killed(tmp_path):
    from mlflow.tracking import MlflowClient
    exe = Path(sys.executable).with_name("gtc-ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    subprocess.run([str(exe), "data", "synth", "D", "--preset", "small"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    log = open(tmp_path / "train.log", "w")
    # the README's command, in a fresh working directory: default storage and MLflow store
    p = subprocess.Popen([str(exe), "train", "D", "--epochs", "500"], cwd=tmp_path, env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None and run is None:
            time.sleep(1)
            try:
                c = MlflowClient(uri)
                exp = c.get_experiment_by_name("gtc-ray")
                runs = c.search_runs([exp.experiment_id]) if exp else []
                if runs and c.get_metric_history(runs[0].info.run_id, "valid_recall_at_20"):
                    run = runs[0].info.run_id  # training is under way: an epoch was logged
            except Exception:  # the store may be mid-migration on first use
                continue
        assert run is not None, (tmp_path / "train.log").read_text()[-3000:]
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(timeout=120)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever of its local Ray is left
        except ProcessLookupError:
            pass
        p.wait()
    out = (tmp_path / "train.log").read_text()
    assert rc == 130, out[-3000:]
    assert f"gtc-ray train {tmp_path / 'D'} --name gtc-synth-small-" in out and "--resume" in out
    assert MlflowClient(uri).get_run(run).info.status == "KILLED", out[-3000:]
