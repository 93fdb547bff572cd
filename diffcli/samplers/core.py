"""What every sampler shares: what each needs of the model (NEEDS, check_sampler, the one source of the docs'
validity table) and the small pieces they are written with (noise, trajectory, predictions, a path's
coefficients on a grid, EDM's variables)."""

from __future__ import annotations

import torch

from .. import DiffcliError
from ..paths import FlowPath, ProbabilityPath

# ---------------------------------------------------------------------------------------------
# What each sampler needs of the model: the single source of truth (docs/guides/sampling.md's table is generated from it)

# requirement -> (does it hold for this path and these sampler options?, the one-line refusal)
REQUIREMENTS = {
    "gaussian prior": (
        lambda path, **options: path.gaussian_prior,
        "sampler={name} needs a Gaussian prior (it uses the score or Gaussian posteriors); this model's prior "
        "is {prior}: use sampler=euler, heun, dpmpp_2m, unipc or dopri5"),
    "gaussian prior if eta > 0": (
        lambda path, eta=0.0, **options: eta == 0 or path.gaussian_prior,
        "sampler={name} with eta={eta} needs a Gaussian prior (its noise stands in for x1); this model's prior "
        "is {prior}: use eta=0 or sampler=euler"),
    "gaussian prior if s_churn > 0": (
        lambda path, s_churn=0.0, **options: s_churn == 0 or path.gaussian_prior,
        "sampler={name} with s_churn={s_churn} needs a Gaussian prior (churn adds Gaussian noise); this model's "
        "prior is {prior}: use s_churn=0"),
    "alpha(1) > 0": (
        lambda path, **options: bool(path.alpha(torch.tensor(1.0, dtype=torch.float64)) > 0),
        "sampler={name} steps the reverse SDE, whose drift alpha'/alpha is infinite at t = 1 on this model "
        "(alpha(1) = 0, a flow); use sampler=ancestral, heun, dpmpp_2m_sde or dpmpp_2m"),
    "flow path": (
        lambda path, **options: isinstance(path, FlowPath),
        "sampler={name} integrates a flow's velocity up to t = 0; for diffusion models use heun, dpmpp_2m "
        "or dopri5"),
}

NEEDS = {
    "ancestral": ("gaussian prior",),
    "ddim": ("gaussian prior if eta > 0",),
    "euler": ("gaussian prior if s_churn > 0",),
    "heun": ("gaussian prior if s_churn > 0",),
    "dpmpp_2m": (),
    "dpmpp_2m_sde": ("gaussian prior if eta > 0",),
    "dpmpp_3m_sde": ("gaussian prior if eta > 0",),
    "unipc": (),
    "midpoint": ("flow path",),
    "rk4": ("flow path",),
    "dopri5": (),
    "euler_maruyama": ("gaussian prior", "alpha(1) > 0"),
    "pc": ("gaussian prior", "alpha(1) > 0"),
    "langevin": ("gaussian prior",),
    "consistency": ("gaussian prior",),
}


# the ODE samplers (what inversion can run backwards), each with the option that, when > 0, makes it draw noise
DETERMINISTIC = {"ddim": "eta", "euler": "s_churn", "heun": "s_churn", "dpmpp_2m": None, "unipc": None,
                 "midpoint": None, "rk4": None, "dopri5": None}


def is_deterministic(name: str, **options) -> bool:
    """Whether sampler `name` with these options is an ODE solver (no noise drawn)."""
    return name in DETERMINISTIC and not options.get(DETERMINISTIC[name] or "", 0)


def check_sampler(name: str, path: ProbabilityPath, **options) -> None:
    """Raise a one-line DiffcliError unless sampler `name` (with these options) is valid for `path`."""
    if name not in NEEDS:
        raise DiffcliError(f"sampler={name} is unknown; choose one of {', '.join(NEEDS)}")
    for need in NEEDS[name]:
        holds, refusal = REQUIREMENTS[need]
        if not holds(path, **options):
            raise DiffcliError(refusal.format(name=name, prior=path.prior, **options))


# ---------------------------------------------------------------------------------------------
# Shared pieces


def draw_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, from the sampler's generator."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def record(trajectory: list | None, x: torch.Tensor) -> None:
    """Append a copy of x to the trajectory list, if one was given."""
    if trajectory is not None:
        trajectory.append(x.detach().cpu().clone())


