"""Content-encoder throughput: items per second with 1 and 2 Ray Data actors, for both encoders.

    python bench/features.py [--src ../shared/data/ml100k_mm] [--limit 400]

Encodes the first --limit item texts (item_text.tsv) and posters (posters/<itemID>.jpg) of an
MMRec-style folder with the same `encode` path as `gtc-ray features` (map_batches over an actor
pool); seconds include each actor loading its model once.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ml100k_mm"))
    ap.add_argument("--limit", type=int, default=400)
    a = ap.parse_args()
    import ray
    from gtc_ray.features.build import encode
    src = Path(a.src)
    rows = [ln.split("\t", 1) for ln in (src / "item_text.tsv").read_text().splitlines()[1:]][: a.limit]
    texts = [(int(i), t) for i, t in rows]
    posters = sorted((src / "posters").glob("*.jpg"), key=lambda p: int(p.stem))[: a.limit]
    images = [(int(p.stem), str(p)) for p in posters]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"{'encoder':<8}{'actors':>7}{'items':>7}{'seconds':>9}{'items/s':>9}")
    for kind, items, bs in (("text", texts, 64), ("image", images, 32)):
        for n in (1, 2):
            t = time.perf_counter()
            out = encode(kind, items, batch_size=bs, concurrency=n, log=lambda m: None)
            sec = time.perf_counter() - t
            print(f"{kind:<8}{n:>7}{len(out):>7}{sec:>9.1f}{len(out) / sec:>9.1f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
