"""Time grids and samplers over (denoiser, path, x_init, t_grid).

A time grid is a decreasing float64 tensor from t_0 (near 1, the prior) to 0 (the data).
Samplers step between consecutive grid points using only denoiser(x_t, t) -> x0_hat and the
path's alpha, sigma; they return the final x (network evaluations are counted by the denoiser).
"""

from __future__ import annotations

import numpy as np
import torch

from . import DiffcliError
from .paths import Path

SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(T: int, steps: int, spacing: str = "leading") -> np.ndarray:
    """Integer DDPM steps (descending) for `steps` sampling steps (Lin et al. 2024, Table 2)."""
    if spacing == "leading":
        return (np.arange(steps) * (T // steps))[::-1].astype(np.int64)
    if spacing == "trailing":
        return (np.round(np.arange(T, 0, -T / steps)) - 1).astype(np.int64)
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    raise DiffcliError(f"sampler.spacing={spacing} is unknown; choose one of {', '.join(SPACINGS)}")


def ddim_grid(path: Path, steps: int, spacing: str = "leading") -> torch.Tensor:
    """The path times of DDIM-spaced DDPM steps, followed by t = 0 (clean data)."""
    if path.T is None:
        raise DiffcliError("this sampler's grid needs a discrete-time model (model=ddpm)")
    if steps > path.T:
        raise DiffcliError(f"steps={steps} exceeds the model's T={path.T} training steps; use steps<={path.T}")
    i = torch.from_numpy(ddim_timesteps(path.T, steps, spacing).copy())
    return torch.cat([(i.double() + 1) / path.T, torch.zeros(1, dtype=torch.float64)])


GRIDS = {"ddim": ddim_grid}


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _x0_hat(denoiser, x, t, clip_x0: bool):
    x0 = denoiser(x, t)
    return x0.clamp(-1, 1) if clip_x0 else x0


def _transition(path: Path, t: torch.Tensor, s: torch.Tensor):
    """alpha_t, sigma_t, alpha_s, sigma_s and sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2."""
    a_t, s_t, a_s, s_s = path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s)
    return a_t, s_t, a_s, s_s, s_t**2 - (a_t / a_s) ** 2 * s_s**2


@torch.no_grad()
def ancestral(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
              generator: torch.Generator | None = None, clip_x0: bool = False) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2 / eq. 7)."""
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0 = _x0_hat(denoiser, x, t, clip_x0)
        a_t, s_t, a_s, s_s, s2_ts = _transition(path, t, s)
        mean = (a_s * s2_ts / s_t**2) * x0 + ((a_t / a_s) * s_s**2 / s_t**2) * x
        x = mean + torch.sqrt(s2_ts * s_s**2 / s_t**2) * _noise(x, generator) if s > 0 else mean
    return x


@torch.no_grad()
def ddim(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, clip_x0: bool = False) -> torch.Tensor:
    """DDIM (Song et al. 2021a, eq. 12): eta = 0 is deterministic, eta = 1 is ancestral sampling."""
    if eta < 0:
        raise DiffcliError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0 = _x0_hat(denoiser, x, t, clip_x0)
        a_t, s_t, a_s, s_s, s2_ts = _transition(path, t, s)
        eps = (x - a_t * x0) / s_t  # consistent with the (possibly clipped) x0
        c = eta * torch.sqrt(s2_ts * s_s**2 / s_t**2)  # eq. 16's sigma_t
        x = a_s * x0 + torch.sqrt((s_s**2 - c**2).clamp(min=0)) * eps
        if c > 0:
            x = x + c * _noise(x, generator)
    return x
