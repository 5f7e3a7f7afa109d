"""Training benchmark, measured side by side in one run.

    python bench/train.py DATA_DIR [--epochs 3] [--set section.key=value ...] [--skip-ray]
    python bench/train.py --preset baby            # generates a Baby-sized synthetic set first
    python bench/train.py --preset baby --original-epoch-seconds 436
    python bench/train.py --preset baby --gpu      # on a CUDA machine: in-process vs 1 GPU worker

Prints, each with one CPU thread per worker (spec P12):
- in-process loop (no Ray): seconds per training epoch and per full validation evaluation;
- Ray TorchTrainer, 1 worker: the same, and the ratio to in-process (the Ray overhead; target <= 1.15);
- Ray TorchTrainer, 2 workers with the defaults (`batch_scaling=split`: steps per epoch as
  single-process; `shard_item_work`: the full-item work split by item rows), the 1-worker/2-worker
  epoch-time ratio (target >= 1.6 on the Baby-sized set), and for reference the same with each
  worker repeating the full-item work (`shard_item_work=false`);
- with `--original-epoch-seconds S` (the original code's epoch on the same data and machine: the
  issue gives ~436 s wall for the Baby-sized set at 2 threads, ~49 CPU-s for ml100k at 1 thread):
  the speed-up of the 2-worker and the in-process epochs over it.
With `--gpu`, every run uses the GPU (1 GPU per worker, NCCL); the 2-worker runs need 2 GPUs and
are skipped with fewer, and the peak GPU memory of each run is printed.
With `--repeat R`, all runs are made R times, interleaved round by round, and the ratios are those
of the medians (on a shared machine, one run can be 15% off).
Epoch times are the mean over epochs after the first (warm-up) as measured inside the loop;
start-up (Ray, workers, process group) is printed separately as whole-run wall time.
"""

import argparse
import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtc_ray.config import load_config  # noqa: E402
from gtc_ray.train.run import run_training  # noqa: E402

LOCAL, ONE = "in-process (no Ray)", "TorchTrainer, 1 worker"
TWO, REPLICATED = "TorchTrainer, 2 workers (sharded)", "TorchTrainer, 2 workers (replicated)"


def epoch_stats(s):
    h = s["history"][1:] or s["history"]
    return statistics.mean(r["train_seconds"] for r in h), statistics.mean(r["eval_seconds"] for r in h)


def _cuda_devices() -> int:
    import torch
    if not torch.cuda.is_available():
        sys.exit("--gpu: no CUDA GPU visible to torch")
    return torch.cuda.device_count()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?")
    ap.add_argument("--preset", help="generate a synthetic dataset of this preset instead of DATA")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-replicated", action="store_true", help="skip the shard_item_work=false run")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs, interleaved; ratios of medians")
    ap.add_argument("--gpu", action="store_true", help="train on CUDA (1 GPU per worker)")
    ap.add_argument("--original-epoch-seconds", type=float, help="the original code's epoch, for the ratio")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gtc-bench-"))
    atexit.register(shutil.rmtree, tmp, True)  # runs' checkpoints and a generated set: GBs over time
    data = a.data
    if a.preset:
        from gtc_ray.data.synth import synth
        data = tmp / a.preset
        t = time.perf_counter()
        synth(data, a.preset, seed=0)
        print(f"generated {a.preset} in {time.perf_counter() - t:.1f}s")
    if data is None:
        ap.error("give DATA_DIR or --preset")
    base = a.overrides + [f"train.epochs={a.epochs}", "train.patience=1000", "train.num_threads=1"]

    def run(label, runner, workers, extra=()):
        cfg = load_config(overrides=base + list(extra))
        t = time.perf_counter()
        s = run_training(data, cfg, runner=runner, workers=workers, use_gpu=a.gpu, storage=tmp / "runs",
                         log=lambda m: None)
        wall = time.perf_counter() - t
        ep, ev = epoch_stats(s)
        mem = f"  peak GPU memory {max(r['gpu_peak_mb'] for r in s['history']):6.0f} MiB" if a.gpu else ""
        print(f"{label:<36} epoch {ep:7.2f}s  eval {ev:6.2f}s  whole run {wall:7.1f}s{mem}", flush=True)
        return ep

    two_workers = not a.gpu or _cuda_devices() >= 2
    if a.gpu and not two_workers:
        print("one GPU: the 2-worker runs are skipped")
    runs = [(LOCAL, "inprocess", 1, ())]
    if not a.skip_ray:
        runs.append((ONE, "ray", 1, ()))
        if two_workers:
            runs.append((TWO, "ray", 2, ()))
            if not a.skip_replicated:
                runs.append((REPLICATED, "ray", 2, ("train.shard_item_work=false",)))
    print(f"dataset {data}; {a.epochs} epochs per run; 1 thread per worker" + ("; on the GPU" if a.gpu else "")
          + (f"; {a.repeat} rounds, interleaved" if a.repeat > 1 else ""))
    # rounds interleave the configurations, so a slow spell of a shared machine hits all of them
    times = {label: [] for label, *_ in runs}
    for r in range(a.repeat):
        if a.repeat > 1:
            print(f"-- round {r + 1}/{a.repeat}")
        for label, runner, workers, extra in runs:
            times[label].append(run(label, runner, workers, extra))
    ep = {label: statistics.median(v) for label, v in times.items()}
    if a.repeat > 1:
        print("\nmedian over rounds:")
        for label, v in ep.items():
            print(f"{label:<36} epoch {v:7.2f}s  (rounds: {', '.join(f'{x:.2f}' for x in times[label])})")
    local = ep[LOCAL]
    if not a.skip_ray:
        one = ep[ONE]
        print(f"\nRay overhead (1-worker epoch / in-process epoch): {one / local:.2f}x  (target <= 1.15)")
        if two_workers:
            two = ep[TWO]
            print(f"2-worker speed-up (1-worker epoch / 2-worker epoch): {one / two:.2f}x  (target >= 1.6)")
            if REPLICATED in ep:
                print(f"  the same without item sharding:                  {one / ep[REPLICATED]:.2f}x")
    if a.original_epoch_seconds:
        o = a.original_epoch_seconds
        two_part = "" if a.skip_ray or not two_workers else f"2 workers {o / two:.1f}x, "
        print(f"vs the original's {o:.0f} s epoch: {two_part}in-process 1 thread {o / local:.1f}x  (target >= 10)")


if __name__ == "__main__":
    main()
