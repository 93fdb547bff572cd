"""Exact log-likelihood through the probability-flow ODE (Song et al. 2021, sec. 4.3 and app. D.2), and the
straightness of its trajectories (Liu et al. 2023; `straightness`).

Along dx/dt = v(x_t, t) = alpha'(t) x0_hat + sigma'(t) x1_hat the density obeys the instantaneous change of
variables d log p_t(x_t) / dt = -div v(x_t, t) (Chen et al. 2018, thm. 1), so integrating [x, logdet] from
t_min (the data) up to t = 1 (the prior) gives

    log p_0(x0) = log p_1(x(1)) + int_{t_min}^1 div v(x_t, t) dt.

The divergence is exact (one backward pass per dimension) for small D, else the Hutchinson-Skilling
estimate eps^T (dv/dx) eps with Rademacher eps held fixed along the ODE (Grathwohl et al. 2019, sec. 3.1).
"""

from __future__ import annotations

import math

import torch

from . import DiffcliError
from .paths import ProbabilityPath, get_prior

EXACT_MAX_DIM = 16  # up to this many dimensions the exact divergence costs at most 16 backward passes per step


def prior_log_prob(path: ProbabilityPath, x1: torch.Tensor) -> torch.Tensor:
    """log p_1(x1) per sample, float64 (B,): the prior term log p_T(x(T)) of Song et al. 2021, app. D.2.

    Gaussian prior: x_1 = alpha(1) x0 + sigma(1) eps is taken as N(0, sigma(1)^2 I), dropping alpha(1) x0 as
    score_sde does (exact for a flow, alpha(1) = 0; the default VP path's alpha(1) ~ 6.7e-3 leaves a bias of order
    alpha(1) |x0| |x(1)| nats). Uniform prior: uniform on [-sigma(1), sigma(1)]^D, -inf outside.
    """
    sigma = float(path.sigma(torch.tensor(1.0, dtype=torch.float64)))
    return get_prior(path.prior).log_prob(x1.flatten(1).double(), sigma)


def _net_dtype(net: torch.nn.Module) -> torch.dtype:
    """The dtype the net computes in: its first floating parameter (or buffer); float64 for a parameter-free net."""
    tensors = [*net.parameters(), *net.buffers()]
    return next((p.dtype for p in tensors if p.is_floating_point()), torch.float64)


