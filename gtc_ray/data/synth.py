"""Synthetic datasets with planted structure, from tiny (tests) to Baby/Sports/Clothing scale.

Generative story:
- K latent item clusters; each item has a cluster, a latent vector (cluster centre + item offset)
  and a Zipf-like popularity.
- Each user prefers a few clusters (a sparse Dirichlet over K); each interaction picks a cluster
  by the user's preference, then an item of that cluster by popularity.
- Each modality is a noisy random projection of the item latent **plus** a user-irrelevant
  nuisance component of similar scale: content helps (it reveals the cluster), and filtering out
  the nuisance helps more, which is GTC's premise.
Everything is vectorised (no per-row Python loops): 1M interactions take a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gtc_ray.data.dataset import Dataset, write_dataset
from gtc_ray.data.importers import split_random_per_user
from gtc_ray.errors import GtcInputError


@dataclass
class SynthSpec:
    users: int
    items: int
    interactions: int
    clusters: int = 20
    modalities: tuple = (("image", 4096), ("text", 384))
    latent_dim: int = 16
    nuisance_scale: float = 1.0
    noise_scale: float = 0.3


PRESETS = {
    "tiny": SynthSpec(60, 40, 1_200, clusters=4, modalities=(("image", 32), ("text", 16)), latent_dim=8),
    "small": SynthSpec(600, 400, 15_000, clusters=8, modalities=(("image", 128), ("text", 64))),
    "baby": SynthSpec(19_445, 7_050, 160_792),
    "sports": SynthSpec(35_598, 18_357, 296_337),
    "clothing": SynthSpec(39_387, 23_033, 278_677),
    "1m": SynthSpec(100_000, 30_000, 1_000_000, clusters=50, modalities=(("image", 256), ("text", 384))),
}


def generate(spec: SynthSpec, seed: int = 0) -> Dataset:
    U, I, N, K = spec.users, spec.items, spec.interactions, spec.clusters
    if min(U, I, K) < 1 or N < 5 * U:
        raise GtcInputError("synthetic dataset size", f"{U} users, {I} items, {N} interactions",
                            "use at least 5 interactions per user (interactions >= 5 * users)")
    if I < K or I < 10:
        raise GtcInputError("synthetic dataset size", f"{I} items for {K} clusters", "use more items than clusters (>= 10)")
    rng = np.random.default_rng(seed)
    # items: cluster, popularity, latent
    cluster = np.sort(rng.integers(0, K, I))
    cluster[:K] = np.arange(K)  # every cluster non-empty
    cluster = np.sort(cluster)
    pop = rng.pareto(1.5, I) + 1.0
    seg_start = np.searchsorted(cluster, np.arange(K))
    seg_end = np.searchsorted(cluster, np.arange(K), side="right")
    cum = np.cumsum(pop)
    base = np.r_[0, cum][seg_start]
    mass = cum[seg_end - 1] - base
    centres = rng.normal(size=(K, spec.latent_dim))
    latent = centres[cluster] + 0.5 * rng.normal(size=(I, spec.latent_dim))
    # users: preference over clusters, number of interactions (>= 5)
    pref = rng.dirichlet(np.full(K, 0.15), size=U)
    extra = rng.geometric(1.0 / max(1.0, N / U - 4.0), size=U) - 1
    n_u = 5 + np.minimum(extra, I // 2)
    n_u = np.maximum(5, np.round(n_u * (N / n_u.sum()))).astype(np.int64)
    n_u = np.minimum(n_u, max(5, I // 2))
    rows_u = np.repeat(np.arange(U), np.ceil(n_u * 1.4).astype(np.int64) + 3)  # oversample for dedup
    # cluster per row by inverse CDF on the user's preference, chunked to bound memory
    c_row = np.empty(len(rows_u), np.int64)
    pcum = np.cumsum(pref, axis=1)
    for s in range(0, len(rows_u), 1 << 18):
        ru = rows_u[s:s + (1 << 18)]
        r = rng.random(len(ru))[:, None]
        c_row[s:s + len(ru)] = np.minimum((pcum[ru] < r).sum(1), K - 1)
    target = base[c_row] + rng.random(len(c_row)) * mass[c_row]
    it = np.minimum(np.searchsorted(cum, target), I - 1)
    # dedup, then keep the first n_u per user in a random order
    key = rows_u * I + it
    perm = rng.permutation(len(key))
    _, first = np.unique(key[perm], return_index=True)
    sel = perm[first]
    sel = sel[np.argsort(rng.random(len(sel)))]
    sel = sel[np.argsort(rows_u[sel], kind="stable")]
    u_s, i_s = rows_u[sel], it[sel]
    starts = np.searchsorted(u_s, np.arange(U))
    rank = np.arange(len(u_s)) - starts[u_s]
    keep = rank < n_u[u_s]
    users, items = u_s[keep], i_s[keep]
    # every item must appear: give each unseen item to a user that prefers its cluster
    seen = np.zeros(I, bool); seen[items] = True
    unseen = np.flatnonzero(~seen)
    if len(unseen):
        top = np.argmax(pref, axis=1)
        extra_u = np.empty(len(unseen), np.int64)
        for j, i in enumerate(unseen):
            cands = np.flatnonzero(top == cluster[i])
            extra_u[j] = rng.choice(cands) if len(cands) else rng.integers(U)
        users = np.r_[users, extra_u]; items = np.r_[items, unseen]
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    ts = 1_600_000_000 + rng.integers(0, 10**7, len(users))
    split = split_random_per_user(users, seed + 1)
    feats = {}
    nuis = rng.normal(size=(I, spec.latent_dim))  # user-irrelevant content, shared across modalities
    for m, (name, dim) in enumerate(spec.modalities):
        A = rng.normal(size=(spec.latent_dim, dim)) / np.sqrt(spec.latent_dim)
        Bn = rng.normal(size=(spec.latent_dim, dim)) / np.sqrt(spec.latent_dim)
        f = latent @ A + spec.nuisance_scale * (nuis @ Bn) + spec.noise_scale * rng.normal(size=(I, dim))
        feats[name] = f.astype(np.float32)
    return Dataset(users=users.astype(np.int32), items=items.astype(np.int32), split=split, num_users=U,
                   num_items=I, features=feats, timestamps=ts.astype(np.int64),
                   ratings=rng.integers(1, 6, len(users)).astype(np.float32),
                   user_ids=np.array([f"u{j}" for j in range(U)]), item_ids=np.array([f"i{j}" for j in range(I)]))


def synth(out, preset: str = "tiny", seed: int = 0, overwrite: bool = False, **overrides) -> dict:
    """Generate a preset and write it to `out`, a local path or a URI (e.g. s3://bucket/tiny)."""
    if preset not in PRESETS:
        raise GtcInputError("--preset", f"unknown preset {preset!r}", f"use one of {', '.join(PRESETS)}")
    spec = SynthSpec(**{**PRESETS[preset].__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    ds = generate(spec, seed)
    return write_dataset(ds, out, name=f"synth-{preset}", split_scheme=f"random per user (MMRec rule, seed {seed + 1})",
                         provenance={"generator": "gtc_ray.data.synth", "preset": preset, "seed": seed,
                                     "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.__dict__.items()}},
                         overwrite=overwrite)
