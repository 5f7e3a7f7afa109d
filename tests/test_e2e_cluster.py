"""End to end on a multi-node Ray cluster with object storage, on loopback, without a cloud.

- an S3-compatible server (moto, in this test process) on 127.0.0.1: the dataset, the Train/Tune
  storage and MLflow's artifacts live in its buckets; nothing the workers read is on a local disk;
- a Ray head node (with CPUs: only a custom resource keeps training off it) and worker nodes started with `ray start` (tests/raynodes.py),
  the training workers forced onto them by a custom resource (`ray.worker_resources`);
- an `mlflow server` on 127.0.0.1 with its artifacts in the bucket;
- `ray job submit` of jobs/tune.py then jobs/register.py; `gtc-ray recommend` from the registry.

Runs in the e2e invocation (`-m e2e`, see the Makefile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from raynodes import RayNodes

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
# a tiny, fast configuration (the tiny preset has 40 items)
FAST = ["--set", "graph.knn_k=5", "--set", "model.noise_steps=50", "--set", "model.embedding_size=16",
        "--set", "train.batch_size=256", "--set", "eval.topk=[5, 10, 20]"]
ON_WORKER_NODES = ["--set", "ray.worker_resources={wnode: 0.01}"]
EXCLUDES = [".venv", ".git", "runs", "gtc_runs", "mlruns", "mlartifacts", "mlflow.db", "*.egg-info"]


@contextmanager
def mlflow_server(tmp_path: Path, artifacts: str):
    """`mlflow server` on 127.0.0.1 (SQLite backend in tmp_path, artifacts proxied to `artifacts`,
    an s3:// URI), stopped by its process group."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    p = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                          "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                          "--artifacts-destination", artifacts, "--workers", "1"],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if p.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)
        log.close()


def _submit(client, argv: list[str], env: dict) -> str:
    entry = " ".join([sys.executable, *(f"'{a}'" if any(c in a for c in " {}[]") else a for a in argv)])
    return client.submit_job(entrypoint=entry, runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES,
                                                            "env_vars": env})


def _wait(client, job: str, timeout: float = 480, until=None) -> str:
    from ray.job_submission import JobStatus
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if until is not None and until(client.get_job_logs(job)):
            return "UNTIL"
        time.sleep(0.5 if until is not None else 2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-5000:]
    return logs


def _train_workers(c: RayNodes) -> list[dict]:
    """Every RayTrainWorker actor the cluster ran (alive or dead), from the State API."""
    with urllib.request.urlopen(f"{c.address}/api/v0/actors?limit=10000&detail=1", timeout=10) as r:
        actors = json.loads(r.read())["data"]["result"]["result"]
    return [a for a in actors if a.get("class_name") == "RayTrainWorker"]


def _train_worker_nodes(c: RayNodes) -> set[str]:
    return {a["node_id"] for a in _train_workers(c)}


def _node_ids(c: RayNodes) -> dict[str, str]:
    """node id -> 'head' or 'worker' (by the custom resource only worker nodes have)."""
    return {n["node_id"]: ("worker" if "wnode" in n.get("resources_total", {}) else "head") for n in c.node_states()}


def _aws_env() -> dict:
    return {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                       "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL") if k in os.environ}


SPACE = """
samples: 1
fixed:
  train.epochs: 3
params:
  train.lr: {grid: [0.01]}
"""


