"""Stochastic samplers: Gaussian posteriors (ancestral, DDIM), DPM-Solver++ SDE solvers in lambda = log(alpha/sigma),
the reverse-time SDE (Euler-Maruyama, score_sde's predictor-corrector), annealed Langevin dynamics and multistep
consistency sampling."""

from __future__ import annotations

import math

import torch

from .. import DiffcliError
from ..paths import NCSNPath, ProbabilityPath, VEPath, VPPath
from .core import alpha_sigma, check_sampler, draw_noise, edm_sigma, record, score_at, transition, x0_clipper

# ---------------------------------------------------------------------------------------------
# Gaussian posteriors


@torch.no_grad()
def ancestral(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *,
              generator: torch.Generator | None = None, clip_x0: bool | str = False, clip_sample_range: float = 1.0,
              dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
              trajectory: list | None = None) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2 / eq. 7); x0_hat clipped
    as `clip_x0` says (core.x0_clipper)."""
    check_sampler("ancestral", path)
    clip = x0_clipper(clip_x0, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0 = clip(denoiser(x, t))
        a_t, s_t, a_s, s_s, s2_ts = transition(path, t, s)
        mean = (a_s * s2_ts / s_t**2) * x0 + ((a_t / a_s) * s_s**2 / s_t**2) * x
        x = mean + torch.sqrt(s2_ts * s_s**2 / s_t**2) * draw_noise(x, generator) if s > 0 else mean
        record(trajectory, x)
    return x


@torch.no_grad()
def ddim(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, clip_x0: bool | str = False, clip_sample_range: float = 1.0,
         dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
         use_clipped_model_output: bool | str = "auto", trajectory: list | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021a, eq. 12): eta = 0 is deterministic, eta = 1 is ancestral sampling; x0_hat clipped
    as `clip_x0` says (core.x0_clipper), and the step's eps the one of the clipped x0_hat (`auto`, true) or the
    network's own (false: diffusers' DDIMScheduler.step default)."""
    if eta < 0:
        raise DiffcliError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
    check_sampler("ddim", path, eta=eta)  # eta = 0 is a valid ODE step for any prior
    clip = x0_clipper(clip_x0, clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
    record(trajectory, x)
    own_eps = use_clipped_model_output is False
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x0, x1 = denoiser.predict(x, t) if own_eps else (denoiser(x, t), None)
        x0 = clip(x0)
        a_t, s_t, a_s, s_s, s2_ts = transition(path, t, s)
        eps = x1 if own_eps else (x - a_t * x0) / s_t  # consistent with the (possibly clipped) x0
        # eq. 16's sigma_t; none at eta = 0, also up a reversed grid (inversion), where s2_ts < 0
        c = eta * torch.sqrt(s2_ts * s_s**2 / s_t**2) if eta > 0 else torch.zeros_like(s_t)
        x = a_s * x0 + torch.sqrt((s_s**2 - c**2).clamp(min=0)) * eps
        if c > 0:
            x = x + c * draw_noise(x, generator)
        record(trajectory, x)
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver++ SDE solvers in lambda = log(alpha/sigma) (k-diffusion's sample_dpmpp_2m_sde / _3m_sde)


def _check_eta(eta: float) -> None:
    if eta < 0:
        raise DiffcliError(f"sampler.fn.eta={eta} must be >= 0 (0: the probability-flow ODE, 1: the reverse SDE)")


def _sde_step(x, x0, alpha_s, sigma_s, sigma_t, h, eta):
    """The first-order DPM-Solver++ SDE step, eta scaling the noise (k-diffusion's form): x_s =
    (sigma_s/sigma_t) e^{-eta h} x + alpha_s (1 - e^{-(1+eta) h}) x0_hat; returns it with (1+eta) h."""
    eta_h = eta * h if eta > 0 else torch.zeros_like(h)  # h = inf from a flow's t = 1: 0 inf would be nan
    return (sigma_s / sigma_t) * torch.exp(-eta_h) * x - alpha_s * torch.expm1(-h - eta_h) * x0, h + eta_h


def _sde_noise(x, sigma_s, h, eta, s_noise, generator):
    """The step's noise sigma_s sqrt(1 - e^{-2 eta h}) s_noise z (none at eta = 0)."""
    if eta == 0:
        return 0
    return sigma_s * torch.sqrt(-torch.expm1(-2 * eta * h)) * s_noise * draw_noise(x, generator)


def _midpoint_term(x0, history, h, g):
    """(1 - e^{-g})/2 (x0_hat - x0_prev) h/h_prev: the second-order term in its midpoint form (k-diffusion's
    sample_dpmpp_2m_sde, solver_type=midpoint; at eta = 0 DPM-Solver++(2M), Lu et al. 2022, Alg. 2)."""
    x0_1, h_1 = history[0]
    return -torch.expm1(-g) / 2 * (h / h_1) * (x0 - x0_1)


def _phi_terms(x0, history, h, g):
    """phi_2 d1 - phi_3 d2 from the divided differences of up to two earlier evaluations, phi_2 = (e^{-g} - 1)/g + 1,
    phi_3 = phi_2/g - 1/2 (k-diffusion's sample_dpmpp_3m_sde); with one, phi_2 (x0_hat - x0_prev) h/h_prev, which
    is also sample_dpmpp_2m_sde's solver_type=heun."""
    phi_2 = torch.expm1(-g) / g + 1
    if len(history) == 1:
        x0_1, h_1 = history[0]
        return phi_2 * (x0 - x0_1) / (h_1 / h)
    (x0_1, h_1), (x0_2, h_2) = history
    r0, r1 = h_1 / h, h_2 / h
    d1_0, d1_1 = (x0 - x0_1) / r0, (x0_1 - x0_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return phi_2 * d1 - (phi_2 / g - 0.5) * d2


SOLVER_TYPES = {"midpoint": _midpoint_term, "heun": _phi_terms}


def _dpmpp_sde(denoiser, path: ProbabilityPath, x, t_grid, *, eta, s_noise, generator, trajectory, multistep_term, memory):
    """The multistep DPM-Solver++ SDE loop in lambda = log(alpha/sigma): each step the first-order step, plus
    alpha_s multistep_term(x0_hat, history, h, (1+eta) h) from the last `memory` evaluations, plus the noise; the
    step to t = 0 returns x0_hat. A step from lambda = -inf (a flow's t = 1) leaves no slope to carry over."""
    alpha, sigma, lam = alpha_sigma(path, t_grid)
    record(trajectory, x)
    history = []  # (x0_hat, h) of the previous steps, newest first
    for i in range(len(t_grid) - 1):
        x0 = denoiser(x, t_grid[i])
        h = lam[i + 1] - lam[i]
        if sigma[i + 1] == 0:  # the denoising step
            x = x0
        else:
            x, g = _sde_step(x, x0, alpha[i + 1], sigma[i + 1], sigma[i], h, eta)
            if history:
                x = x + alpha[i + 1] * multistep_term(x0, history, h, g)
            x = x + _sde_noise(x, sigma[i + 1], h, eta, s_noise, generator)
        history = [(x0, h), *history][:memory] if torch.isfinite(lam[i]) else []
        record(trajectory, x)
    return x


@torch.no_grad()
def dpmpp_2m_sde(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, eta: float = 1.0,
                 s_noise: float = 1.0, solver_type: str = "midpoint", generator: torch.Generator | None = None,
                 trajectory: list | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022's SDE variant; k-diffusion's sample_dpmpp_2m_sde) in lambda =
    log(alpha/sigma), h = lambda_s - lambda_t: x_s = (sigma_s/sigma_t) e^{-eta h} x + alpha_s (1 - e^{-(1+eta) h})
    x0_hat + alpha_s c (x0_hat - x0_prev) h/h_prev + sigma_s sqrt(1 - e^{-2 eta h}) z, with c = (1 - e^{-(1+eta) h})/2
    (midpoint) or 1 - (1 - e^{-(1+eta) h})/((1+eta) h) (heun). eta = 0: DPM-Solver++(2M); the step to t = 0
    returns x0_hat."""
    if solver_type not in SOLVER_TYPES:
        raise DiffcliError(f"sampler.fn.solver_type={solver_type} is unknown; choose one of {', '.join(SOLVER_TYPES)}")
    _check_eta(eta)
    check_sampler("dpmpp_2m_sde", path, eta=eta)
    return _dpmpp_sde(denoiser, path, x, t_grid, eta=eta, s_noise=s_noise, generator=generator, trajectory=trajectory,
                      multistep_term=SOLVER_TYPES[solver_type], memory=1)


@torch.no_grad()
def dpmpp_3m_sde(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, eta: float = 1.0,
                 s_noise: float = 1.0, generator: torch.Generator | None = None,
                 trajectory: list | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde; Lu et al. 2022's multistep scheme at third order)
    in lambda = log(alpha/sigma): the first-order step of dpmpp_2m_sde plus alpha_s (phi_2 d1 - phi_3 d2) from the
    two previous evaluations' divided differences (second order on the second step, first on the first); the step
    to t = 0 returns x0_hat."""
    _check_eta(eta)
    check_sampler("dpmpp_3m_sde", path, eta=eta)
    return _dpmpp_sde(denoiser, path, x, t_grid, eta=eta, s_noise=s_noise, generator=generator, trajectory=trajectory,
                      multistep_term=_phi_terms, memory=2)


# ---------------------------------------------------------------------------------------------
# The reverse-time SDE and score_sde's predictor-corrector sampler (Gaussian prior)


def _euler_maruyama_step(path: ProbabilityPath, x, score, t, s):
    """(mean, std) of an Euler-Maruyama step of the reverse SDE dx = [f x - g^2 score] dt + g dw (Song et al.
    2021, eq. 6) from t to s < t."""
    dt = s - t  # dt < 0: integrating from t = 1 down to 0
    return x + (path.f(t) * x - path.g2(t) * score) * dt, torch.sqrt(-path.g2(t) * dt)


def _vp_betas(path: VPPath, n: int) -> torch.Tensor:
    """score_sde's VPSDE.discrete_betas: linspace(beta_min/N, beta_max/N, N)."""
    return torch.linspace(path.beta_min / n, path.beta_max / n, n, dtype=torch.float64)


def _ddpm_discretization(path: VPPath, x, score, t, n: int):
    """VP: DDPM's discretization (Song et al. 2021, eq. 47; score_sde's VPSDE.discretize): beta_k =
    linspace(beta_min/N, beta_max/N, N)[k] at k = floor(t (N - 1)); mean (2 - sqrt(1 - beta_k)) x + beta_k score."""
    beta = _vp_betas(path, n)[int(t * (n - 1))]
    return x - (torch.sqrt(1 - beta) - 1) * x + beta * score, torch.sqrt(beta)


def _smld_discretization(path: VEPath, x, score, t, n: int):
    """VE: SMLD's discretization (score_sde's VESDE.discretize): N levels sigma_k geometric from sigma_min to
    sigma_max, k = floor(t (N - 1)); mean x + (sigma_k^2 - sigma_{k-1}^2) score (sigma_{-1} = 0)."""
    sigmas = torch.exp(torch.linspace(torch.log(torch.tensor(path.sigma_min, dtype=torch.float64)),
                                      torch.log(torch.tensor(path.sigma_max, dtype=torch.float64)), n,
                                      dtype=torch.float64))
    k = int(t * (n - 1))
    G2 = sigmas[k] ** 2 - (sigmas[k - 1] ** 2 if k > 0 else 0)
    return x + G2 * score, torch.sqrt(G2)


# path class -> its reverse-diffusion discretization, as score_sde's SDE classes override discretize; any other
# path (sub-VP, DDPM, ...) gets score_sde's default SDE.discretize, Euler-Maruyama with dt = 1/N
REVERSE_DIFFUSION = {VPPath: _ddpm_discretization, VEPath: _smld_discretization, NCSNPath: _smld_discretization}


def _reverse_diffusion_step(path: ProbabilityPath, x, score, t, s, n: int):
    """(mean, std) of score_sde's ReverseDiffusionPredictor (Song et al. 2021, eq. 46): x_mean = x - f + G^2 score,
    x = x_mean + G z, with f, G from the path's discretization in score_sde (REVERSE_DIFFUSION)."""
    discretize = REVERSE_DIFFUSION.get(type(path))
    if discretize is None:
        return _euler_maruyama_step(path, x, score, t, t - 1 / n)
    return discretize(path, x, score, t, n)


def _gaussian_transition_step(path: ProbabilityPath, x, score, t, s, n: int):
    """(mean, std) of the reverse-diffusion step with the path's exact transition from s to t: x_mean = (x +
    sigma_ts^2 score) / alpha_ts, alpha_ts = alpha_t/alpha_s, sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2 (eq. 46
    with f, G of the Gaussian path itself); any grid and path, and at s = 0 the mean is Tweedie's E[x0 | x_t]."""
    a_t, _, a_s, _, s2_ts = transition(path, t, s)
    return (x + s2_ts * score) / (a_t / a_s), torch.sqrt(s2_ts)


# predictor -> (path, x, score, t, s, N) -> (mean, std)
PREDICTORS = {"reverse_diffusion": _reverse_diffusion_step,
              "euler_maruyama": lambda path, x, score, t, s, n: _euler_maruyama_step(path, x, score, t, t - 1 / n),
              "gaussian_transition": _gaussian_transition_step}


def _langevin_alpha(path: ProbabilityPath, t, n: int):
    """The corrector's alpha in score_sde's LangevinCorrector: 1 - beta_k of the VP table on VP and sub-VP (score_sde
    reads sde.alphas, which its own subVPSDE lacks, score_sde_pytorch issue #8: we take the VP table it meant), 1
    on every other path."""
    return 1 - _vp_betas(path, n)[int(t * (n - 1))] if isinstance(path, VPPath) else 1.0


def _mean_norm(x: torch.Tensor) -> torch.Tensor:
    """The batch mean of per-sample norms, as in Song et al.'s code: a per-sample ratio ||z|| / ||score|| is
    heavy-tailed in low dimension (a sample near a mode has a tiny score) and would throw it far away."""
    return x.flatten(1).norm(dim=1).mean()


@torch.no_grad()
def euler_maruyama(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *,
                   generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse-time SDE dx = [f x - g^2 score] dt + g dw (Song et al. 2021, eq. 6) with the
    grid's steps; the last step returns the noise-free mean."""
    check_sampler("euler_maruyama", path)
    record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        mean, std = _euler_maruyama_step(path, x, score_at(denoiser, path, x, t), t, s)
        x = mean + std * draw_noise(x, generator) if s > 0 else mean
        record(trajectory, x)
    return x


@torch.no_grad()
def pc(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, predictor: str = "reverse_diffusion",
       snr: float = 0.16, n_corrector: int = 1, generator: torch.Generator | None = None,
       trajectory: list | None = None) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2/3) as score_sde's pc_sampler: at each of the N grid
    times t_i, n_corrector Langevin steps x += e score + sqrt(2 e) z with e = 2 alpha (snr ||z|| / ||score||)^2
    (norms per sample, averaged over the batch), then a predictor step; the last step returns the noise-free mean.

    Predictors: reverse_diffusion and euler_maruyama (dt = 1/N) are score_sde's, with its discretizations
    (REVERSE_DIFFUSION), written for its grid linspace(1, t_min, N) (then 0); gaussian_transition steps the path's
    exact Gaussian transition between the grid's own points, so it suits any grid (and DDPM models).
    """
    if predictor not in PREDICTORS:
        raise DiffcliError(f"sampler.fn.predictor={predictor} is unknown; choose one of {', '.join(PREDICTORS)}")
    check_sampler("pc", path)
    n = len(t_grid) - 1
    if isinstance(path, VPPath) and path.beta_max / n > 1:  # score_sde's beta_k = beta(k/(N-1))/N reaches beta_max/N
        raise DiffcliError(f"sampler=pc takes score_sde's discrete betas beta(t)/N on this model, which exceed 1 (nan) "
                           f"with steps={n} < beta_max={path.beta_max:g}; use steps>={math.ceil(path.beta_max)}")
    record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        alpha = _langevin_alpha(path, t, n)
        for _ in range(n_corrector):
            score, z = score_at(denoiser, path, x, t), draw_noise(x, generator)
            e = 2 * alpha * (snr * _mean_norm(z) / _mean_norm(score)) ** 2
            x = x + e * score + torch.sqrt(2 * e) * z
        mean, std = PREDICTORS[predictor](path, x, score_at(denoiser, path, x, t), t, s, n)
        x = mean + std * draw_noise(x, generator) if s > 0 else mean
        record(trajectory, x)
    return x


@torch.no_grad()
def langevin(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, n_steps: int = 100,
             step_size: float = 2e-5, denoise: bool = True, generator: torch.Generator | None = None,
             trajectory: list | None = None) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1): at each level sigma_i, n_steps of
    x <- x + a_i score + sqrt(2 a_i) z with a_i = step_size sigma_i^2 / sigma_L^2; then optionally the
    denoising step x + sigma_L^2 score(x, sigma_L) (Jolicoeur-Martineau et al. 2021), which for
    alpha = 1 is Tweedie's E[x0 | x]. The trajectory gets x after each level and after denoising."""
    check_sampler("langevin", path)
    record(trajectory, x)
    sigma_last = path.sigma(t_grid[-1])
    for t in t_grid:
        a_i = step_size * (path.sigma(t) / sigma_last) ** 2
        for _ in range(n_steps):
            x = x + a_i * score_at(denoiser, path, x, t) + torch.sqrt(2 * a_i) * draw_noise(x, generator)
        record(trajectory, x)
    if denoise:
        x = denoiser(x, t_grid[-1])
        record(trajectory, x)
    return x


@torch.no_grad()
def consistency(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *,
                generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; openai/consistency_models cm/karras_diffusion.py:657,
    stochastic_iterative_sampler): x0 = f(x, t_n), then x = alpha(t_{n+1}) (x0 + sqrt(s_{n+1}^2 - s_min^2) z) at
    s = sigma/alpha with s_min the denoiser's sigma_min (0 if it has none, the noise clamped at 0 below s_min); a
    step to t = 0 returns x0, so the grid's last point only ends the loop and NFE = steps."""
    check_sampler("consistency", path)
    s_grid, s_min = edm_sigma(path, t_grid), getattr(denoiser, "sigma_min", 0.0)
    record(trajectory, x)
    for t, t_next, s_next in zip(t_grid[:-1], t_grid[1:], s_grid[1:]):
        x = x0 = denoiser(x, t)
        if t_next > 0:
            x = path.alpha(t_next) * (x0 + torch.sqrt((s_next**2 - s_min**2).clamp(min=0)) * draw_noise(x0, generator))
        record(trajectory, x)
    return x
