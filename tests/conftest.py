"""Shared fixtures: tiny synthetic datasets, the shared ml100k data, and ONE Ray cluster per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # spec P12: OpenMP spin-wait on a shared 2-core box

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 test server's address goes into the standard AWS variables at import, before any Ray
# starts, so every Ray worker of the session inherits them (the `s3` fixture starts the server).
S3_PORT = free_port()
os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}", AWS_ACCESS_KEY_ID="testing",
                  AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", os.environ["AWS_ENDPOINT_URL"])


def shared_data_dir() -> Path | None:
    env = os.environ.get("GTC_RAY_SHARED_DATA")
    base = Path(env) if env else ROOT.parent / "shared" / "data"
    p = base / "ml100k_mm" if (base / "ml100k_mm").is_dir() else base
    return p if (p / "ml100k.inter").is_file() else None


@pytest.fixture(scope="session")
def ml100k_src() -> Path:
    p = shared_data_dir()
    if p is None:
        pytest.skip("shared dataset ml100k_mm not found (../shared/data or GTC_RAY_SHARED_DATA)")
    return p


@pytest.fixture(scope="session")
def ml100k(ml100k_src, tmp_path_factory) -> Path:
    from gtc_ray.data.importers import import_mmrec
    out = tmp_path_factory.mktemp("ml") / "ml100k"
    import_mmrec(ml100k_src, out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny synthetic dataset shared (read-only) by the session."""
    from gtc_ray.data.synth import synth
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    synth(out, "tiny", seed=0)
    return out


@pytest.fixture(scope="session")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1 for the session; yields a function that creates
    a fresh bucket and returns its `s3://name` URI."""
    import uuid
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    admin = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)

    def bucket(prefix: str = "gtc") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        admin.create_dir(name)
        return f"s3://{name}"

    yield bucket
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (starting one costs ~7 s)."""
    import ray
    # workers inherit PYTHONPATH, so they import this checkout's gtc_ray (RAY_NOTES P7)
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    ray.init(address="local", num_cpus=2, object_store_memory=500_000_000, include_dashboard=True,
             log_to_driver=True)
    yield ray
    ray.shutdown()


def tiny_config(**sections):
    """A fast config for tiny datasets (overrides as {'train': {'epochs': 2}})."""
    from gtc_ray.config import load_config
    base = {"graph": {"knn_k": 5}, "model": {"noise_steps": 50, "embedding_size": 16, "user_graph_k": 5},
            "train": {"epochs": 2, "batch_size": 256, "lr": 0.01}, "eval": {"topk": [5, 10, 20]},
            "ray": {"workers": 2}}
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return load_config(base=base)
