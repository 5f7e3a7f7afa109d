"""Interaction-guided diffusion (spec §5.2 steps 2-7): the noise schedule and the conditional denoiser.

The schedule is its own small object with the three DDPM verbs (Ho et al. 2020):
- `sample_timesteps` (training draws t ~ U[1, T), eval uses T//2),
- `add_noise`      x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                        (DDPM eq. 4)
- `predict_x0`     x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)             (DDPM eq. 15)
- `step`           one ancestral reverse step x_t -> x_{t-1}                             (DDPM eq. 11)

with beta_t = linspace(beta_start, beta_end, T), alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s,
indexed 0..T-1 as in the original (abar_599 ~ 0.048 and abar_300 ~ 0.46 for the defaults).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NoiseSchedule(nn.Module):
    def __init__(self, steps: int = 600, beta_start: float = 1e-4, beta_end: float = 0.01):
        super().__init__()
        self.steps = steps
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        # float32 copies; non-persistent: derived from the config, never checkpointed
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas", alphas.float(), persistent=False)
        self.register_buffer("alpha_bar", abar.float(), persistent=False)

    @property
    def eval_timestep(self) -> int:
        return self.steps // 2

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Training timesteps t ~ UniformInt[1, T) (the original never draws t = 0)."""
        return torch.randint(1, self.steps, (n,), generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t].unsqueeze(-1)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t].unsqueeze(-1)
        return (xt - (1.0 - ab).sqrt() * eps_hat) / ab.sqrt()

    def step(self, xt: torch.Tensor, t: torch.Tensor, eps_hat: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_hat) + sqrt(beta_t) z, z = 0 at t = 0."""
        a = self.alphas[t].unsqueeze(-1)
        b = self.betas[t].unsqueeze(-1)
        ab = self.alpha_bar[t].unsqueeze(-1)
        mean = (xt - b / (1.0 - ab).sqrt() * eps_hat) / a.sqrt()
        z = torch.randn(xt.shape, generator=generator, device=xt.device, dtype=xt.dtype)
        return mean + (t > 0).unsqueeze(-1).to(xt.dtype) * b.sqrt() * z


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(t w_j), cos(t w_j)], w_j = 10000^(-2j/dim), j < dim/2; built on t's device (fixes B3)."""
    half = dim // 2
    j = torch.arange(half, device=t.device, dtype=torch.float32)
    w = torch.exp(-math.log(10000.0) * 2.0 * j / dim)
    ang = t.float().unsqueeze(-1) * w
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def _dl(a: int, b: int) -> nn.Sequential:
    """DL(a->b) = Linear(a,b) -> ReLU -> Linear(b,b) -> ReLU."""
    return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, b), nn.ReLU())


class ConditionalDenoiser(nn.Module):
    """eps_hat = f(x_t, t, c), the original's UNet-style MLP (spec §5.2 step 5).

    For embed_dim = cond_dim = 64 it has exactly the original's 309,248 parameters.
    """

    def __init__(self, embed_dim: int = 64, cond_dim: int = 64):
        super().__init__()
        d, w = embed_dim, embed_dim + cond_dim
        self.width = w
        self.down1 = _dl(w, d)
        self.down2 = _dl(d, w)
        self.mid1 = _dl(w, w)
        self.mid2 = _dl(w, 2 * w)
        self.mid3 = _dl(2 * w, w)
        self.skip2 = nn.Linear(w, w)
        self.up2 = _dl(2 * w, w)
        self.skip1 = nn.Linear(w, d)
        self.up1 = _dl(2 * d, d)
        self.out = nn.Linear(d, d)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h0 = torch.cat([xt, cond], dim=-1) + timestep_embedding(t, self.width)
        x1 = self.down1(h0)
        x2 = self.down2(x1)
        x3 = self.mid3(self.mid2(self.mid1(x2)))
        y = self.up2(torch.cat([x2, self.skip2(x3)], dim=-1))
        y = self.up1(torch.cat([x1, self.skip1(y)], dim=-1))
        return self.out(y)
