"""Time grids: (path, steps, **options) -> a decreasing float64 tensor of path times, `steps` intervals ending
at t = 0 (clean data), and the log-SNR lambda = log(alpha/sigma) with its inverse, on which several grids are built."""

from __future__ import annotations

import math

import numpy as np
import torch

from .. import DiffcliError
from ..paths import ProbabilityPath

SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(T: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """Integer DDPM steps (descending) for `steps` sampling steps (Lin et al. 2024, Table 2); `steps_offset` shifts
    the leading spacing up, as diffusers' schedulers do (Stable Diffusion uses 1)."""
    if spacing == "leading":
        if not 0 <= steps_offset < T // steps:
            raise DiffcliError(f"sampler.grid.steps_offset={steps_offset} must lie in [0, {T // steps}) for {steps} "
                               f"leading steps of T={T}")
        return (np.arange(steps) * (T // steps))[::-1].astype(np.int64) + steps_offset
    if spacing == "trailing":
        return (np.round(np.arange(T, 0, -T / steps)) - 1).astype(np.int64)
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    raise DiffcliError(f"sampler.grid.spacing={spacing} is unknown; choose one of auto, {', '.join(SPACINGS)}")


def ddim_grid(path: ProbabilityPath, steps: int, spacing: str = "leading", t_min: float = 1e-3,
              steps_offset: int | str = 0, set_alpha_to_one: bool | str = True) -> torch.Tensor:
    """The path times of DDIM-spaced DDPM steps (`auto`: trailing with zero terminal SNR, else leading), followed by
    t = 0 (clean data; alpha_bar = 1), or with set_alpha_to_one=False by DDPM step 0 (alpha_bar_0 = 1 - beta_1),
    where diffusers' DDIM then stops. steps_offset and set_alpha_to_one `auto` (a model without its own, see
    sampling.model_options) are 0 and true.

    Continuous-time paths have no training steps to choose among: they get the uniform grid.
    """
    if path.T is None:
        return uniform_grid(path, steps, t_min)
    if spacing == "auto":  # trailing starts at alpha = 0 where the path has zero terminal SNR (Lin et al. 2024)
        spacing = "trailing" if getattr(path, "zero_terminal_snr", False) else "leading"
    steps_offset = 0 if steps_offset == "auto" else steps_offset
    set_alpha_to_one = True if set_alpha_to_one == "auto" else set_alpha_to_one
    if steps > path.T:
        raise DiffcliError(f"steps={steps} exceeds the model's T={path.T} training steps; use steps<={path.T}")
    i = torch.from_numpy(ddim_timesteps(path.T, steps, spacing, steps_offset).copy())
    last = torch.zeros(1, dtype=torch.float64) if set_alpha_to_one else path.timestep_to_t(torch.zeros(1))
    return torch.cat([path.timestep_to_t(i), last])


def _check_t_min(t_min: float) -> None:
    if not 0 < t_min < 1:
        raise DiffcliError(f"sampler.grid.t_min={t_min} must lie in (0, 1)")


def _then_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def uniform_grid(path: ProbabilityPath, steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """`steps` intervals: uniform in t from 1 down to t_min, then a last step to t = 0."""
    _check_t_min(t_min)
    return _then_zero(torch.linspace(1, t_min, steps, dtype=torch.float64))


def linear_grid(path: ProbabilityPath, steps: int, t_max: float = 1.0) -> torch.Tensor:
    """`steps` equal intervals from t_max (a consistency model's largest trained level) to t = 0: the few-step grid
    of a distilled model (a 2-rectified flow's Euler steps, Liu et al. 2023, sec. 2.2; multistep consistency
    sampling, Song et al. 2023, Alg. 1)."""
    if not 0 < t_max <= 1:
        raise DiffcliError(f"sampler.grid.t_max={t_max} must lie in (0, 1]")
    return torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)


def quadratic_grid(path: ProbabilityPath, steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """t_i = t_min + (1 - t_min) (1 - i / (N - 1))^2 for i = 0..N-1 (N = steps: from 1 to t_min, dense near
    the data), then a last step to t = 0 (the quadratic DDIM schedule of Song et al. 2021a, App. D.2, in t)."""
    _check_t_min(t_min)
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    return _then_zero(t_min + (1 - t_min) * (1 - u) ** 2)


def log_snr(path: ProbabilityPath, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) = log(alpha / sigma): decreasing in t, +inf at t = 0 where sigma = 0, -inf where alpha = 0."""
    return torch.log(path.alpha(t)) - torch.log(path.sigma(t))


def t_from_lambda(path: ProbabilityPath, lam) -> torch.Tensor:
    """The t >= 0 with log_snr(path, t) = lam: the path's closed-form inverse of s = sigma/alpha = e^-lam, which
    reaches beyond t = 1 where alpha, sigma extend (EDM's churn raises the first step's noise level above s(1));
    values of lam beyond lambda(0) (a VE path's smallest level) give t = 0."""
    return path.t_from_s(torch.exp(-torch.as_tensor(lam, dtype=torch.float64))).clamp(min=0)


def _lambda_range(path: ProbabilityPath, t_min: float):
    """lambda at the top and at t_min. A flow's alpha(1) = 0 puts lambda(1) at -inf, so its range starts
    at t = 1 - 1e-4; the grids then move that first point to t = 1 exactly."""
    _check_t_min(t_min)
    one = torch.tensor(1.0, dtype=torch.float64)
    t_top = one if path.alpha(one) > 0 else one - 1e-4
    return log_snr(path, t_top), log_snr(path, torch.tensor(t_min, dtype=torch.float64))


def _grid_from_lambdas(path: ProbabilityPath, lam: torch.Tensor) -> torch.Tensor:
    t = t_from_lambda(path, lam)
    t[0] = 1.0  # start exactly at the prior
    return _then_zero(t)


def karras_grid(path: ProbabilityPath, steps: int, t_min: float = 1e-3, rho: float = 7.0,
                sigma_cap: float = 80.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5, on the scaled noise level sigma/alpha = exp(-lambda):
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1,
    between sigma/alpha at t = 1 (capped at EDM's sigma_max = 80: a flow's reaches 1e4, and rho = 7 would
    spend most steps near t = 1) and at t_min, mapped back to t; the first point is t = 1 exactly; then a
    last step to t = 0."""
    lam_max, lam_min = _lambda_range(path, t_min)
    sigma_max, sigma_min = torch.exp(-lam_max).clamp(max=sigma_cap), torch.exp(-lam_min)
    return _grid_from_lambdas(path, -torch.log(karras_levels(sigma_max, sigma_min, steps, rho)))


def karras_levels(s_from, s_to, n: int, rho: float = 7.0) -> torch.Tensor:
    """n noise levels (s_from^(1/rho) + i / (n - 1) (s_to^(1/rho) - s_from^(1/rho)))^rho, i = 0..n-1, in float64
    (Karras et al. 2022, eq. 5, from s_from = sigma_max down to s_to = sigma_min; the other way up)."""
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    s_from, s_to = (torch.as_tensor(s, dtype=torch.float64) for s in (s_from, s_to))
    return (s_from ** (1 / rho) + u * (s_to ** (1 / rho) - s_from ** (1 / rho))) ** rho


def logsnr_grid(path: ProbabilityPath, steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """Uniform in lambda = log(alpha/sigma) from t = 1 to t_min (DPM-Solver's recommended grid, Lu et al. 2022,
    sec. 3.3), mapped back to t; then a last step to t = 0."""
    lam_max, lam_min = _lambda_range(path, t_min)
    return _grid_from_lambdas(path, torch.linspace(float(lam_max), float(lam_min), steps, dtype=torch.float64))


def ends_grid(path: ProbabilityPath, steps: int | None = None, t_min: float = 1e-3) -> torch.Tensor:
    """[1, t_min, 0] whatever `steps`: an adaptive solver (dopri5) picks its own steps between the ends."""
    _check_t_min(t_min)
    return torch.tensor([1.0, t_min, 0.0], dtype=torch.float64)


def levels_grid(path: ProbabilityPath, steps: int | None = None, sigma_min: float = 0.01) -> torch.Tensor:
    """Noise levels for annealed Langevin, largest first: NCSN's own L levels; for other paths `steps`
    (default 10) levels geometric in the noise level sigma/alpha from t = 1 down to sigma_min, the
    spacing NCSN uses, so that Langevin's step rule (calibrated on sigma_L = 0.01) carries over."""
    levels = getattr(path, "levels", None)
    if levels is not None:
        if steps not in (None, len(levels)):
            raise DiffcliError(f"steps={steps}, but this NCSN model has L={len(levels)} noise levels; "
                               "leave steps unset for annealed Langevin")
        return levels.flip(0)
    lam_top, _ = _lambda_range(path, 0.5)
    lam = torch.linspace(float(lam_top), -math.log(sigma_min), steps or 10, dtype=torch.float64)
    return _grid_from_lambdas(path, lam)[:-1]  # Langevin visits levels; no final step to t = 0


GRIDS = {"ddim": ddim_grid, "uniform": uniform_grid, "linear": linear_grid, "quadratic": quadratic_grid, "karras": karras_grid,
         "logsnr": logsnr_grid, "ends": ends_grid, "levels": levels_grid}
