"""Shared set-up for the `ray job submit` entry points.

A submitted job gets RAY_ADDRESS from the cluster, so gtc-ray connects with `ray.init()` and no
resource arguments (RAY_NOTES §3). Data, checkpoints (`--storage`) and the MLflow store
(`--tracking-uri` or MLFLOW_TRACKING_URI) must be paths every node can reach on a real cluster.
"""

import os
import sys
from pathlib import Path

# the job's working directory is this repository (--working-dir .), which holds the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(verb: str) -> None:
    from gtc_ray.cli import main
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main([verb, *sys.argv[1:]]))
