"""Memory benchmark: peak RSS of graph building, full evaluation and one training step, at two sizes.

    python bench/memory.py [--presets sports clothing] [--keep DIR]

Each measurement runs in a fresh subprocess (peak RSS = its ru_maxrss), after the dataset was
generated to disk once; "load only" is the floor (dataset tables in memory). Printed per size: MB
for each phase, and MB per 1,000 (users + items) above the floor, which stays roughly constant when
memory grows linearly; for contrast, the dense n x n matrices the original builds (items^2 for the
item graph and TC logits, users^2 for the user graph, users x items for the score matrix).
"""

import argparse
import atexit
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PHASES = {
    "load only": "ds = load_dataset(D)",
    "prepare graphs": "ds = load_dataset(D); build_graphs(ds, cfg.graph, log=lambda m: None)",
    "full evaluation": """
ds = load_dataset(D); g = prepare(ds, cfg.graph, log=lambda m: None)
u, i = ds.split_pairs('train'); vu, vi = ds.split_pairs('valid')
m = GTC(ds.num_users, ds.num_items, {k: f.shape[1] for k, f in ds.features.items()}, cfg.model)
m.attach(ds.features, bipartite_adjacency(u, i, ds.num_users, ds.num_items), g.item_item,
         sample_user_graph(g.user_user, 40, np.random.default_rng(0)))
zu, yi = m.eval_embeddings(0)
evaluate_sums(zu, yi, np.unique(vu), train_matrix(vu, vi, ds.num_users, ds.num_items),
              train_matrix(u, i, ds.num_users, ds.num_items), [5, 10, 20, 50], 1024)
""",
    "one training step": """
ds = load_dataset(D); g = prepare(ds, cfg.graph, log=lambda m: None)
u, i = ds.split_pairs('train')
m = GTC(ds.num_users, ds.num_items, {k: f.shape[1] for k, f in ds.features.items()}, cfg.model)
m.attach(ds.features, bipartite_adjacency(u, i, ds.num_users, ds.num_items), g.item_item,
         sample_user_graph(g.user_user, 40, np.random.default_rng(0)))
opt = make_optimizer(m.parameters(), cfg)
b = min(2048, len(u))  # a catalogue smaller than one batch (tiny) takes all its rows
out = m(torch.from_numpy(u[:b].astype(np.int64)), torch.from_numpy(i[:b].astype(np.int64)),
        torch.randint(0, ds.num_items, (b,)), seed=0)
out['loss'].backward(); opt.step()
""",
}

PRELUDE = """
import sys, numpy as np, torch
torch.set_num_threads(2)
sys.path.insert(0, {root!r})
from gtc_ray.config import Config
from gtc_ray.data.dataset import load_dataset
from gtc_ray.data.prepare import build_graphs, prepare, train_matrix
from gtc_ray.model.gtc import GTC
from gtc_ray.model.propagation import bipartite_adjacency, sample_user_graph
from gtc_ray.train.loop import make_optimizer
from gtc_ray.train.metrics import evaluate_sums
cfg = Config(); D = {data!r}
"""


def peak_mb(code: str) -> tuple[float, float]:
    t = time.perf_counter()
    code += "\nimport resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    kb = int([ln for ln in p.stdout.splitlines() if ln.startswith("PEAK")][-1].split()[1])
    return kb / 1024, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["sports", "clothing"])
    ap.add_argument("--keep", help="directory for the generated datasets (default: a temporary one)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from gtc_ray.data.synth import synth
    base = Path(a.keep or tempfile.mkdtemp(prefix="gtc-mem-"))
    if not a.keep:
        atexit.register(shutil.rmtree, base, True)
    print(f"{'preset':<10}{'phase':<20}{'peak MB':>10}{'MB/1k nodes':>13}{'seconds':>9}   dense alternative")
    for preset in a.presets:
        d = base / preset
        if not d.exists():
            synth(d, preset, seed=0)
        import json
        m = json.loads((d / "manifest.json").read_text())
        U, I = m["num_users"], m["num_items"]
        floor = None
        for phase, body in PHASES.items():
            mb, sec = peak_mb(PRELUDE.format(root=str(ROOT), data=str(d)) + body)
            floor = mb if floor is None else floor
            dense = {"prepare graphs": f"items^2 + users^2 = {(I * I + U * U) * 4 / 1e9:.1f} GB",
                     "full evaluation": f"users x items scores = {U * I * 4 / 1e9:.1f} GB",
                     "one training step": f"3 TC logits items^2 = {3 * I * I * 4 / 1e9:.1f} GB"}.get(phase, "")
            per = (mb - floor) / ((U + I) / 1000) if phase != "load only" else float("nan")
            print(f"{preset:<10}{phase:<20}{mb:>10.0f}{per:>13.2f}{sec:>9.1f}   {dense}", flush=True)


if __name__ == "__main__":
    main()
