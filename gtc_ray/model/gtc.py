"""GTC: user-aware conditional generative total-correlation learning (arXiv 2604.03014), spec §5-6.

Generalised to M >= 0 modalities (M = 0 is the ID-only ablation). Per training batch, over the
full graph (this is what the method is, spec P1):

1. F_m = Linear_m(features_m)                                  projections, [I, d]
2. t ~ U[1, T) per item (shared by modalities); eps_m ~ N(0, I); F_m,t = add_noise(F_m, t, eps_m)
3. eps_hat_m = denoiser_m(F_m,t, t, E_id);  L_gen = sum_m MSE(eps_m, eps_hat_m)
4. X_m = predict_x0(F_m,t, t, eps_hat_m)                       filtered content, [I, d]
5. E~ = gate(E_id, X_1..X_M)                                     similarity-gated refinement
6. L_TC over (rownorm E_id, rownorm X_1, ..., rownorm X_M)
7. per representation r in (E~, X_1..X_M): R_r = propagate(A_hat, rownorm([P_r; F_r]))
8. items Y = [R_r[U:]]_r, users Z = [W[u, r] R_r[:U]]_r;  Y' = Y + S Y,  Z' = Z + G Z
9. BPR on (Z'_u, Y'_pos, Y'_neg) + reg + lambda_TC L_TC + lambda_gen L_gen

The model imports nothing from Ray. Fixed-data tensors (features, graphs) are plain attributes set
by `attach`, not buffers, so DDP does not broadcast them every step and checkpoints stay small.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from gtc_ray.config import CompatConfig, ModelConfig
from gtc_ray.model.diffusion import ConditionalDenoiser, NoiseSchedule
from gtc_ray.model.propagation import SparseOperator, propagate, spmm
from gtc_ray.model.sharding import ItemShard, gather_rows
from gtc_ray.model.total_correlation import total_correlation_loss

LN2 = math.log(2.0)


def gate_roles(modalities: list[str]) -> tuple[str, str]:
    """Which of two modalities plays the original's visual (V) and which its text (T) role in the
    as-written gate, by name: "text" is T and the other V; without a "text", name order. Never by
    position in a manifest or on a command line (`--features text=... image=...` swaps nothing)."""
    if len(modalities) != 2:
        raise ValueError(f"the as-written gate needs exactly two modalities, got {modalities}")
    if "text" in modalities:
        return next(m for m in modalities if m != "text"), "text"
    v, t = sorted(modalities)
    return v, t


def gate_as_written(e: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """The original's gate (spec §5.2 step 8, B7), exactly: raw dot products a1=<E,V>, a2=<E,T>,
    a3=<V,T>; w = softmax(a); E~ = E + w1 E + w2 V + w3 T. The weights do not line up with what they
    weight, and that is deliberate: the published numbers came from it. Two modalities, passed as
    [V, T] (see gate_roles)."""
    v, t = xs
    a = torch.stack([(e * v).sum(-1), (e * t).sum(-1), (v * t).sum(-1)], dim=-1)
    w = torch.softmax(a, dim=-1)
    return e + w[:, 0:1] * e + w[:, 1:2] * v + w[:, 2:3] * t


def gate_per_modality(e: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """The evidently intended gate, for any M: w = softmax_m cos(E, X_m); E~ = E + sum_m w_m X_m."""
    s = torch.stack([F.cosine_similarity(e, x, dim=-1) for x in xs], dim=-1)
    w = torch.softmax(s, dim=-1)
    return e + sum(w[:, m:m + 1] * x for m, x in enumerate(xs))


class GTC(nn.Module):
    def __init__(self, num_users: int, num_items: int, feature_dims: dict[str, int], cfg: ModelConfig,
                 compat: CompatConfig | None = None):
        super().__init__()
        self.cfg, self.compat = cfg, compat or CompatConfig()
        self.num_users, self.num_items = num_users, num_items
        # canonical (name) order for everything built per modality: parameters, random draws, the
        # TC's representations, the gate's roles; so the order a dataset lists them in changes nothing
        self.modalities = sorted(feature_dims) if cfg.use_content else []
        M, d = len(self.modalities), cfg.embedding_size
        self.gate_mode = "off" if cfg.gate == "off" or M == 0 else (
            "as_written" if cfg.gate == "as_written" and M == 2 else "per_modality")
        self.projections = nn.ModuleDict({m: nn.Linear(feature_dims[m], d) for m in self.modalities})
        self.item_embedding = nn.Parameter(torch.randn(num_items, d))  # nn.Embedding's N(0, 1)
        self.use_diffusion = cfg.use_diffusion and M > 0
        self.use_tc = cfg.use_tc and M > 0
        self.schedule = NoiseSchedule(cfg.noise_steps, cfg.beta_start, cfg.beta_end)
        if self.use_diffusion:
            self.denoisers = nn.ModuleDict({m: ConditionalDenoiser(d, d) for m in self.modalities})
            if self.compat.freeze_denoiser:  # B1 as shipped: a fixed random network
                self.denoisers.requires_grad_(False)
        if self.use_tc:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.tc_temperature)))
        R = 1 + M
        w = torch.empty(num_users, R, 1)
        nn.init.xavier_normal_(w)
        self.weight_u = nn.Parameter(torch.softmax(w, dim=1))  # softmaxed once at init, as the original
        self.preferences = nn.ParameterList()
        for _ in range(R):
            p = torch.empty(num_users, d)
            nn.init.xavier_normal_(p)
            self.preferences.append(nn.Parameter(p))
        self._eval_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.low_precision = torch.bfloat16 if cfg.matmul_precision == "bfloat16" else None
        self.item_shard: ItemShard | None = None  # set by the trainer for sharded DDP (sharding.py)
        self.features: dict[str, torch.Tensor] = {}
        self.feature_rows = (0, num_items)  # the item rows self.features holds (attach)
        self.adj = self.item_graph = self.user_graph = None

    # ------------------------------------------------------------------ fixed data
    def attach(self, features: dict[str, np.ndarray], adj: sp.csr_matrix, item_graph: sp.csr_matrix | None,
               user_graph: sp.csr_matrix | None, device=None, feature_rows: tuple[int, int] | None = None) -> "GTC":
        """Set the fixed tensors (features, normalised adjacency, item-item and user-user graphs).
        `feature_rows` (lo, hi): the features given are those item rows only, this worker's block
        of the item-sharded work (item_shard must then be set before any forward); default all."""
        device = device or self.item_embedding.device
        self.feature_rows = feature_rows or (0, self.num_items)
        # frozen inputs: with bf16 products they are stored in bf16 once (half the memory, and no
        # per-step cast of the [I, 4096] visual features); converted in the copy to the device, so
        # no float32 copy is made there first
        dtype = self.low_precision or torch.float32
        self.features = {m: torch.as_tensor(features[m], dtype=torch.float32).to(device, dtype)
                         for m in self.modalities}
        self.adj = SparseOperator(adj, device)
        use_ii = item_graph is not None and item_graph.nnz > 0 and len(self.modalities) > 0
        self.item_graph = SparseOperator(item_graph, device) if use_ii else None
        self.set_user_graph(user_graph, device)
        return self

    def set_user_graph(self, user_graph: sp.csr_matrix | None, device=None) -> None:
        device = device or self.item_embedding.device
        self.user_graph = SparseOperator(user_graph, device) if user_graph is not None and user_graph.nnz else None
        self._eval_cache = None

    # ------------------------------------------------------------------ forward
    def _filtered_content(self, generator, train: bool, shard: ItemShard | None):
        """Steps 1-4: projections, forward noising, denoising, one-step x0 estimate.

        With a shard, only this worker's item rows are computed (the random draws are made for all
        items, so every worker sees the same stream) and the result is gathered; L_gen is this
        worker's share of the full mean."""
        e = self.item_embedding
        xs, l_gen = [], e.new_zeros(())
        if not self.modalities:
            return xs, l_gen
        n, d = self.num_items, self.cfg.embedding_size
        lo, hi = (0, n) if shard is None else shard.bounds(n)
        if self.use_diffusion:
            if train:
                t = self.schedule.sample_timesteps(n, generator, e.device)[lo:hi]
            else:
                t = torch.full((hi - lo,), self.schedule.eval_timestep, device=e.device, dtype=torch.long)
        for m in self.modalities:
            f = self._project(m, lo, hi)
            if not self.use_diffusion:
                xs.append(f)
                continue
            eps = torch.randn((n, d), generator=generator, device=f.device)[lo:hi]
            ft = self.schedule.add_noise(f, t, eps)
            with torch.autocast(e.device.type, dtype=torch.bfloat16, enabled=self.low_precision is not None):
                eps_hat = self.denoisers[m](ft, t, e[lo:hi]).float()
            l_gen = l_gen + F.mse_loss(eps_hat, eps, reduction="sum") / (n * d)
            xs.append(self.schedule.predict_x0(ft, t, eps_hat))
        if shard is not None:  # embed() passes a shard only when there are several workers
            xs = list(gather_rows(torch.cat(xs, dim=-1), n, shard).split(d, dim=-1))
        return xs, l_gen

    def _project(self, m: str, lo: int, hi: int) -> torch.Tensor:
        """F_m for item rows [lo, hi), float32. With bf16 products the matrix product runs in bf16
        (float32 accumulation) on the stored bf16 features: the visual projection is I x 4096 x d."""
        f_lo, f_hi = self.feature_rows
        if lo < f_lo or hi > f_hi:
            raise RuntimeError(f"feature rows [{lo}, {hi}) requested, this model holds [{f_lo}, {f_hi})")
        proj, x = self.projections[m], self.features[m][lo - f_lo:hi - f_lo]
        if self.low_precision is None:
            return proj(x)
        return F.linear(x, proj.weight.to(x.dtype), proj.bias.to(x.dtype)).float()

    def embed(self, generator: torch.Generator | None = None, train: bool = True,
              shard: ItemShard | None = None, user_rows: torch.Tensor | None = None) -> dict:
        """Full-graph forward: final user and item embeddings plus the auxiliary losses.

        user_rows: return the final embeddings of these users only (a training batch): the user-user
        aggregation G Z is then computed for those rows of G, not all U (it was ~10% of a step).

        With a shard, only this worker's item rows are filtered (then gathered), in evaluation too,
        where the result is the same on every worker. In training L_gen and L_TC come back as W x this
        worker's share: DDP's average of the workers' gradients is then the full losses' gradient
        (see sharding.py)."""
        e = self.item_embedding
        shard = shard if shard is not None and shard.world > 1 else None
        xs, l_gen = self._filtered_content(generator, train, shard)
        if self.gate_mode == "as_written":
            by_name = dict(zip(self.modalities, xs))
            e_ref = gate_as_written(e, [by_name[m] for m in gate_roles(self.modalities)])
        elif self.gate_mode == "per_modality":
            e_ref = gate_per_modality(e, xs)
        else:
            e_ref = e
        l_tc = e.new_zeros(())
        if self.use_tc and train:
            zs = [F.normalize(e, dim=-1)] + [F.normalize(x, dim=-1) for x in xs]
            scale = self.logit_scale.clamp(max=self.cfg.logit_scale_max).exp()
            rows = shard.bounds(self.num_items) if shard is not None and self.cfg.tc_mode == "n" else None
            l_tc = total_correlation_loss(zs, scale, self.cfg.tc_mode, generator, rows, self.low_precision)
            if rows is not None:
                l_tc = l_tc * shard.world
        if shard is not None:
            l_gen = l_gen * shard.world
        U = self.num_users
        reps = []
        for r, f in enumerate([e_ref] + xs):
            x = F.normalize(torch.cat([self.preferences[r], f], dim=0), dim=-1)
            reps.append(propagate(self.adj, x, self.cfg.n_layers))
        items = torch.cat([R[U:] for R in reps], dim=-1)
        users = torch.cat([self.weight_u[:, r] * R[:U] for r, R in enumerate(reps)], dim=-1)
        if self.item_graph is not None:
            items = items + spmm(self.item_graph, items)
        if user_rows is not None:
            base = users[user_rows]
            users = base + spmm(self.user_graph.rows(user_rows.cpu().numpy()), users) \
                if self.user_graph is not None else base
        elif self.user_graph is not None:
            users = users + spmm(self.user_graph, users)
        return {"users": users, "items": items, "reps_users": [R[:U] for R in reps], "gen": l_gen, "tc": l_tc}

    def calculate_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                       generator: torch.Generator | None = None) -> dict:
        """Total loss and each component for a batch of (user, positive, negative) triples (spec §6).
        Inputs are never modified (fixes B9)."""
        # compat's stale evaluation needs every user's embedding from this batch
        out = self.embed(generator, train=True, shard=self.item_shard,
                         user_rows=None if self.compat.stale_eval else users)
        zu = out["users"] if not self.compat.stale_eval else out["users"][users]
        diff = (zu * out["items"][pos]).sum(-1) - (zu * out["items"][neg]).sum(-1)
        if self.compat.unstable_bpr:
            bpr = -torch.log2(torch.sigmoid(diff)).mean()  # B6 as shipped
        else:
            bpr = -F.logsigmoid(diff).mean() / LN2  # same value, stable
        c = self.cfg
        reg = c.reg_weight * (sum((R[users] ** 2).mean() for R in out["reps_users"]) + (self.weight_u ** 2).mean())
        total = bpr + reg + c.tc_weight * out["tc"] + c.diff_weight * out["gen"]
        if self.compat.stale_eval:  # B5: evaluation will read this batch's (pre-step) embeddings
            self._eval_cache = (out["users"].detach(), out["items"].detach())
        else:
            self._eval_cache = None
        return {"loss": total, "bpr": bpr.detach(), "reg": reg.detach(), "tc": out["tc"].detach(),
                "gen": out["gen"].detach()}

    def forward(self, users, pos, neg, seed: int | None = None) -> dict:
        """DDP entry point: `calculate_loss` with a generator seeded from `seed`."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.item_embedding.device)
            gen.manual_seed(int(seed))
        return self.calculate_loss(users, pos, neg, gen)

    @torch.no_grad()
    def eval_embeddings(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings for ranking: a no-grad forward with the current weights, t = T//2 and seeded
        noise (fixes B5); in compat mode, the last training batch's embeddings."""
        if self.compat.stale_eval and self._eval_cache is not None:
            return self._eval_cache
        gen = torch.Generator(device=self.item_embedding.device)
        gen.manual_seed(seed)
        # sharded: every worker filters its item block (all ranks call this together)
        out = self.embed(gen, train=False, shard=self.item_shard)
        return out["users"], out["items"]

    @torch.no_grad()
    def full_sort_predict(self, users: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Scores of every item for each of `users`: [len(users), I] (no masking)."""
        zu, yi = self.eval_embeddings(seed)
        return zu[users] @ yi.T
