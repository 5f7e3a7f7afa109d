"""Accuracy study: full GTC vs its ID-only ablation (and compat mode), several seeds, early stopping.

    python bench/accuracy.py DATA_DIR [--seeds 999 1 2] [--variants gtc id_only compat] [--max-epochs 1000]
                             [--out results.json] [--set section.key=value ...]

Runs the same training loop in-process (1 thread, no Ray) so several runs fit a 2-core machine;
prints validation and test Recall@20 / NDCG@20 and the modality-balance score as mean +- std over
seeds, with the evaluation protocol that produced them (the config's: the spec's by default).
Validation selects the epoch (early stopping, spec patience); test is evaluated once per run on that
epoch. Finished runs are kept in --out, so an interrupted study continues where it stopped.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gtc_ray.config import load_config  # noqa: E402
from gtc_ray.train.run import run_training  # noqa: E402

VARIANTS = {
    "gtc": {},
    "id_only": {"model": {"use_content": False}},
    "no_diffusion": {"model": {"use_diffusion": False}},
    "no_tc": {"model": {"use_tc": False}},
    "compat": {"compat": {"freeze_denoiser": True, "stale_eval": True, "unstable_bpr": True}},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[999, 1, 2])
    ap.add_argument("--variants", nargs="+", default=["gtc", "id_only"], choices=list(VARIANTS))
    ap.add_argument("--max-epochs", type=int, default=1000)
    ap.add_argument("--storage", default="runs/accuracy")
    ap.add_argument("--out", default="runs/accuracy/results.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    results = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    for v in a.variants:
        for seed in a.seeds:
            key = f"{v}/{seed}"
            if key in results:
                continue
            cfg = load_config(overrides=a.overrides + [f"train.seed={seed}", f"train.epochs={a.max_epochs}"],
                              base=VARIANTS[v])
            t0 = time.perf_counter()
            name = f"{v}-s{seed}-{time.strftime('%H%M%S')}"
            s = run_training(a.data, cfg, runner="inprocess", storage=a.storage, name=name,
                             log=lambda m: print(f"[{key}] {m}", flush=True) if "epoch" in m and " 0 " not in m else None)
            results[key] = {"valid": s["valid"], "test": s["test"], "best_epoch": s["best_epoch"],
                            "epochs": len(s["history"]), "seconds": time.perf_counter() - t0,
                            "protocol": s["protocol"], "modality_balance": s.get("modality_balance")}
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1))
            print(f"[{key}] done: best epoch {s['best_epoch']}, valid R@20 {s['valid']['recall@20']:.4f}, "
                  f"test R@20 {s['test']['recall@20']:.4f} N@20 {s['test']['ndcg@20']:.4f}", flush=True)
    protocols = {r["protocol"]["name"] for r in results.values() if "protocol" in r}
    print(f"\nprotocol: {', '.join(sorted(protocols))}; seeds {a.seeds}; test evaluated once per run, at the best "
          "validation epoch")
    print(f"\n{'variant':<14}{'runs':>5}{'valid R@20':>18}{'test R@20':>18}{'test N@20':>18}{'balance':>16}"
          f"{'epochs':>10}")
    for v in a.variants:
        rs = [results[f"{v}/{s}"] for s in a.seeds if f"{v}/{s}" in results]
        if not rs:
            continue
        ms = lambda xs: f"{statistics.mean(xs):.4f}±{statistics.pstdev(xs):.4f}"
        print(f"{v:<14}{len(rs):>5}{ms([r['valid']['recall@20'] for r in rs]):>18}"
              f"{ms([r['test']['recall@20'] for r in rs]):>18}{ms([r['test']['ndcg@20'] for r in rs]):>18}"
              f"{(ms(bal) if (bal := [r['modality_balance'] for r in rs if r.get('modality_balance') is not None]) else '-'):>16}"
              f"{statistics.mean(r['epochs'] for r in rs):>10.0f}")


if __name__ == "__main__":
    main()
