"""Consistency distillation's maths (Song et al. 2023, "Consistency Models", sec. 4 and Alg. 2): the teacher's step
of the probability-flow ODE, the discretization levels and the consistency loss, on any path.

A consistency model f(x_t, t) maps every point of a probability-flow trajectory to its end at the boundary level
s_min (prediction `consistency` in prediction.py); distillation makes f agree on neighbouring levels t_n < t_{n+1}
of one trajectory, the point at t_n found by one step of a teacher's ODE solver from x_{t_{n+1}}. Steps are taken in
EDM's variables x~ = x_t / alpha, s = sigma / alpha, where the ODE reads dx~/ds = (x~ - D(x, t)) / s (Karras et al.
2022, eq. 4 with s(t) = 1), as openai/consistency_models does in cm/karras_diffusion.py. Student, target and teacher
are Denoisers: callables (x_t, t, labels) -> x0_hat.
"""

from __future__ import annotations

import math

import torch

from . import DiffcliError
from .paths import ProbabilityPath, expand
from .samplers.grids import karras_levels

S_RANGE = (0.002, 80.0)  # Song et al. 2023's [eps, T] (EDM's sigma range), clipped to the path's own levels


def _slope(teacher, path: ProbabilityPath, x_t: torch.Tensor, t, labels):
    """(x~, s, d) at (x_t, t): EDM's x~ = x_t / alpha, s = sigma / alpha and the slope d = (x~ - D(x_t, t)) / s."""
    a, s = expand(path.alpha(t), x_t), expand(path.sigma(t) / path.alpha(t), x_t)
    x_tilde = x_t / a
    return x_tilde, s, (x_tilde - teacher(x_t, t, labels)) / s


def euler_step(teacher, path: ProbabilityPath, x_t: torch.Tensor, t, t_next, labels=None) -> torch.Tensor:
    """x~_next = x~ + (s_next - s) d (Karras et al. 2022, Alg. 1 without its correction; openai/consistency_models
    cm/karras_diffusion.py:163, euler_solver), returned as x_{t_next} = alpha(t_next) x~_next."""
    x_tilde, s, d = _slope(teacher, path, x_t, t, labels)
    a_next, s_next = expand(path.alpha(t_next), x_t), expand(path.sigma(t_next) / path.alpha(t_next), x_t)
    return a_next * (x_tilde + (s_next - s) * d)


def heun_step(teacher, path: ProbabilityPath, x_t: torch.Tensor, t, t_next, labels=None) -> torch.Tensor:
    """The Euler point x~', then x~ + (s_next - s) (d + d') / 2 with d' the slope at (x~', t_next) (Karras et al.
    2022, Alg. 1; openai/consistency_models cm/karras_diffusion.py:143, heun_solver)."""
    x_tilde, s, d = _slope(teacher, path, x_t, t, labels)
    a_next, s_next = expand(path.alpha(t_next), x_t), expand(path.sigma(t_next) / path.alpha(t_next), x_t)
    _, _, d_next = _slope(teacher, path, a_next * (x_tilde + (s_next - s) * d), t_next, labels)
    return a_next * (x_tilde + (s_next - s) * (d + d_next) / 2)


SOLVERS = {"euler": euler_step, "heun": heun_step}


def ode_step(teacher, path: ProbabilityPath, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
             solver: str = "heun", labels=None) -> torch.Tensor:
    """One step of the probability-flow ODE dx~/ds = (x~ - D)/s from t to t_next, per example ((B,) times), by
    `solver` (Song et al. 2023, eq. 6 and Alg. 2's Phi); the teacher is never differentiated."""
    if solver not in SOLVERS:
        raise DiffcliError(f"solver={solver} is unknown; choose one of {', '.join(SOLVERS)}")
    with torch.no_grad():
        return SOLVERS[solver](teacher, path, x_t, t, t_next, labels)


def _path_levels(path: ProbabilityPath) -> tuple[float, float]:
    """s = sigma/alpha at t = 0 and t = 1 (0 and inf where the path reaches them), in float64."""
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = path.sigma(t) / path.alpha(t)
    return float(s[0]), float(s[1])


def cd_times(path: ProbabilityPath, N: int, rho: float = 7.0, s_min: float | None = None,
             s_max: float | None = None) -> tuple[torch.Tensor, float]:
    """(t_1 < ... < t_N, s_min): the N Karras levels s_i = (s_min^(1/rho) + (i-1)/(N-1) (s_max^(1/rho) -
    s_min^(1/rho)))^rho (Karras et al. 2022, eq. 5, as Song et al. 2023 discretize [eps, T]) as path times
    (path.t_from_s). Unset, s_min and s_max are Song et al.'s 0.002 and 80 clipped to the path's s(0) and s(1)."""
    s_lo, s_hi = _path_levels(path)
    s_min = max(S_RANGE[0], s_lo) if s_min is None else float(s_min)
    s_max = min(S_RANGE[1], s_hi) if s_max is None else float(s_max)
    if int(N) != N or N < 2:
        raise DiffcliError(f"N={N} must be an integer >= 2 (the number of discretization levels)")
    if not (0 < s_min < s_max and math.isfinite(s_max)):
        raise DiffcliError(f"need 0 < s_min < s_max < inf for consistency distillation, got s_min={s_min}, "
                           f"s_max={s_max}")
    return path.t_from_s(karras_levels(s_min, s_max, int(N), rho)), s_min


def pseudo_huber(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sqrt(||x - y||^2 + c^2) - c per example with c = 0.00054 sqrt(d) (Song & Dhariwal 2023, sec. 3.3)."""
    c = 0.00054 * math.sqrt(x[0].numel())
    return torch.sqrt((x - y).flatten(1).pow(2).sum(1) + c**2) - c


def squared(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean of (x - y)^2 per example (openai/consistency_models' loss_norm l2, mean_flat)."""
    return (x - y).flatten(1).pow(2).mean(1)


DISTANCES = {"l2": squared, "pseudo_huber": pseudo_huber}


def consistency_loss(student, target, teacher, path: ProbabilityPath, x0: torch.Tensor, z: torch.Tensor,
                     n: torch.Tensor, times: torch.Tensor, solver: str = "heun", distance: str = "l2",
                     labels=None) -> torch.Tensor:
    """The CD loss E[d(f(x_{t_{n+1}}, t_{n+1}), f^-(x^_{t_n}, t_n))], x_{t_{n+1}} = alpha x0 + sigma z and x^_{t_n}
    the teacher's ODE step, uniform weighting (Song et al. 2023, eq. 7 and Alg. 2; openai/consistency_models
    cm/karras_diffusion.py:106, consistency_losses); n: (B,) indices in [0, N - 2] of `times` (cd_times)."""
    if distance not in DISTANCES:
        raise DiffcliError(f"distance={distance} is unknown; choose one of {', '.join(DISTANCES)}")
    t, t_next = times[n], times[n + 1]
    x_next = path.marginal(x0, z, t_next)
    x_n = ode_step(teacher, path, x_next, t_next, t, solver, labels)
    with torch.no_grad():
        y = target(x_n, t, labels)
    return DISTANCES[distance](student(x_next, t_next, labels), y).mean()
