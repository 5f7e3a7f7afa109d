"""Where the 2-worker speed-up goes: one training step measured five ways, side by side in one run.

    python bench/scaling.py DATA_DIR [--steps 8] [--rounds 1] [--original-epoch-seconds 436] [--set key=value ...]
    python bench/scaling.py --preset baby --rounds 2 --original-epoch-seconds 436   # generates the Baby-sized set first

Every process runs training's step (forward, backward, fused Adam) with one CPU thread, on random
(user, positive, negative) batches of `train.batch_size / W` rows, after 2 warm-up steps:

1. alone       one process, the whole step (the 1-worker work);
2. paired      two independent processes, each the whole step, at the same time: what the hardware
               loses when both cores compute (memory bandwidth, the shared L3, clock);
3. gloo, 2     two plain processes with a gloo process group, item work sharded and DDP as in
               training: the speed-up the sharded model has without Ray;
4. Ray, 2      the same step inside a Ray TorchTrainer with 2 workers: the speed-up under Ray.
               For 3 and 4 it also prints the CPU that every other process on the machine used
               during the timed steps (Ray's own processes, in 4) and the share of the wall time the
               training thread was on a CPU;
5. arithmetic  the step's floating-point operations (the matrix products, counted by torch's
               FlopCounterMode plus the in-place addmm_ it does not know; the sparse products and
               the elementwise work, well under a GFLOP, are not counted), the rate that gives in (1),
               the rate of a 1024^3 matrix product on one thread here, and the shortest epoch the
               machine's two cores could give at that rate. With --original-epoch-seconds S: the
               share of that rate a 10x-faster epoch (S / 10) needs on both cores throughout.

With --rounds R the four timed cases run R times, interleaved; the medians are printed.
"""

import argparse
import atexit
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------ the measured step (any process)

def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """utime + stime (clock ticks) and the name of every process on the machine."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            s = open(f"/proc/{p}/stat").read()
        except OSError:
            continue
        try:  # Ray's process titles (ray::IDLE, ray::TrainController...) are in the command line
            name = open(f"/proc/{p}/cmdline").read().replace("\0", " ").strip()[:48]
        except OSError:
            name = ""
        f = s[s.rindex(")") + 2:].split()
        out[int(p)] = (int(f[11]) + int(f[12]), name or s[s.index("(") + 1:s.rindex(")")])
    return out


def _others_cpu(before: dict, after: dict, exclude: set[int]) -> tuple[float, list[tuple[float, str]]]:
    """CPU seconds used by processes not in `exclude` between two _cpu_ticks() snapshots."""
    hz = os.sysconf("SC_CLK_TCK")
    used = [((t - before.get(p, (0, ""))[0]) / hz, name) for p, (t, name) in after.items() if p not in exclude]
    used = [u for u in used if u[0] > 0]
    return sum(u[0] for u in used), sorted(used, reverse=True)


def _setup(data: str, overrides: list[str]):
    """What every measuring process builds, as training does: config, dataset, model (user graph
    sampled once), fused Adam, and the training pairs (users, items)."""
    import numpy as np
    import torch
    from gtc_ray.config import load_config
    from gtc_ray.data.dataset import load_dataset
    from gtc_ray.data.prepare import prepare
    from gtc_ray.model.propagation import sample_user_graph
    from gtc_ray.train.loop import build_model, make_optimizer
    torch.set_num_threads(1)
    cfg = load_config(overrides=overrides)
    ds = load_dataset(data, verify=False)
    graphs = prepare(ds, cfg.graph, log=lambda m: None)
    torch.manual_seed(0)
    model = build_model(ds, cfg, graphs, sample_user_graph(graphs.user_user, cfg.model.user_graph_k,
                                                           np.random.default_rng(0)))
    return cfg, ds, model, make_optimizer(model.parameters(), cfg), ds.split_pairs("train")


def measure(rank: int, world: int, data: str, overrides: list[str], steps: int, sharded: bool) -> dict:
    """Build the model as training does and time `steps` steps. With sharded=True a default process
    group must exist (gloo from the caller, or Ray Train's)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from gtc_ray.model.sharding import ItemShard
    from gtc_ray.train.runtime import ddp_kwargs
    cfg, ds, model, opt, (u, i) = _setup(data, overrides)
    net = model
    if sharded and world > 1:
        model.item_shard = ItemShard(rank, world, dist.new_group())
        net = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs())
    rng = np.random.default_rng(rank)
    b = max(1, cfg.train.batch_size // world)

    def step(s):
        idx = rng.integers(0, len(u), b)
        out = net(torch.from_numpy(u[idx].astype(np.int64)), torch.from_numpy(i[idx].astype(np.int64)),
                  torch.from_numpy(rng.integers(0, ds.num_items, b)), seed=s)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    for s in range(2):
        step(s)
    pids = [os.getpid()]
    if sharded and world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, os.getpid())
        pids = gathered
        dist.barrier()
    c0, t0, th0 = _cpu_ticks(), time.perf_counter(), time.thread_time()
    for s in range(steps):
        step(2 + s)
    wall, th = time.perf_counter() - t0, time.thread_time() - th0
    others, top = _others_cpu(c0, _cpu_ticks(), set(pids))
    return {"step_s": wall / steps, "on_cpu": th / wall, "others_cores": others / wall,
            "top": [(round(c / wall, 3), n) for c, n in top[:6]]}


