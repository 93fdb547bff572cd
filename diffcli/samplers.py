"""Time grids and samplers over (denoiser, path, x_init, t_grid).

A time grid is a decreasing float64 tensor from t_0 (near 1, the prior) to 0 (the data).
Samplers step between consecutive grid points using only denoiser(x_t, t) -> x0_hat and the
path's alpha, sigma; they return the final x (network evaluations are counted by the denoiser).
Every sampler takes `trajectory=`: a list that receives the initial x and x after every step.
`NEEDS` states what each sampler requires of the model; `check_sampler` refuses the rest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import DiffcliError
from .paths import FlowPath, Path

SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------
# Time grids: (path, steps, **options) -> decreasing float64 tensor, `steps` intervals ending at 0


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


def _check_t_min(t_min: float) -> None:
    if not 0 < t_min < 1:
        raise DiffcliError(f"sampler.grid.t_min={t_min} must lie in (0, 1)")


def _then_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def uniform_grid(path: Path, steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """`steps` intervals: uniform in t from 1 down to t_min, then a last step to t = 0."""
    _check_t_min(t_min)
    return _then_zero(torch.linspace(1, t_min, steps, dtype=torch.float64))


def quadratic_grid(path: Path, steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """t_i = t_min + (1 - t_min) (1 - i / (N - 1))^2 for i = 0..N-1 (N = steps: from 1 to t_min, dense near
    the data), then a last step to t = 0 (the quadratic DDIM schedule of Song et al. 2021a, App. D.2, in t)."""
    _check_t_min(t_min)
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    return _then_zero(t_min + (1 - t_min) * (1 - u) ** 2)


def log_snr(path: Path, t: torch.Tensor) -> torch.Tensor:
    """lambda(t) = log(alpha / sigma): decreasing in t, +inf at t = 0 where sigma = 0, -inf where alpha = 0."""
    return torch.log(path.alpha(t)) - torch.log(path.sigma(t))


def t_from_lambda(path: Path, lam, iters: int = 64) -> torch.Tensor:
    """The t in [0, 1] with log_snr(path, t) = lam, by float64 bisection (paths have no closed-form inverse);
    values of lam beyond lambda(0) or lambda(1) give the end t = 0 or t = 1."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
    for _ in range(iters):
        mid = (lo + hi) / 2
        later = log_snr(path, mid) > lam  # lambda decreases in t: the root lies after mid
        lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
    return (lo + hi) / 2


def _lambda_range(path: Path, t_min: float):
    """lambda at the top and at t_min. A flow's alpha(1) = 0 puts lambda(1) at -inf, so its range starts
    at t = 1 - 1e-4; the grids then move that first point to t = 1 exactly."""
    _check_t_min(t_min)
    one = torch.tensor(1.0, dtype=torch.float64)
    t_top = one if path.alpha(one) > 0 else one - 1e-4
    return log_snr(path, t_top), log_snr(path, torch.tensor(t_min, dtype=torch.float64))


def _grid_from_lambdas(path: Path, lam: torch.Tensor) -> torch.Tensor:
    t = t_from_lambda(path, lam)
    t[0] = 1.0  # start exactly at the prior
    return _then_zero(t)


