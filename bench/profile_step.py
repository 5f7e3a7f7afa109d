"""Where a training step's time goes: one GTC step (forward, backward, Adam) on a dataset, in-process.

    python bench/profile_step.py DATA_DIR [--device cpu|cuda] [--steps 5] [--top 25] [--set key=value ...]
    python bench/profile_step.py --preset baby --device cuda

Prints the mean wall time of a step (after 2 warm-up steps; on CUDA each step is synchronised) and
the torch profiler's table of the operators with the most self time (device time on CUDA). Batches are
drawn uniformly from the training rows with uniform negatives: the work per step is that of training,
the sampling is not (it is not what is measured). Threads: train.num_threads (1 by default here).
"""

import argparse
import atexit
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtc_ray.config import load_config  # noqa: E402
from gtc_ray.data.dataset import load_dataset  # noqa: E402
from gtc_ray.data.prepare import prepare  # noqa: E402
from gtc_ray.model.propagation import sample_user_graph  # noqa: E402
from gtc_ray.train.loop import build_model, make_optimizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?")
    ap.add_argument("--preset", help="generate a synthetic dataset of this preset instead of DATA")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU visible to torch")
    data = a.data
    if a.preset:
        from gtc_ray.data.synth import synth
        data = Path(tempfile.mkdtemp(prefix="gtc-prof-")) / a.preset
        atexit.register(shutil.rmtree, data.parent, True)
        synth(data, a.preset, seed=0)
    if data is None:
        ap.error("give DATA_DIR or --preset")
    cfg = load_config(overrides=["train.num_threads=1"] + a.overrides)
    torch.set_num_threads(cfg.train.num_threads)
    dev = torch.device(a.device)
    ds = load_dataset(data, verify=False)
    graphs = prepare(ds, cfg.graph, log=lambda m: None)
    u, i = ds.split_pairs("train")
    torch.manual_seed(0)
    ug = sample_user_graph(graphs.user_user, cfg.model.user_graph_k, np.random.default_rng(0))
    model = build_model(ds, cfg, graphs, ug, dev)
    opt = make_optimizer(model.parameters(), cfg)
    rng = np.random.default_rng(0)
    B = cfg.train.batch_size

    def step(s):
        idx = rng.integers(0, len(u), B)
        batch = [torch.from_numpy(x.astype(np.int64)).to(dev)
                 for x in (u[idx], i[idx], rng.integers(0, ds.num_items, B))]
        out = model(*batch, seed=s)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for s in range(2):
        step(s)
    t = time.perf_counter()
    for s in range(a.steps):
        step(s)
    ms = (time.perf_counter() - t) / a.steps * 1e3
    print(f"{data}: {ds.num_users:,} users, {ds.num_items:,} items, batch {B}, {a.device}, "
          f"{cfg.train.num_threads} thread(s), {cfg.model.matmul_precision}: {ms:.1f} ms per step")
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as p:
        for s in range(3):
            step(s)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=a.top))


if __name__ == "__main__":
    main()
