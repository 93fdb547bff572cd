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


def ddim_grid(path: Path, steps: int, spacing: str = "leading", t_min: float = 1e-3) -> torch.Tensor:
    """The path times of DDIM-spaced DDPM steps, followed by t = 0 (clean data).

    Continuous-time paths have no training steps to choose among: they get the uniform grid.
    """
    if path.T is None:
        return uniform_grid(path, steps, t_min)
    if steps > path.T:
        raise DiffcliError(f"steps={steps} exceeds the model's T={path.T} training steps; use steps<={path.T}")
    i = torch.from_numpy(ddim_timesteps(path.T, steps, spacing).copy())
    return torch.cat([(i.double() + 1) / path.T, torch.zeros(1, dtype=torch.float64)])


def uniform_grid(path: Path, steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """`steps` intervals: uniform in t from 1 down to t_min, then a last step to t = 0."""
    if not 0 < t_min < 1:
        raise DiffcliError(f"sampler.grid.t_min={t_min} must lie in (0, 1)")
    return torch.cat([torch.linspace(1, t_min, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def levels_grid(path: Path, steps: int | None = None, t_min: float = 1e-3) -> torch.Tensor:
    """Noise levels for annealed Langevin, largest first: NCSN's own L levels, else `steps` uniform in t."""
    levels = getattr(path, "levels", None)
    if levels is not None:
        if steps not in (None, len(levels)):
            raise DiffcliError(f"steps={steps}, but this NCSN model has L={len(levels)} noise levels; "
                               "leave steps unset for annealed Langevin")
        return levels.flip(0)
    return torch.linspace(1, t_min, steps or 10, dtype=torch.float64)


GRIDS = {"ddim": ddim_grid, "uniform": uniform_grid, "levels": levels_grid}


def require_gaussian(path: Path, sampler: str) -> None:
    """Samplers that follow the score or the Gaussian posterior refuse other priors, in one line."""
    if path.prior != "gaussian":
        raise DiffcliError(f"sampler={sampler} needs a Gaussian prior (it uses the score or Gaussian posteriors); "
                           f"this model's prior is {path.prior}: use sampler=euler")


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
    require_gaussian(path, "ancestral")
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
    if eta > 0:  # the injected noise stands in for Gaussian x1; eta = 0 is a valid ODE step for any prior
        require_gaussian(path, "ddim with eta > 0")
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0 = _x0_hat(denoiser, x, t, clip_x0)
        a_t, s_t, a_s, s_s, s2_ts = _transition(path, t, s)
        eps = (x - a_t * x0) / s_t  # consistent with the (possibly clipped) x0
        c = eta * torch.sqrt(s2_ts * s_s**2 / s_t**2)  # eq. 16's sigma_t
        x = a_s * x0 + torch.sqrt((s_s**2 - c**2).clamp(min=0)) * eps
        if c > 0:
            x = x + c * _noise(x, generator)
    return x


@torch.no_grad()
def euler(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler steps of the ODE dx/dt = E[alpha' x0 + sigma' x1 | x_t]: the marginal velocity of flow
    matching (Lipman et al. 2023, eq. 8), which for Gaussian paths is the probability-flow ODE
    (Song et al. 2021, eq. 13). Valid for any prior."""
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0, x1 = denoiser.predict(x, t)
        x = x + (s - t) * (path.d_alpha(t) * x0 + path.d_sigma(t) * x1)
    return x


@torch.no_grad()
def euler_maruyama(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021, eq. 6);
    the last step returns the noise-free mean."""
    require_gaussian(path, "euler_maruyama")
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        _, x1 = denoiser.predict(x, t)
        score, dt = -x1 / path.sigma(t), s - t  # dt < 0: integrating from t = 1 down to 0
        x = x + (path.f(t) * x - path.g2(t) * score) * dt
        if s > 0:
            x = x + torch.sqrt(-path.g2(t) * dt) * _noise(x, generator)
    return x


@torch.no_grad()
def langevin(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *, n_steps: int = 100,
             step_size: float = 2e-5, denoise: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): at each level sigma_i, n_steps of
    x <- x + a_i score + sqrt(2 a_i) z with a_i = step_size sigma_i^2 / sigma_L^2; then optionally the
    denoising step x + sigma_L^2 score(x, sigma_L) (Jolicoeur-Martineau et al. 2021), which for
    alpha = 1 is Tweedie's E[x0 | x]."""
    require_gaussian(path, "langevin")
    sigma_last = path.sigma(t_grid[-1])
    for t in t_grid:
        a_i = step_size * (path.sigma(t) / sigma_last) ** 2
        for _ in range(n_steps):
            _, x1 = denoiser.predict(x, t)
            x = x - a_i * x1 / path.sigma(t) + torch.sqrt(2 * a_i) * _noise(x, generator)
    if denoise:
        x = denoiser(x, t_grid[-1])
    return x