def karras_grid(path: Path, steps: int, t_min: float = 1e-3, rho: float = 7.0,
                sigma_cap: float = 80.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5, on the scaled noise level sigma/alpha = exp(-lambda):
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1,
    between sigma/alpha at t = 1 (capped at EDM's sigma_max = 80: a flow's reaches 1e4, and rho = 7 would
    spend most steps near t = 1) and at t_min, mapped back to t; the first point is t = 1 exactly; then a
    last step to t = 0."""
    lam_max, lam_min = _lambda_range(path, t_min)
    sigma_max, sigma_min = torch.exp(-lam_max).clamp(max=sigma_cap), torch.exp(-lam_min)
    u = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return _grid_from_lambdas(path, -torch.log(sigmas))


def logsnr_grid(path: Path, steps: int, t_min: float = 1e-3) -> torch.Tensor:
    """Uniform in lambda = log(alpha/sigma) from t = 1 to t_min (DPM-Solver's recommended grid, Lu et al. 2022,
    sec. 3.3), mapped back to t; then a last step to t = 0."""
    lam_max, lam_min = _lambda_range(path, t_min)
    return _grid_from_lambdas(path, torch.linspace(float(lam_max), float(lam_min), steps, dtype=torch.float64))


def ends_grid(path: Path, steps: int | None = None, t_min: float = 1e-3) -> torch.Tensor:
    """[1, t_min, 0] whatever `steps`: an adaptive solver (dopri5) picks its own steps between the ends."""
    _check_t_min(t_min)
    return torch.tensor([1.0, t_min, 0.0], dtype=torch.float64)


def levels_grid(path: Path, steps: int | None = None, sigma_min: float = 0.01) -> torch.Tensor:
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


GRIDS = {"ddim": ddim_grid, "uniform": uniform_grid, "quadratic": quadratic_grid, "karras": karras_grid,
         "logsnr": logsnr_grid, "ends": ends_grid, "levels": levels_grid}


# ---------------------------------------------------------------------------------------------
# What each sampler needs of the model: the single source of truth (the README table reads it)

# requirement -> (does it hold for this path and these sampler options?, the one-line refusal)
REQUIREMENTS = {
    "gaussian prior": (
        lambda path, **options: path.prior == "gaussian",
        "sampler={name} needs a Gaussian prior (it uses the score or Gaussian posteriors); this model's prior "
        "is {prior}: use sampler=euler, heun, dpmpp_2m or dopri5"),
    "gaussian prior if eta > 0": (
        lambda path, eta=0.0, **options: eta == 0 or path.prior == "gaussian",
        "sampler=ddim with eta={eta} needs a Gaussian prior (its noise stands in for x1); this model's prior "
        "is {prior}: use eta=0 or sampler=euler"),
    "gaussian prior if s_churn > 0": (
        lambda path, s_churn=0.0, **options: s_churn == 0 or path.prior == "gaussian",
        "sampler=heun with s_churn={s_churn} needs a Gaussian prior (churn adds Gaussian noise); this model's "
        "prior is {prior}: use s_churn=0 or sampler=euler"),
    "alpha(1) > 0": (
        lambda path, **options: bool(path.alpha(torch.tensor(1.0, dtype=torch.float64)) > 0),
        "sampler={name} steps the reverse SDE, whose drift alpha'/alpha is infinite at t = 1 on this model "
        "(alpha(1) = 0, a flow); use sampler=ancestral, heun or dpmpp_2m"),
    "flow path": (
        lambda path, **options: isinstance(path, FlowPath),
        "sampler={name} integrates a flow's velocity up to t = 0; for diffusion models use heun, dpmpp_2m "
        "or dopri5"),
}

NEEDS = {
    "ancestral": ("gaussian prior",),
    "ddim": ("gaussian prior if eta > 0",),
    "euler": (),
    "heun": ("gaussian prior if s_churn > 0",),
    "dpmpp_2m": (),
    "midpoint": ("flow path",),
    "rk4": ("flow path",),
    "dopri5": (),
    "euler_maruyama": ("gaussian prior", "alpha(1) > 0"),
    "pc": ("gaussian prior", "alpha(1) > 0"),
    "langevin": ("gaussian prior",),
}


def check_sampler(name: str, path: Path, **options) -> None:
    """Raise a one-line DiffcliError unless sampler `name` (with these options) is valid for `path`."""
    if name not in NEEDS:
        raise DiffcliError(f"sampler={name} is unknown; choose one of {', '.join(NEEDS)}")
    for need in NEEDS[name]:
        holds, refusal = REQUIREMENTS[need]
        if not holds(path, **options):
            raise DiffcliError(refusal.format(name=name, prior=path.prior, **options))


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _record(trajectory: list | None, x: torch.Tensor) -> None:
    if trajectory is not None:
        trajectory.append(x.detach().cpu().clone())


def _x0_hat(denoiser, x, t, clip_x0: bool):
    x0 = denoiser(x, t)
    return x0.clamp(-1, 1) if clip_x0 else x0


def _velocity(denoiser, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x, t) = alpha'(t) x0_hat + sigma'(t) x1_hat: the probability-flow ODE / a flow's marginal velocity."""
    x0, x1 = denoiser.predict(x, t)
    return path.d_alpha(t) * x0 + path.d_sigma(t) * x1


def _score(denoiser, path: Path, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """score = -x1_hat / sigma (Gaussian prior)."""
    return -denoiser.predict(x, t)[1] / path.sigma(t)


def _transition(path: Path, t: torch.Tensor, s: torch.Tensor):
    """alpha_t, sigma_t, alpha_s, sigma_s and sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2."""
    a_t, s_t, a_s, s_s = path.alpha(t), path.sigma(t), path.alpha(s), path.sigma(s)
    return a_t, s_t, a_s, s_s, s_t**2 - (a_t / a_s) ** 2 * s_s**2


# ---------------------------------------------------------------------------------------------
# Stochastic samplers from Gaussian posteriors


@torch.no_grad()
def ancestral(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
              generator: torch.Generator | None = None, clip_x0: bool = False,
              trajectory: list | None = None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2 / eq. 7)."""
    check_sampler("ancestral", path)
    _record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0 = _x0_hat(denoiser, x, t, clip_x0)
        a_t, s_t, a_s, s_s, s2_ts = _transition(path, t, s)
        mean = (a_s * s2_ts / s_t**2) * x0 + ((a_t / a_s) * s_s**2 / s_t**2) * x
        x = mean + torch.sqrt(s2_ts * s_s**2 / s_t**2) * _noise(x, generator) if s > 0 else mean
        _record(trajectory, x)
    return x


@torch.no_grad()
def ddim(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, clip_x0: bool = False,
         trajectory: list | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021a, eq. 12): eta = 0 is deterministic, eta = 1 is ancestral sampling."""
    if eta < 0:
        raise DiffcliError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    check_sampler("ddim", path, eta=eta)  # eta = 0 is a valid ODE step for any prior
    _record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0 = _x0_hat(denoiser, x, t, clip_x0)
        a_t, s_t, a_s, s_s, s2_ts = _transition(path, t, s)
        eps = (x - a_t * x0) / s_t  # consistent with the (possibly clipped) x0
        c = eta * torch.sqrt(s2_ts * s_s**2 / s_t**2)  # eq. 16's sigma_t
        x = a_s * x0 + torch.sqrt((s_s**2 - c**2).clamp(min=0)) * eps
        if c > 0:
            x = x + c * _noise(x, generator)
        _record(trajectory, x)
    return x


# ---------------------------------------------------------------------------------------------
# ODE solvers on dx/dt = alpha' x0_hat + sigma' x1_hat (any prior)


@torch.no_grad()
def euler(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
          generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Euler steps of the ODE dx/dt = E[alpha' x0 + sigma' x1 | x_t]: the marginal velocity of flow
    matching (Lipman et al. 2023, eq. 8), which for Gaussian paths is the probability-flow ODE
    (Song et al. 2021, eq. 13). Valid for any prior."""
    check_sampler("euler", path)
    _record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x = x + (s - t) * _velocity(denoiser, path, x, t)
        _record(trajectory, x)
    return x


@torch.no_grad()
def heun(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *, s_churn: float = 0.0,
         s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
         generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2) on dx/dt = v(x, t); churn acts on x/alpha at the
    scaled noise level sigma/alpha (so VP and VE alike), never at a flow's t = 1 where alpha = 0."""
    check_sampler("heun", path, s_churn=s_churn)
    _record(trajectory, x)
    n = len(t_grid) - 1
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        sigma = path.sigma(t) / path.alpha(t)
        if s_churn > 0 and torch.isfinite(sigma) and s_tmin <= sigma <= s_tmax:
            gamma = min(s_churn / n, math.sqrt(2) - 1)
            t_hat = t_from_lambda(path, -torch.log((1 + gamma) * sigma))  # clamped at t = 1
            sigma_hat = path.sigma(t_hat) / path.alpha(t_hat)
            eps = s_noise * _noise(x, generator)
            x = path.alpha(t_hat) * (x / path.alpha(t) + torch.sqrt((sigma_hat**2 - sigma**2).clamp(min=0)) * eps)
            t = t_hat
        d = _velocity(denoiser, path, x, t)
        x_next = x + (s - t) * d  # Euler predictor
        if s > 0:  # trapezoidal corrector, skipped on the step to t = 0
            x_next = x + (s - t) * (d + _velocity(denoiser, path, x_next, s)) / 2
        x = x_next
        _record(trajectory, x)
    return x


@torch.no_grad()
def dpmpp_2m(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
             generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): x_s = (sigma_s/sigma_t) x - alpha_s (e^-h - 1) D with
    h = lambda_s - lambda_t, D = x0_hat corrected by the previous step's; the step to t = 0 returns x0_hat."""
    check_sampler("dpmpp_2m", path)
    _record(trajectory, x)
    x0_prev = h_prev = None
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0 = denoiser(x, t)
        h = log_snr(path, s) - log_snr(path, t)
        if s == 0:  # lambda_s = inf: the exponential integrator's limit
            x = x0
        else:  # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h; first order on the first step
            D = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
            x = (path.sigma(s) / path.sigma(t)) * x - path.alpha(s) * torch.expm1(-h) * D
        x0_prev, h_prev = x0, h
        _record(trajectory, x)
    return x


@torch.no_grad()
def midpoint(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
             generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Explicit midpoint rule (2nd-order Runge-Kutta) on a flow's velocity dx/dt = v(x, t) (Lipman et al. 2023)."""
    check_sampler("midpoint", path)
    _record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        h = s - t
        x = x + h * _velocity(denoiser, path, x + h / 2 * _velocity(denoiser, path, x, t), t + h / 2)
        _record(trajectory, x)
    return x


@torch.no_grad()
def rk4(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
        generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Classic 4th-order Runge-Kutta on a flow's velocity dx/dt = v(x, t) (Lipman et al. 2023)."""
    check_sampler("rk4", path)
    _record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        h = s - t
        k1 = _velocity(denoiser, path, x, t)
        k2 = _velocity(denoiser, path, x + h / 2 * k1, t + h / 2)
        k3 = _velocity(denoiser, path, x + h / 2 * k2, t + h / 2)
        k4 = _velocity(denoiser, path, x + h * k3, s)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        _record(trajectory, x)
    return x


@torch.no_grad()
def dopri5(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *, rtol: float = 1e-5,
           atol: float = 1e-5, generator: torch.Generator | None = None,
           trajectory: list | None = None) -> torch.Tensor:
    """Adaptive Dormand-Prince RK5(4) (Dormand & Prince 1980) on dx/dt = v(x, t) via torchdiffeq's odeint.

    Integrates to the grid's last positive time, then the denoising step returns x0_hat there. The grid's
    points only say where x is reported (trajectory), not the step sizes.
    """
    from torchdiffeq import odeint

    check_sampler("dopri5", path)
    times = t_grid[t_grid > 0]  # even a flow stops short of 0: a uniform prior's field sharpens there
    # odeint casts t to x's dtype (the path gets float64 back); step_t stops it stepping past the end,
    # and an explicit first step skips torchdiffeq's step-size probe, which can evaluate far outside
    # [0, 1] (seen: t = -23), where a diffusion's sigma is undefined
    first_step = float(times[0] - times[-1]) / 100
    xs = odeint(lambda t, x: _velocity(denoiser, path, x, t.double()), x, times.to(x.device),
                rtol=rtol, atol=atol, method="dopri5", options={"step_t": times[-1:], "first_step": first_step})
    for x in xs:
        _record(trajectory, x)
    x = denoiser(x, times[-1])  # the denoising step: E[x0 | x_t] at the last time
    _record(trajectory, x)
    return x


# ---------------------------------------------------------------------------------------------
# SDE and score-based samplers (Gaussian prior)


def _euler_maruyama_step(path: Path, x, score, t, s):
    """(mean, std) of an Euler-Maruyama step of the reverse SDE dx = [f x - g^2 score] dt + g dw (Song et al.
    2021, eq. 6) from t to s < t."""
    dt = s - t  # dt < 0: integrating from t = 1 down to 0
    return x + (path.f(t) * x - path.g2(t) * score) * dt, torch.sqrt(-path.g2(t) * dt)


def _reverse_diffusion_step(path: Path, x, score, t, s):
    """(mean, std) of the reverse-diffusion predictor (Song et al. 2021, eq. 46-47) for a Gaussian path:
    x_mean = (x + sigma_ts^2 score) / alpha_ts with alpha_ts = alpha_t/alpha_s, sigma_ts^2 = sigma_t^2 -
    alpha_ts^2 sigma_s^2; at s = 0 the mean is Tweedie's E[x0 | x_t]."""
    a_t, _, a_s, _, s2_ts = _transition(path, t, s)
    return (x + s2_ts * score) / (a_t / a_s), torch.sqrt(s2_ts)


PREDICTORS = {"euler_maruyama": _euler_maruyama_step, "reverse_diffusion": _reverse_diffusion_step}


@torch.no_grad()
def euler_maruyama(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *,
                   generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021, eq. 6);
    the last step returns the noise-free mean."""
    check_sampler("euler_maruyama", path)
    _record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        mean, std = _euler_maruyama_step(path, x, _score(denoiser, path, x, t), t, s)
        x = mean + std * _noise(x, generator) if s > 0 else mean
        _record(trajectory, x)
    return x


def _mean_norm(x: torch.Tensor) -> torch.Tensor:
    """The batch mean of per-sample norms, as in Song et al.'s code: a per-sample ratio ||z|| / ||score|| is
    heavy-tailed in low dimension (a sample near a mode has a tiny score) and would throw it far away."""
    return x.flatten(1).norm(dim=1).mean()


@torch.no_grad()
def pc(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *, predictor: str = "reverse_diffusion",
       snr: float = 0.16, n_corrector: int = 1, generator: torch.Generator | None = None,
       trajectory: list | None = None) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2/3, corrector first as in their code): at each t,
    n_corrector Langevin steps x += e score + sqrt(2 e) z with e = 2 (snr ||z|| / ||score||)^2 (norms averaged
    over the batch), then a predictor step to the next t; the last step returns the noise-free mean."""
    if predictor not in PREDICTORS:
        raise DiffcliError(f"sampler.fn.predictor={predictor} is unknown; choose one of {', '.join(PREDICTORS)}")
    check_sampler("pc", path)
    _record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        for _ in range(n_corrector):
            score, z = _score(denoiser, path, x, t), _noise(x, generator)
            e = 2 * (snr * _mean_norm(z) / _mean_norm(score)) ** 2
            x = x + e * score + torch.sqrt(2 * e) * z
        mean, std = PREDICTORS[predictor](path, x, _score(denoiser, path, x, t), t, s)
        x = mean + std * _noise(x, generator) if s > 0 else mean
        _record(trajectory, x)
    return x


@torch.no_grad()
def langevin(denoiser, path: Path, x: torch.Tensor, t_grid: torch.Tensor, *, n_steps: int = 100,
             step_size: float = 2e-5, denoise: bool = True, generator: torch.Generator | None = None,
             trajectory: list | None = None) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): at each level sigma_i, n_steps of
    x <- x + a_i score + sqrt(2 a_i) z with a_i = step_size sigma_i^2 / sigma_L^2; then optionally the
    denoising step x + sigma_L^2 score(x, sigma_L) (Jolicoeur-Martineau et al. 2021), which for
    alpha = 1 is Tweedie's E[x0 | x]. The trajectory gets x after each level and after denoising."""
    check_sampler("langevin", path)
    _record(trajectory, x)
    sigma_last = path.sigma(t_grid[-1])
    for t in t_grid:
        a_i = step_size * (path.sigma(t) / sigma_last) ** 2
        for _ in range(n_steps):
            x = x + a_i * _score(denoiser, path, x, t) + torch.sqrt(2 * a_i) * _noise(x, generator)
        _record(trajectory, x)
    if denoise:
        x = denoiser(x, t_grid[-1])
        _record(trajectory, x)
    return x


SAMPLERS = {"ancestral": ancestral, "ddim": ddim, "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m,
            "midpoint": midpoint, "rk4": rk4, "dopri5": dopri5, "euler_maruyama": euler_maruyama, "pc": pc,
            "langevin": langevin}
