"""Deterministic samplers: solvers of the probability-flow ODE (a flow's learned ODE), valid for any prior.

Diffusion solvers step in EDM's variables x~ = x/alpha against s = sigma/alpha, where the ODE reads
dx~/ds = (x~ - D)/s with D = x0_hat (Karras et al. 2022, eq. 4 with s(t) = 1), or in lambda = log(alpha/sigma)
= -log s (DPM-Solver, UniPC): the same steps as k-diffusion and diffusers, whatever the path. Only midpoint,
rk4 and dopri5 step a flow's velocity in t, as the flow-matching literature does.
"""

from __future__ import annotations

import math

import torch

from .. import DiffcliError
from ..paths import ProbabilityPath
from .core import alpha_sigma, check_sampler, draw_noise, edm_sigma, record, velocity_at
from .sde import dpmpp_2m_sde

# ---------------------------------------------------------------------------------------------
# EDM's Euler and Heun in x~ = x/alpha, s = sigma/alpha


def _edm_denoise(denoiser, path: ProbabilityPath, x_tilde: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """D(x~; s) = x0_hat(alpha(t) x~, t) at the t whose sigma/alpha is s."""
    return denoiser(path.alpha(t) * x_tilde, t)


def _churn(path: ProbabilityPath, x_tilde, s, gamma, eps):
    """EDM's churn (Karras et al. 2022, Alg. 2): s_hat = (1 + gamma) s, x~ += sqrt(s_hat^2 - s^2) eps;
    returns x~, s_hat and its time t_hat (beyond t = 1 on the first step: the paths extend there)."""
    s_hat = (1 + gamma) * s
    return x_tilde + torch.sqrt(s_hat**2 - s**2) * eps, s_hat, path.t_from_s(s_hat)


def _edm_steps(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, second_order: bool, s_churn: float,
               s_tmin: float, s_tmax: float, s_noise: float, generator, trajectory) -> torch.Tensor:
    """The loop of k-diffusion's sample_euler / sample_heun on the grid's s = sigma/alpha, in x~ = x/alpha."""
    record(trajectory, x)
    s_grid, n = edm_sigma(path, t_grid), len(t_grid) - 1
    gamma_max = min(s_churn / n, math.sqrt(2) - 1)
    first = 0
    if torch.isinf(s_grid[0]):  # a flow's alpha(1) = 0: x~ is infinite; the Euler step's limit is DDIM's
        if s_churn > 0:
            draw_noise(x, generator)  # one draw a step whatever happens, as k-diffusion does: churn cannot act here
        x0, x1 = denoiser.predict(x, t_grid[0])
        x_tilde, first = x0 + s_grid[1] * x1, 1
        record(trajectory, path.alpha(t_grid[1]) * x_tilde)
    else:
        x_tilde = x / path.alpha(t_grid[0])
    last = n - 1 if torch.isinf(s_grid[-1]) else n  # a grid up to a flow's t = 1 (inversion): see below
    for i in range(first, last):
        t, s, t_next, s_next = t_grid[i], s_grid[i], t_grid[i + 1], s_grid[i + 1]
        if s_churn > 0:
            eps = s_noise * draw_noise(x_tilde, generator)
            if s_tmin <= s <= s_tmax and gamma_max > 0:
                x_tilde, s, t = _churn(path, x_tilde, s, gamma_max, eps)
        d = (x_tilde - _edm_denoise(denoiser, path, x_tilde, t)) / s
        x_next = x_tilde + (s_next - s) * d  # Euler step
        if second_order and s_next > 0:  # Heun's correction, skipped on the step to s = 0 as in Alg. 2
            d_next = (x_next - _edm_denoise(denoiser, path, x_next, t_next)) / s_next
            x_next = x_tilde + (s_next - s) * (d + d_next) / 2
        x_tilde = x_next
        record(trajectory, path.alpha(t_next) * x_tilde)
    if last < n:  # the step to s = inf: alpha_next x~_next has the finite limit sigma_next x1_hat (DDIM's)
        x = path.sigma(t_grid[-1]) * denoiser.predict(path.alpha(t_grid[-2]) * x_tilde, t_grid[-2])[1]
        record(trajectory, x)
        return x
    return path.alpha(t_grid[-1]) * x_tilde


@torch.no_grad()
def euler(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, s_churn: float = 0.0,
          s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
          generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Euler steps of dx~/ds = (x~ - D)/s in EDM's variables x~ = x/alpha, s = sigma/alpha (Karras et al. 2022,
    Alg. 2 without its correction; k-diffusion's sample_euler), optional churn; any prior without churn.

    Without churn this is DDIM with eta = 0 (Song et al. 2021a, eq. 13): x_s = alpha_s x0_hat + sigma_s x1_hat.
    The step to t = 0 (s = 0) returns x0_hat; from s = inf (a flow's t = 1) the step is its finite limit
    x~ = x0_hat + s_next x1_hat, and a step up to s = inf (inversion) is x = sigma_next x1_hat.
    """
    check_sampler("euler", path, s_churn=s_churn)
    return _edm_steps(denoiser, path, x, t_grid, second_order=False, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                      s_noise=s_noise, generator=generator, trajectory=trajectory)


@torch.no_grad()
def heun(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, s_churn: float = 0.0,
         s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
         generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """EDM's Heun sampler (Karras et al. 2022, Alg. 2; k-diffusion's sample_heun) in x~ = x/alpha, s = sigma/alpha:
    churn s_hat = (1 + gamma) s on every step where s_tmin <= s <= s_tmax (the first one too), an Euler step and
    the trapezoidal correction, which the step to s = 0 skips (it returns x0_hat).

    From s = inf (a flow's t = 1, alpha = 0) the trapezoid has no finite limit: that first step is Euler's limit
    x~ = x0_hat + s_next x1_hat (DDIM), one evaluation instead of two; so is a last step up to s = inf (inversion,
    editing.ode_encode), x = sigma_next x1_hat. Churn needs a Gaussian prior.
    """
    check_sampler("heun", path, s_churn=s_churn)
    return _edm_steps(denoiser, path, x, t_grid, second_order=True, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                      s_noise=s_noise, generator=generator, trajectory=trajectory)


# ---------------------------------------------------------------------------------------------
# Multistep exponential integrators in lambda = log(alpha/sigma)


def dpmpp_2m(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *,
             generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): x_s = (sigma_s/sigma_t) x - alpha_s (e^-h - 1) D with
    h = lambda_s - lambda_t, D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev, r = h_prev/h (first order on the first step);
    the step to t = 0 returns x0_hat. It is dpmpp_2m_sde at eta = 0 (midpoint form), term for term."""
    check_sampler("dpmpp_2m", path)
    return dpmpp_2m_sde(denoiser, path, x, t_grid, eta=0.0, solver_type="midpoint", generator=generator,
                        trajectory=trajectory)


def _unipc_update(x, x0s, lams, lam_t, alpha_t, sigma_t, sigma_s, order: int, x0_t=None):
    """One UniP-p step (x0_t None) or UniC-p correction (x0_t: the evaluation at the new point) of UniPC
    (Zhao et al. 2023, B(h) = e^h - 1, data prediction), from s = lams[-1] with x0s[-1] to t; x0s, lams hold
    the last `order` evaluations, oldest first. Transcribes diffusers' multistep_uni_p_bh_update / _c_bh_update."""
    lam_s, m0 = lams[-1], x0s[-1]
    h = lam_t - lam_s
    rks = [(lams[-(k + 1)] - lam_s) / h for k in range(1, order)]
    D1s = [(x0s[-(k + 1)] - m0) / r for k, r in zip(range(1, order), rks)]
    rks = torch.stack([*rks, torch.ones_like(h)])
    hh = -h  # data prediction
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    B_h = torch.expm1(hh)  # the 'bh2' choice of B(h)
    h_phi_k, factorial, R, b = h_phi_1 / hh - 1, 1, [], []
    for k in range(1, order + 1):  # R_p rho = b_p / B(h): UniPC's order conditions
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    x_t = (sigma_t / sigma_s) * x - alpha_t * h_phi_1 * m0
    if x0_t is None:  # UniP: the order-p predictor from the p - 1 earlier differences
        if order == 1:
            return x_t
        rhos = torch.tensor([0.5], dtype=h.dtype) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
        return x_t - alpha_t * B_h * sum(rho * D1 for rho, D1 in zip(rhos, D1s))
    rhos = torch.tensor([0.5], dtype=h.dtype) if order == 1 else torch.linalg.solve(R, b)  # UniC
    return x_t - alpha_t * B_h * (sum(rho * D1 for rho, D1 in zip(rhos[:-1], D1s)) + rhos[-1] * (x0_t - m0))


@torch.no_grad()
def unipc(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, order: int = 2,
          generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, UniPC-p with B(h) = e^h - 1, data prediction), as diffusers'
    UniPCMultistepScheduler: each evaluation x0_hat(x_i) first corrects x_i (UniC, no extra evaluation), then
    drives the order-p multistep predictor (UniP) to the next time; the order warms up from 1 and drops on the
    last steps (lower_order_final), so the step to t = 0 returns x0_hat.

    A step from lambda = -inf (a flow's t = 1) is DDIM's limit step and starts the history afresh after it.
    """
    if order not in (1, 2, 3):
        raise DiffcliError(f"sampler.fn.order={order} must be 1, 2 or 3")
    check_sampler("unipc", path)
    alpha, sigma, lam = alpha_sigma(path, t_grid)
    record(trajectory, x)
    n = len(t_grid) - 1
    x0s, lams, x_prev, p_prev = [], [], None, 0
    for i in range(n):
        x0 = denoiser(x, t_grid[i])
        if x_prev is not None:  # UniC on the point the last predictor reached
            x = _unipc_update(x_prev, x0s, lams, lam[i], alpha[i], sigma[i], sigma[i - 1], p_prev, x0_t=x0)
        if torch.isfinite(lam[i]):
            x0s, lams = [*x0s, x0][-order:], [*lams, lam[i]][-order:]
            p = min(order, n - i, len(x0s))
            x_prev, p_prev = x, p
            x = _unipc_update(x, x0s, lams, lam[i + 1], alpha[i + 1], sigma[i + 1], sigma[i], p)
        else:  # alpha = 0: x~ is infinite; DDIM's step x_s = alpha_s x0_hat + sigma_s x1_hat, x1_hat = x / sigma
            x = alpha[i + 1] * x0 + (sigma[i + 1] / sigma[i]) * x
        record(trajectory, x)
    return x


# ---------------------------------------------------------------------------------------------
# Runge-Kutta on a flow's velocity dx/dt = v(x, t)


def _midpoint_step(v, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One explicit midpoint step (2nd-order Runge-Kutta) of dx/dt = v(x, t) from t to s."""
    h = s - t
    return x + h * v(x + h / 2 * v(x, t), t + h / 2)


def _rk4_step(v, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """One classic 4th-order Runge-Kutta step of dx/dt = v(x, t) from t to s."""
    h = s - t
    k1 = v(x, t)
    k2 = v(x + h / 2 * k1, t + h / 2)
    k3 = v(x + h / 2 * k2, t + h / 2)
    k4 = v(x + h * k3, s)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _runge_kutta(step, name: str, denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor,
                 trajectory: list | None) -> torch.Tensor:
    """`step` between consecutive grid times on a flow's velocity (velocity_at)."""
    check_sampler(name, path)
    v = lambda x, t: velocity_at(denoiser, path, x, t)  # noqa: E731
    record(trajectory, x)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x = step(v, x, t, s)
        record(trajectory, x)
    return x


@torch.no_grad()
def midpoint(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *,
             generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Explicit midpoint rule (2nd-order Runge-Kutta) on a flow's velocity dx/dt = v(x, t) (Lipman et al. 2023)."""
    return _runge_kutta(_midpoint_step, "midpoint", denoiser, path, x, t_grid, trajectory)


@torch.no_grad()
def rk4(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *,
        generator: torch.Generator | None = None, trajectory: list | None = None) -> torch.Tensor:
    """Classic 4th-order Runge-Kutta on a flow's velocity dx/dt = v(x, t) (Lipman et al. 2023)."""
    return _runge_kutta(_rk4_step, "rk4", denoiser, path, x, t_grid, trajectory)


@torch.no_grad()
def dopri5(denoiser, path: ProbabilityPath, x: torch.Tensor, t_grid: torch.Tensor, *, rtol: float = 1e-5,
           atol: float = 1e-5, generator: torch.Generator | None = None,
           trajectory: list | None = None) -> torch.Tensor:
    """Adaptive Dormand-Prince RK5(4) (Dormand & Prince 1980) on dx/dt = v(x, t) via torchdiffeq's odeint.

    Integrates to the grid's last positive time, then (if the grid ends at 0) the denoising step returns x0_hat
    there; up an increasing grid it inverts. The grid's points only say where x is reported (trajectory), not the
    step sizes.
    """
    from torchdiffeq import odeint

    check_sampler("dopri5", path)
    times = t_grid[t_grid > 0]  # even a flow stops short of 0: a uniform prior's field sharpens there
    # odeint casts t to x's dtype (the path gets float64 back); step_t stops it stepping past the end,
    # and an explicit first step skips torchdiffeq's step-size probe, which can evaluate far outside
    # [0, 1] (seen: t = -23), where a diffusion's sigma is undefined
    first_step = abs(float(times[0] - times[-1])) / 100
    xs = odeint(lambda t, x: velocity_at(denoiser, path, x, t.double()), x, times.to(x.device),
                rtol=rtol, atol=atol, method="dopri5", options={"step_t": times[-1:], "first_step": first_step})
    for x in xs:
        record(trajectory, x)
    if t_grid[-1] > 0:  # a grid that ends short of 0 (or goes up it: inversion) ends where it ends
        return x
    x = denoiser(x, times[-1])  # the denoising step: E[x0 | x_t] at the last time
    record(trajectory, x)
    return x