# ------------------------------------------------------------------ the four cases

def _mp_entry(rank, world, data, overrides, steps, sharded, port, barrier, q):
    if sharded and world > 1:
        import torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    elif barrier is not None:
        barrier.wait()  # paired: both processes start building together (and so time together)
    r = measure(rank, world if sharded else 1, data, overrides, steps, sharded)
    q.put((rank, r))
    if sharded and world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()


def run_processes(n: int, data, overrides, steps, sharded: bool) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    barrier = ctx.Barrier(n) if n > 1 and not sharded else None
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_mp_entry, args=(r, n, data, overrides, steps, sharded, port, barrier, q))
             for r in range(n)]
    for p in procs:
        p.start()
    res = dict(q.get() for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode:
            sys.exit(f"a measuring process failed (exit code {p.exitcode})")
    return [res[r] for r in range(n)]


def _ray_entry(config: dict) -> None:
    import json
    import ray.train
    ctx = ray.train.get_context()
    r = measure(ctx.get_world_rank(), ctx.get_world_size(), config["data"], config["overrides"],
                config["steps"], True)
    if ctx.get_world_rank() == 0:  # Train V2 keeps metrics only with checkpoints: a file instead
        Path(config["out"]).write_text(json.dumps(r))
    ray.train.report({"step_s": r["step_s"]})


def run_ray(data, overrides, steps, storage: Path) -> dict:
    import json
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from gtc_ray.config import load_config
    from gtc_ray.train.cluster import ensure_ray, resolve_cpus_per_worker
    cfg = load_config(overrides=overrides)
    ensure_ray(cfg, log=lambda m: None, workers=2)
    cpw = resolve_cpus_per_worker(cfg, 2)
    name = f"scaling-{time.time_ns()}"
    out = storage / f"{name}.json"
    TorchTrainer(
        _ray_entry, train_loop_config={"data": data, "overrides": overrides, "steps": steps, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": cpw}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(storage_path=str(storage), name=name),
    ).fit()
    ray.shutdown()  # its idle processes would otherwise run beside the next round's other cases
    return json.loads(out.read_text())


# ------------------------------------------------------------------ arithmetic

def arithmetic(data, overrides) -> tuple[float, float, int]:
    """(FLOPs of one whole step, the rate of a 1024^3 float32 product on one thread in FLOP/s,
    steps per epoch)."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    cfg, ds, model, opt, (u, i) = _setup(data, overrides)
    b = cfg.train.batch_size
    idx = np.random.default_rng(0).integers(0, len(u), b)
    batch = (torch.from_numpy(u[idx].astype(np.int64)), torch.from_numpy(i[idx].astype(np.int64)),
             torch.randint(0, ds.num_items, (b,)))

    def addmm_(self_shape, a_shape, b_shape, out_shape=None, **kw):  # in place: not in torch's table
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as fc:
        out = model(*batch, seed=0)
        out["loss"].backward()
        opt.step()
    a, c = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ c
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 3.0:
        a @ c
        n += 1
    peak = 2 * 1024 ** 3 * n / (time.perf_counter() - t)
    return fc.get_total_flops(), peak, math.ceil(len(u) / b)


# ------------------------------------------------------------------ driver

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?")
    ap.add_argument("--preset", help="generate a synthetic dataset of this preset instead of DATA")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the four cases, interleaved; medians")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--original-epoch-seconds", type=float)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="gtc-scaling-"))
    atexit.register(shutil.rmtree, storage, True)
    if a.preset:
        from gtc_ray.data.synth import synth
        synth(storage / a.preset, a.preset, seed=0)
        a.data = storage / a.preset
    if a.data is None:
        ap.error("give DATA_DIR or --preset")
    data = str(Path(a.data).resolve())
    ov = ["train.num_threads=1"] + a.overrides

    flops, peak, spe = arithmetic(data, ov)
    cases = {"alone": [], "paired": [], "gloo, 2 ranks": [], "Ray, 2 workers": []}
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        cases["alone"].append(run_processes(1, data, ov, a.steps, False)[0])
        cases["paired"].append(max(run_processes(2, data, ov, a.steps, False), key=lambda x: x["step_s"]))
        cases["gloo, 2 ranks"].append(run_processes(2, data, ov, a.steps, True)[0])
        if not a.skip_ray:
            cases["Ray, 2 workers"].append(run_ray(data, ov, a.steps, storage))

    med = {k: statistics.median(x["step_s"] for x in v) for k, v in cases.items() if v}
    alone = med["alone"]
    print(f"\n{data}: one training step, 1 thread per process, {a.steps} timed steps, "
          f"median of {a.rounds} round(s)")
    print(f"{'case':18s} {'s/step':>8s} {'alone/case':>11s} {'train thread on CPU':>20s} {'other processes':>16s}")
    for k, v in cases.items():
        if not v:
            continue
        last = v[-1]
        oth = f"{last['others_cores']:.2f} cores" if k in ("gloo, 2 ranks", "Ray, 2 workers") else ""
        print(f"{k:18s} {med[k]:8.3f} {alone / med[k]:10.2f}x {100 * last['on_cpu']:19.0f}% {oth:>16s}")
    if "Ray, 2 workers" in med:
        top = ", ".join(f"{n} {100 * c:.1f}%" for c, n in cases["Ray, 2 workers"][-1]["top"])
        print(f"  busiest other processes during the Ray case (share of one core): {top}")
    print(f"\narithmetic: {flops / 1e9:.1f} GFLOP per step (sparse products not counted), "
          f"{flops / alone / 1e9:.1f} GFLOP/s alone; a 1024^3 float32 product on one thread: {peak / 1e9:.1f} GFLOP/s")
    floor = spe * flops / (2 * peak)
    print(f"an epoch is {spe} steps: {spe * alone:.1f} s alone; at that product's rate on both cores "
          f"throughout it would take {floor:.1f} s")
    if a.original_epoch_seconds:
        target = a.original_epoch_seconds / 10
        print(f"10x faster than the original's {a.original_epoch_seconds:g} s is {target:.1f} s per epoch: "
              f"{100 * floor / target:.0f}% of that rate on both cores, all step long")


if __name__ == "__main__":
    main()