@pytest.mark.timeout(1200)
def test_search_register_and_serve_with_object_storage_on_a_multi_node_cluster(s3, tmp_path):
    from ray.job_submission import JobSubmissionClient
    from gtc_ray import storage
    from gtc_ray.cli import main
    t0 = time.perf_counter()
    bucket = s3("e2e")
    data, runs = f"{bucket}/data/tiny", f"{bucket}/runs"
    # the dataset is imported straight to the bucket: no local copy exists
    assert main(["data", "synth", data, "--preset", "tiny"]) == 0
    assert storage.is_file(f"{data}/manifest.json")
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    with mlflow_server(tmp_path, f"{bucket}/mlartifacts") as tracking, \
            RayNodes(workers=1, head_cpus=2, worker_cpus=2, worker_resources={"wnode": 1}) as c:
        client = JobSubmissionClient(c.address)
        env = _aws_env()
        logs = _wait(client, _submit(client, ["jobs/tune.py", data, "--space", str(space), "--name", "s",
                                              "--storage", runs, "--workers", "1", "--tracking-uri", tracking,
                                              *FAST, *ON_WORKER_NODES], env))
        assert "search summary" in logs, logs[-3000:]
        kinds = _node_ids(c)
        placed = _train_worker_nodes(c)
        assert placed and {kinds.get(n) for n in placed} == {"worker"}, (placed, kinds)
        summary = json.loads(storage.read_text(f"{runs}/s/search.json"))
        assert summary["checkpoint"].startswith(runs + "/")
        logs = _wait(client, _submit(client, ["jobs/register.py", "--search", "s", "--storage", runs,
                                              "--tracking-uri", tracking, "--alias", "champion"], env))
        assert "registered gtc version 1" in logs, logs[-3000:]
        t_cluster = time.perf_counter() - t0
        # the model's artifacts went through the tracking server into the bucket
        assert any(f.endswith("gtc_embeddings.npz") for f in storage.walk_files(f"{bucket}/mlartifacts"))
        # any machine with the tracking URI answers from the registry (no Ray, no dataset)
        user = "u3"  # raw ids of the synthetic presets
        out = subprocess.run([str(BIN / "gtc-ray"), "recommend", "--model", "models:/gtc@champion", "--user", user,
                              "--k", "5", "--json", "--tracking-uri", tracking], capture_output=True, text=True,
                             timeout=180, env={**os.environ, "RAY_ADDRESS": ""})
        assert out.returncode == 0, out.stderr[-3000:]
        rows = json.loads(out.stdout)
        assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and {r["user_id"] for r in rows} == {user}
    # the same training from a local path: identical metrics for the same seed
    local = tmp_path / "tiny"
    storage.download_dir(data, local)
    out = tmp_path / "local.json"
    try:
        assert main(["train", str(local), "--workers", "1", "--epochs", "3", "--set", "train.lr=0.01", *FAST,
                     "--storage", str(tmp_path / "runs"), "--no-mlflow", "--metrics-out", str(out)]) == 0
    finally:
        import ray
        ray.shutdown()  # the local Ray that train started in this process
    ref = json.loads(out.read_text())
    assert summary["valid"] == pytest.approx(ref["valid"], rel=1e-6)
    assert summary["test"] == pytest.approx(ref["test"], rel=1e-6)
    print(f"\ncluster part (synth to S3, search, register): {t_cluster:.0f}s")


def _alive_train_worker_node(c: RayNodes) -> str | None:
    alive = [a["node_id"] for a in _train_workers(c) if a.get("state") == "ALIVE"]
    return alive[0] if alive else None


@pytest.mark.timeout(1200)
def test_training_survives_the_loss_of_a_worker_node(s3, tmp_path):
    """Two worker nodes; the node that runs the (single) training worker is killed whole (raylet and
    workers) after its third epoch (of 30). With the default retries the run resumes from its latest
    checkpoint in the bucket on the other node, and ends with the metrics of an uninterrupted run."""
    from ray.job_submission import JobSubmissionClient
    from gtc_ray.cli import main
    from gtc_ray.train.checkpoint import read_meta_at
    bucket = s3("loss")
    data, runs = f"{bucket}/data/small", f"{bucket}/runs"
    assert main(["data", "synth", data, "--preset", "small"]) == 0  # epochs long enough to cut one run mid-way
    resources = [{"wnode": 1, "n0": 1}, {"wnode": 1, "n1": 1}]
    # 2 CPUs per node: after the loss, the surviving node runs the worker (1 CPU) and still has room
    # for Ray Data to rebuild the blocks that were stored on the lost node
    with RayNodes(workers=2, head_cpus=0, worker_cpus=2, worker_resources=resources) as c:
        client = JobSubmissionClient(c.address)

        def train(name):
            return _submit(client, ["jobs/train.py", data, "--workers", "1", "--epochs", "30", "--name", name,
                                    "--storage", runs, "--no-mlflow", "--metrics-out", str(tmp_path / f"{name}.json"),
                                    "--set", "train.patience=100", *FAST, *ON_WORKER_NODES], _aws_env())

        _wait(client, train("ref"))
        job = train("cut")
        assert _wait(client, job, until=lambda logs: "epoch    2" in logs) == "UNTIL", "the run ended too soon"
        node = _alive_train_worker_node(c)
        assert node is not None
        index = {n["node_id"]: i for n in c.node_states() for i in (0, 1) if f"n{i}" in n.get("resources_total", {})}
        c.kill_node(index[node], wait_dead_s=120)
        logs = _wait(client, job, timeout=600)
        assert c.alive_nodes() == 2  # the head and the surviving worker node
        assert _alive_train_worker_node(c) is None
    ref, cut = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ref", "cut"))
    assert cut["valid"] == ref["valid"] and cut["test"] == ref["test"], logs[-4000:]
    # it continued from a checkpoint in the bucket (not from scratch), on the other node
    meta = read_meta_at(cut["checkpoint"])
    assert cut["checkpoint"].startswith(runs + "/") and len(meta["resumes"]) == 1 and 1 <= meta["resumes"][0] < 30
    assert read_meta_at(ref["checkpoint"])["resumes"] == []
    assert [h["epoch"] for h in meta["history"]] == list(range(30))  # no epoch counted twice
