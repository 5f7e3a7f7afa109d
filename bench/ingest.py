"""Ingestion benchmark: per-worker feature memory, and local-path vs S3 training, side by side.

    python bench/ingest.py memory [--preset sports] [--epochs 1] [--users U --interactions N]
    python bench/ingest.py s3 DATA_DIR [--epochs 3]      # e.g. an import of ../shared/data/ml100k_mm

`memory`: generates the synthetic set (default the Sports-sized preset: 18,357 items, image
4,096-d and text 384-d float32), trains it with 1 and then 2 Ray Train workers with the defaults
(`train.shard_item_work`: each worker computes, and holds the features of, its own block of item
rows) and prints what each worker holds of the feature tables, as reported by the workers
(`feature_mb`, the largest over workers), next to the whole tables' size.

`s3`: starts an S3 test server (moto) on 127.0.0.1, copies DATA_DIR into a bucket, and trains the
same config from the local path and from the s3:// URI in one process, one after the other; prints
the start-up (dataset check and Ray Data ingestion) and the seconds per training epoch of both and
their ratio. Training reads nothing from the dataset location after ingestion, so the epoch
ratio should be ~1 and the difference is in the ingestion.

Both use temporary directories and buckets that are removed at exit.
"""

import argparse
import atexit
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtc_ray.config import load_config  # noqa: E402


def _tmp() -> Path:
    d = Path(tempfile.mkdtemp(prefix="gtc-bench-ingest-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def _train(data, workers, epochs, storage, extra=()):
    from gtc_ray.train.run import run_training
    cfg = load_config(overrides=[f"train.epochs={epochs}", "train.patience=1000", *extra])
    t0 = time.perf_counter()
    s = run_training(data, cfg, workers=workers, storage=storage, log=lambda m: None)
    s["wall"] = time.perf_counter() - t0
    return s


def _epoch_seconds(s) -> float:
    h = s["history"][1:] or s["history"]
    return statistics.median(r["train_seconds"] for r in h)


def memory(a):
    from gtc_ray.data.dataset import read_manifest
    from gtc_ray.data.synth import synth
    d = _tmp()
    data = d / a.preset
    print(f"generating preset {a.preset} ...", flush=True)
    synth(data, a.preset, seed=0, users=a.users, interactions=a.interactions)
    m = read_manifest(data)
    whole = sum(m["num_items"] * v["dim"] * 4 for v in m["modalities"].values()) / 2 ** 20
    mods = ", ".join(f"{k} {v['dim']}-d" for k, v in m["modalities"].items())
    print(f"{m['num_items']:,} items; modalities {mods}; "
          f"whole feature tables {whole:.1f} MiB (float32)")
    rows = []
    for w in (1, 2):
        s = _train(data, w, a.epochs, str(d / f"runs{w}"))
        mb = s["history"][0]["feature_mb"]
        rows.append((w, mb, _epoch_seconds(s)))
        print(f"W={w}: features per worker {mb:.1f} MiB ({mb / whole:.2f} of the tables), "
              f"epoch {rows[-1][2]:.1f}s", flush=True)
    print(f"\nper-worker feature memory, W=2 / W=1: {rows[1][1] / rows[0][1]:.3f}")


def s3(a):
    from moto.server import ThreadedMotoServer
    import pyarrow.fs as pafs
    from gtc_ray import storage
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    atexit.register(server.stop)
    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bench")
    local = Path(a.data).absolute()
    uri = "s3://bench/" + local.name
    storage.upload_dir(local, uri, skip=tuple(p.relative_to(local).as_posix() for p in local.rglob("*")
                                             if p.relative_to(local).parts[0] == "prepared"))
    from gtc_ray.train.cluster import ensure_ray
    ensure_ray(load_config(), log=lambda m: None, workers=a.workers)  # both runs on one started Ray
    d = _tmp()
    out = {}
    for label, data in (("local", str(local)), ("s3", uri)):
        s = _train(data, a.workers, a.epochs, str(d / label))
        out[label] = s
        print(f"{label:>5}: wall {s['wall']:.1f}s, epoch {_epoch_seconds(s):.2f}s, "
              f"test recall@20 {s['test'].get('recall@20', float('nan')):.4f}", flush=True)
    same = out["local"]["test"] == out["s3"]["test"]
    print(f"\nS3 / local: epoch {_epoch_seconds(out['s3']) / _epoch_seconds(out['local']):.3f}, "
          f"whole run {out['s3']['wall'] / out['local']['wall']:.3f}; identical test metrics: {same}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--preset", default="sports")
    m.add_argument("--epochs", type=int, default=1)
    m.add_argument("--users", type=int, help="override the preset's users (features do not depend on them)")
    m.add_argument("--interactions", type=int, help="override the preset's interactions (shorter epochs)")
    s = sub.add_parser("s3")
    s.add_argument("data")
    s.add_argument("--epochs", type=int, default=3)
    s.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    memory(a) if a.what == "memory" else s3(a)


if __name__ == "__main__":
    main()