CLIPS = {False: "none", True: "static", "none": "none", "static": "static", "dynamic": "dynamic"}


def check_clip(clip_x0) -> str:
    """The x0_hat clipping of a sampler (sampler.fn.clip_x0): none, static or dynamic (true / false: static / none)."""
    if isinstance(clip_x0, str) and clip_x0 in CLIPS or isinstance(clip_x0, bool):
        return CLIPS[clip_x0]
    raise DiffcliError(f"sampler.fn.clip_x0={clip_x0} is unknown; choose auto, none, static or dynamic")


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = the `ratio` quantile of
    |x0_hat| clamped to [1, max_value]; x0_hat clipped to [-s, s] and divided by s."""
    flat = x0.reshape(x0.shape[0], -1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs a float type
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(1, max_value)[:, None]
    return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype).reshape(x0.shape)


def x0_clipper(clip_x0="none", clip_sample_range: float = 1.0, dynamic_thresholding_ratio: float = 0.995,
               sample_max_value: float = 1.0):
    """x0_hat -> x0_hat under a sampler's clipping, its settings checked once (one-line errors): `static` clamps to
    [-clip_sample_range, clip_sample_range] (1: where pixels live), `dynamic` is dynamic_threshold, `none` leaves
    it; names and defaults as diffusers' schedulers take them."""
    mode = check_clip(clip_x0)
    if not clip_sample_range > 0:
        raise DiffcliError(f"sampler.fn.clip_sample_range={clip_sample_range} must be a positive number")
    if not 0 < dynamic_thresholding_ratio <= 1:
        raise DiffcliError(f"sampler.fn.dynamic_thresholding_ratio={dynamic_thresholding_ratio} must lie in (0, 1]")
    if not sample_max_value >= 1:
        raise DiffcliError(f"sampler.fn.sample_max_value={sample_max_value} must be >= 1 (s is clamped to [1, it])")
    if mode == "static":
        return lambda x0: x0.clamp(-clip_sample_range, clip_sample_range)
    if mode == "dynamic":
        return lambda x0: dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    return lambda x0: x0


CLIP_OPTIONS = ("clip_x0", "clip_sample_range", "dynamic_thresholding_ratio", "sample_max_value")


def velocity_at(denoiser, path: ProbabilityPath, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v(x, t) = alpha'(t) x0_hat + sigma'(t) x1_hat: the probability-flow ODE / a flow's marginal velocity."""
    x0, x1 = denoiser.predict(x, t)
    return path.d_alpha(t) * x0 + path.d_sigma(t) * x1


def score_at(denoiser, path: ProbabilityPath, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """score = -x1_hat / sigma (Gaussian prior)."""
    return -denoiser.predict(x, t)[1] / path.sigma(t)


def transition(path: ProbabilityPath, t: torch.Tensor, s: torch.Tensor):
    """alpha_t, sigma_t, alpha_s, sigma_s and sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2, with
    sigma_s = 0 at s = 0 (clean data, see alpha_sigma): a step to t = 0 lands on x0_hat for every path."""
    a_t, s_t, a_s, s_s = path.alpha(t), path.sigma(t), path.alpha(s), torch.where(s > 0, path.sigma(s), 0)
    return a_t, s_t, a_s, s_s, s_t**2 - (a_t / a_s) ** 2 * s_s**2


def alpha_sigma(path: ProbabilityPath, t_grid: torch.Tensor):
    """alpha, sigma and lambda = log(alpha/sigma) at the grid's times, with t = 0 clean data for every path:
    sigma = 0 and lambda = inf there (a VE path's sigma(0) = sigma_min is only its smallest trained level)."""
    alpha, sigma = path.alpha(t_grid), torch.where(t_grid > 0, path.sigma(t_grid), 0)
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def edm_sigma(path: ProbabilityPath, t_grid: torch.Tensor) -> torch.Tensor:
    """EDM's noise level s = sigma/alpha at the grid's times (x~ = x/alpha has x~ = x0 + s x1): 0 at t = 0 for
    every path, inf where alpha = 0 (a flow's t = 1)."""
    alpha, sigma, _ = alpha_sigma(path, t_grid)
    return sigma / alpha