def _velocity(denoiser, x_t: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v(x_t, t) = alpha'(t) x0_hat + sigma'(t) x1_hat in float64, the PF-ODE drift (Song et al. 2021, eq. 13)."""
    x0_hat, x1_hat = denoiser.predict(x_t.to(dtype), t)
    return denoiser.path.d_alpha(t) * x0_hat.double() + denoiser.path.d_sigma(t) * x1_hat.double()


def _grad(v_dot: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d v_dot / dx; zeros where v does not depend on x (a constant field)."""
    if not v_dot.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(v_dot, x, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _divergence(v: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
    """div v per sample: sum_i dv_i/dx_i exactly (eps None), else the mean over probes of eps^T (dv/dx) eps
    (Hutchinson 1990; Grathwohl et al. 2019, sec. 3.1). Summing over the batch before each backward pass gives every
    sample its own derivative, as samples do not interact (a net in eval mode)."""
    if eps is None:
        v = v.flatten(1)
        return torch.stack([_grad(v[:, i].sum(), x).flatten(1)[:, i] for i in range(v.shape[1])], 1).sum(1)
    return torch.stack([(_grad((v * e).sum(), x) * e).flatten(1).sum(1) for e in eps]).mean(0)


def _check(x0: torch.Tensor, probes: int, t_min: float) -> None:
    if x0.ndim < 2 or not x0.is_floating_point():
        raise DiffcliError(f"log_likelihood needs a float batch x0 of shape (B, ...), got {x0.dtype} of shape "
                           f"{tuple(x0.shape)}")
    if isinstance(probes, bool) or int(probes) != probes or probes < 1:
        raise DiffcliError(f"probes={probes} must be an integer >= 1 (Hutchinson probe vectors per sample)")
    if not 0 < t_min < 1:
        raise DiffcliError(f"t_min={t_min} must lie in (0, 1): the ODE runs from t_min (data) to 1 (prior)")


def log_likelihood(denoiser, x0: torch.Tensor, *, exact: bool | None = None, probes: int = 1,
                   generator: torch.Generator | None = None, t_min: float | None = None, rtol: float = 1e-5,
                   atol: float = 1e-5) -> dict:
    """log p_0(x0) in nats, float64 (B,), by the probability-flow ODE (Song et al. 2021, app. D.2).

    exact (default: D <= 16) takes the divergence by autograd, one backward pass per dimension; otherwise
    `probes` Rademacher vectors, drawn once from `generator` and held fixed along the ODE, give the
    Hutchinson-Skilling estimate. Returns {"log_p": (B,), "nfe": ODE drift evaluations}.
    """
    from torchdiffeq import odeint

    path = denoiser.path
    t_min = path.eps if t_min is None else float(t_min)
    _check(x0, probes, t_min)
    x = x0.detach().double()  # the ODE state in float64; the net sees its own dtype
    exact = x[0].numel() <= EXACT_MAX_DIM if exact is None else exact
    eps = None
    if not exact:
        device = generator.device if generator is not None else x.device
        eps = (2 * torch.randint(0, 2, (int(probes), *x.shape), generator=generator, device=device) - 1).to(x)
    dtype, nfe = _net_dtype(denoiser.net), 0

    def drift(t, state):
        nonlocal nfe
        nfe += 1
        # a flow's alpha(1) = 0 makes eps/score predictions divide 0 by 0 at t = 1: read the field at
        # t <= 1 - t_min, an O(t_min^2) change to the integral
        t = t.clamp(max=1 - t_min)
        with torch.enable_grad():  # callers may be under no_grad; the divergence needs dv/dx
            x_t = state[0].detach().requires_grad_(True)
            v = _velocity(denoiser, x_t, t, dtype)
            div = _divergence(v, x_t, eps)
        return v.detach(), div.detach()

    times = torch.tensor([t_min, 1.0], dtype=torch.float64, device=x.device)
    # step_t lands the solver on t = 1 without stepping past it; an explicit first step skips torchdiffeq's
    # step-size probe, which can evaluate outside [0, 1] (as in samplers.dopri5)
    options = {"step_t": times[-1:], "first_step": (1 - t_min) / 100}
    with torch.no_grad():
        xs, integrals = odeint(drift, (x, torch.zeros(len(x), dtype=torch.float64, device=x.device)), times,
                               rtol=rtol, atol=atol, method="dopri5", options=options)
    return {"log_p": prior_log_prob(path, xs[-1]) + integrals[-1], "nfe": nfe}


def bits_per_dim(denoiser, images: torch.Tensor, *, generator: torch.Generator, **kwargs) -> dict:
    """Bits/dim of uint8 images under uniform dequantization (Theis et al. 2016; Song et al. 2021, app. D.2).

    z = (x + u) / 128 - 1 with u ~ U[0, 1)^D (drawn first from `generator`, as torch.rand(images.shape,
    dtype=float64)) lies in [-1, 1), the model's data space. In pixel units y = x + u in [0, 256)^D the
    density is p_y(y) = p_z(z) |dz/dy|^D = p_z(z) 2^(-7 D), so
    bpd = -log2 p_y(y) / D = -log p_z(z) / (D ln 2) + 7 (score_sde's offset 7; uniform on [-1, 1]^D gives 8).
    Returns {"bpd": (B,) float64, "nfe": int}; kwargs go to log_likelihood.
    """
    if images.dtype != torch.uint8 or images.ndim < 2:
        raise DiffcliError(f"bits_per_dim needs uint8 images (B, ...) with pixel values 0..255, got {images.dtype} "
                           f"of shape {tuple(images.shape)}")
    device = generator.device if generator is not None else images.device
    u = torch.rand(images.shape, generator=generator, dtype=torch.float64, device=device).to(images.device)
    z = (images.double() + u) / 128 - 1
    out = log_likelihood(denoiser, z, generator=generator, **kwargs)
    return {"bpd": -out["log_p"] / (z[0].numel() * math.log(2)) + 7, "nfe": out["nfe"]}


@torch.no_grad()
def straightness(denoiser, x1: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Per trajectory, S = int_0^1 ||(x(1) - x(0)) - dx/dt||^2 dt along the probability-flow ODE from x(1) = sigma(1) x1
    (the straightness of Liu et al. 2023, rectified flow), by Euler on `steps` uniform steps: its velocities v_k
    average to x(1) - x(0) exactly, so S = mean_k ||v_k - mean v||^2 (0 for straight paths; O(1/steps) error)."""
    if int(steps) != steps or steps < 1:
        raise DiffcliError(f"steps={steps} must be a positive integer (Euler steps of the straightness integral)")
    path, dtype = denoiser.path, _net_dtype(denoiser.net)
    t = torch.linspace(1, 0, int(steps) + 1, dtype=torch.float64)
    x = (x1.double() * path.sigma(t[0])).to(x1.device)
    velocities = []
    for t_k, t_next in zip(t[:-1], t[1:]):
        v = _velocity(denoiser, x, t_k.to(x.device), dtype)
        velocities.append(v.flatten(1))
        x = x + (t_next - t_k) * v
    v = torch.stack(velocities)  # (steps, B, D)
    return (v - v.mean(0)).pow(2).sum(-1).mean(0)
