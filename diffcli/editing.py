"""Editing with a trained model as samplers over projected denoisers (issue 28), and the exact judge of every edit.

- `gmm_posterior`: p(x0 | y) of a Gaussian mixture under a linear observation y = A x0 + sigma_y n, in closed form.
- `Replaced`: inpainting by replacement (score_sde): the known coordinates of x_t are the known data noised to t
  before every prediction, so any sampler completes the rest; `colorize` is the same in a luminance/colour basis.
- `repaint`: replacement with RePaint's resampling (Lugmayr et al. 2022): down the grid one step, back up a few.
- `dps`: Diffusion Posterior Sampling (Chung et al. 2023) for y = A x0 + sigma_y n, A one of the linear `OPERATORS`.
- `sdedit`: the data noised to t = strength along the model's path, then any sampler from there (Meng et al. 2022).
- `encode` / `decode` (`pf_ode`): the probability-flow ODE from data to noise and back (DDIM's inversion), and
  `interpolate` between two inputs by `slerp` of their encodings.

Each edit has the Denoiser's signature or calls a sampler with it, so no sampler changes for an edit.
"""

from __future__ import annotations

import math

import torch

from . import DiffcliError
from .guidance import Wrapped
from .samplers.core import draw_noise, transition


def gmm_posterior(means: torch.Tensor, covs: torch.Tensor, log_weights: torch.Tensor, A: torch.Tensor,
                  y: torch.Tensor, sigma_y: float):
    """p(x0 | y) for x0 ~ sum_k w_k N(mu_k, S_k), y = A x0 + sigma_y n: a mixture again, with log weights
    log w_k + log N(y; A mu_k, G_k), G_k = A S_k A^T + sigma_y^2 I, and each component conditioned:
    mu_k + S_k A^T G_k^-1 (y - A mu_k), S_k - S_k A^T G_k^-1 A S_k (Bishop 2006, eqs. 2.113-2.117).
    Returns (log weights (K,), means (K, d), covariances (K, d, d)), float64."""
    means, covs, log_weights, A, y = (v.double() for v in (means, covs, log_weights, A, y))
    m = A.shape[0]
    gain_t = A @ covs  # (K, m, d): A S_k, i.e. (S_k A^T)^T
    G = gain_t @ A.T + sigma_y**2 * torch.eye(m, dtype=A.dtype)  # (K, m, m)
    r = y - means @ A.T  # (K, m)
    chol = torch.linalg.cholesky(G)
    solved = torch.cholesky_solve(r[..., None], chol)[..., 0]  # G_k^-1 r_k
    log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_lik = -0.5 * (r * solved).sum(-1) - 0.5 * log_det - 0.5 * m * math.log(2 * math.pi)
    post_means = means + (gain_t.transpose(1, 2) @ solved[..., None])[..., 0]
    post_covs = covs - gain_t.transpose(1, 2) @ torch.cholesky_solve(gain_t, chol)
    return torch.log_softmax(log_weights + log_lik, 0), post_means, post_covs


class Replaced(Wrapped):
    """Inpainting by replacement (Song et al. 2021, score_sde's controllable_generation.py, get_pc_inpainter): before
    every prediction the known coordinates (`mask` true) of x_t become the known data noised to t with fresh prior
    noise, and x0_hat there is the known data itself; the other coordinates are the sampler's own. With `basis` (an
    orthonormal C x C matrix over channels) the known coordinates are those of the data in that basis, as score_sde's
    get_pc_colorizer decouples an image's luminance from its colour."""

    def __init__(self, inner, x_known: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None,
                 basis: torch.Tensor | None = None):
        super().__init__(inner)
        if mask.shape != x_known.shape[-mask.dim():]:
            raise DiffcliError(f"the mask has shape {tuple(mask.shape)}, the input {tuple(x_known.shape[1:])}: give a "
                               "mask of the input's shape")
        self.x_known, self.mask, self.generator, self.basis = x_known, mask.bool(), generator, basis

    def _in_basis(self, x):
        return x if self.basis is None else torch.einsum("bi...,ij->bj...", x, self.basis.to(x))

    def _from_basis(self, x):
        return x if self.basis is None else torch.einsum("bj...,ij->bi...", x, self.basis.to(x))

    def project(self, x: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """x with its known coordinates (in the basis) taken from `known` (the known data itself by default)."""
        known = self.x_known if known is None else known
        return self._from_basis(torch.where(self.mask, self._in_basis(known.to(x.dtype)), self._in_basis(x)))

    def predict(self, x_t, t, labels=None):
        if not self.mask.any():  # nothing known: the model's own prediction, no noise drawn
            return self.inner.predict(x_t, t, labels)
        x1 = self.path.sample_prior(x_t.shape, self.generator, x_t.device).to(x_t.dtype)
        t_b = t if torch.is_tensor(t) and t.dim() else torch.full((len(x_t),), float(t), device=x_t.device)
        noised = self.path.marginal(self.x_known.to(x_t.dtype), x1, t_b.to(x_t.dtype))
        x0, x1_hat = self.inner.predict(self.project(x_t, noised), t, labels)
        return self.project(x0), x1_hat


def prior_draw(path, shape, t_grid: torch.Tensor, generator, like: torch.Tensor) -> torch.Tensor:
    """A start at the grid's first time, sigma(t_0) x1 with x1 from the prior (as `diffcli sample` starts: a VE
    path's sigma(1) is its sigma_max)."""
    x1 = path.sample_prior(shape, generator, like.device) if not path.gaussian_prior else \
        draw_noise(like.new_empty(shape), generator)
    return (path.sigma(t_grid[0]) * x1).to(like.dtype)


def inpaint(sampler, denoiser, x_known: torch.Tensor, mask: torch.Tensor, t_grid: torch.Tensor,
            generator: torch.Generator | None = None, basis: torch.Tensor | None = None) -> torch.Tensor:
    """x with its known coordinates (`mask`, in `basis`) those of x_known and the rest drawn by `sampler` over the
    Replaced denoiser from the prior."""
    path = denoiser.path
    x = prior_draw(path, x_known.shape, t_grid, generator, x_known)
    replaced = Replaced(denoiser, x_known, mask, generator, basis)
    return replaced.project(sampler(replaced, path, x, t_grid, generator=generator))


# score_sde's colour basis (controllable_generation.py, get_pc_colorizer's M, there rounded to float32): column 0 is
# the luminance (the mean of R, G, B times sqrt 3), columns 1 and 2 two orthogonal colour differences
LUMA_BASIS = torch.tensor([[1 / math.sqrt(3), -2 / math.sqrt(6), 0.0],
                           [1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)],
                           [1 / math.sqrt(3), 1 / math.sqrt(6), -1 / math.sqrt(2)]], dtype=torch.float64)


def colorize(sampler, denoiser, gray: torch.Tensor, t_grid: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Colour images whose luminance is that of `gray` ((B, 1, H, W) or (B, 3, H, W) of equal channels): inpainting
    of the two colour coordinates of LUMA_BASIS (Song et al. 2021; score_sde's get_pc_colorizer)."""
    if gray.shape[1] not in (1, 3):
        raise DiffcliError(f"colorize takes gray images of 1 or 3 channels, got {gray.shape[1]}")
    x_known = gray.expand(-1, 3, *gray.shape[2:]) if gray.shape[1] == 1 else gray
    mask = torch.zeros(x_known.shape[1:], dtype=torch.bool, device=gray.device)
    mask[0] = True
    return inpaint(sampler, denoiser, x_known.contiguous(), mask, t_grid, generator, LUMA_BASIS)


def from_time(t_grid: torch.Tensor, t0: float) -> torch.Tensor:
    """The grid's times below t0, with t0 first: a sampler run on it starts at t0 (diffusers' img2img keeps the
    last `strength` share of its timesteps in the same way)."""
    rest = t_grid[t_grid < t0]
    return torch.cat([torch.tensor([t0], dtype=t_grid.dtype, device=t_grid.device), rest])


def sdedit(sampler, denoiser, x0: torch.Tensor, strength: float, t_grid: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022, Alg. 1): x0 noised to t = strength along the path, x_s = alpha(s) x0 + sigma(s) x1,
    then `sampler` from s to 0 on the grid's times below s; strength 0 returns x0 unchanged, strength 1 is a fresh
    sample from the grid's start."""
    if not 0 <= strength <= 1:
        raise DiffcliError(f"strength={strength} must lie in [0, 1] (0: the input unchanged, 1: a fresh sample)")
    if strength == 0:
        return x0.clone()
    path = denoiser.path
    if strength == 1:  # the input forgotten: exactly `diffcli sample`'s run (a VP path's alpha(1) x0 is ~0.007 x0)
        return sampler(denoiser, path, prior_draw(path, x0.shape, t_grid, generator, x0), t_grid, generator=generator)
    s = torch.full((len(x0),), float(strength), dtype=x0.dtype, device=x0.device)
    x = path.marginal(x0, path.sample_prior(x0.shape, generator, x0.device).to(x0.dtype), s)
    return sampler(denoiser, path, x, from_time(t_grid, strength), generator=generator)



def one_step(sampler, denoiser, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, generator=None) -> torch.Tensor:
    """x carried from t to s by one step of `sampler` (a multistep sampler takes its first-order step: edits that act
    between steps run a sampler one step at a time)."""
    return sampler(denoiser, denoiser.path, x, torch.stack([t, s]), generator=generator)


def need_gaussian(path, method: str) -> None:
    """Refuse an edit that noises with, or differentiates through, a Gaussian transition on another prior."""
    if not path.gaussian_prior:
        raise DiffcliError(f"{method} needs a Gaussian prior (it adds Gaussian noise along the path); this model's "
                           f"prior is {path.prior}: use method=replace, task=sdedit or task=encode")


def renoise(path, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor, generator=None) -> torch.Tensor:
    """x_t ~ q(x_t | x_s), s < t: (alpha_t / alpha_s) x_s + sigma_{t|s} z, the forward process from s to t (RePaint's
    undo step; for DDPM one step of it is sqrt(1 - beta_t) x + sqrt(beta_t) z)."""
    a_t, _, a_s, _, s2_ts = transition(path, t, s)
    return (a_t / a_s) * x_s + torch.sqrt(s2_ts.clamp(min=0)) * draw_noise(x_s, generator)


def repaint_walk(steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The grid positions RePaint visits (Lugmayr et al. 2022, sec. 4.1, the jump schedule of diffusers'
    RePaintScheduler.set_timesteps): 0 (the prior) to `steps` (the data), and from every jump_length-th position
    jump_length back up, jump_n_sample - 1 times; 1 + steps + 2 jump_length (jump_n_sample - 1) (#jumps) entries."""
    if jump_length < 1 or jump_n_sample < 1:
        raise DiffcliError(f"jump_length={jump_length} and jump_n_sample={jump_n_sample} must be >= 1 "
                           "(jump_n_sample=1: no resampling)")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    walk, i = [0], steps  # i counts down as diffusers' inference index; after its move the state is at steps - i
    while i >= 1:
        i -= 1
        walk.append(steps - i)
        if jumps.get(i, 0) > 0:
            jumps[i] -= 1
            for _ in range(jump_length):
                i += 1
                walk.append(steps - i)
    return walk


def repaint(sampler, denoiser, x_known: torch.Tensor, mask: torch.Tensor, t_grid: torch.Tensor,
            jump_length: int = 10, jump_n_sample: int = 10, generator: torch.Generator | None = None,
            basis: torch.Tensor | None = None) -> torch.Tensor:
    """RePaint (Lugmayr et al. 2022, Alg. 1): from the prior down the grid by one step of `sampler`, after which
    the known coordinates become the known data noised to the new time; and along `repaint_walk` back up by the
    forward process (`renoise`), so that the unknown part is resampled in harmony with the known."""
    path = denoiser.path
    need_gaussian(path, "method=repaint")
    replaced = Replaced(denoiser, x_known, mask, generator, basis)
    walk = repaint_walk(len(t_grid) - 1, jump_length, jump_n_sample)
    x = prior_draw(path, x_known.shape, t_grid, generator, x_known)
    for p, q in zip(walk[:-1], walk[1:]):
        t, s = t_grid[p], t_grid[q]
        if q < p:  # back up: t < s here
            x = renoise(path, x, t, s, generator)
            continue
        x = one_step(sampler, denoiser, x, t, s, generator)
        s_b = s.expand(len(x)).to(x.dtype)
        noised = path.marginal(x_known.to(x.dtype), draw_noise(x, generator), s_b)
        x = replaced.project(x, noised if s > 0 else x_known)  # t = 0 is clean data on every path (a VE sigma(0) > 0)
    return x


# ---------------------------------------------------------------------------------------------
# Linear measurements A x0 of DPS: a mask, box down-sampling (super-resolution), a Gaussian blur


class Masked:
    """A x = x where `mask` is true, 0 elsewhere (DPS's inpainting operator, measurements.py InpaintingOperator)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask.bool()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.device)


class BoxDown:
    """A x = the mean of each factor x factor block (super-resolution by box averaging; DPS's reference resizes
    bicubically)."""

    def __init__(self, factor: int):
        self.factor = int(factor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise DiffcliError(f"operator=down{self.factor} averages {self.factor}x{self.factor} blocks of images; "
                               f"the input's shape {tuple(x.shape[1:])} does not divide")
        return torch.nn.functional.avg_pool2d(x, self.factor)


class Blur:
    """A x = x convolved with a normalised Gaussian kernel of `size` pixels and width `width`, zero padding (DPS's
    gaussian_blur operator, there 61 pixels wide with intensity 3.0 on 256x256 images)."""

    def __init__(self, size: int = 9, width: float = 2.0):
        if size < 1 or size % 2 == 0 or width <= 0:
            raise DiffcliError(f"operator=blur needs an odd kernel size >= 1 and a width > 0, got {size} and {width}")
        u = torch.arange(size, dtype=torch.float64) - size // 2
        k = torch.exp(-(u**2) / (2 * width**2))
        self.kernel = torch.outer(k, k) / k.sum() ** 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        weight = self.kernel.to(x)[None, None].expand(c, 1, *self.kernel.shape)
        return torch.nn.functional.conv2d(x, weight, padding=self.kernel.shape[-1] // 2, groups=c)


class Matrix:
    """A x = x A^T for flat points, (B, d) -> (B, m)."""

    def __init__(self, A: torch.Tensor):
        self.A = A

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.A.to(x).T


class _Evaluated(Wrapped):
    """`inner` whose prediction at x and time t is known already: a sampler's first evaluation of a step costs
    nothing (DPS has just made it, with its gradient)."""

    def __init__(self, inner, x: torch.Tensor, t: torch.Tensor, prediction):
        super().__init__(inner)
        self.x, self.t, self.prediction = x, float(t), prediction

    def predict(self, x_t, t, labels=None):
        same_x = x_t is self.x or (x_t.shape == self.x.shape and torch.equal(x_t, self.x))  # EDM's x~ alpha: a copy
        if same_x and labels is None and not (torch.is_tensor(t) and t.dim()) and float(t) == self.t:
            return self.prediction
        return self.inner.predict(x_t, t, labels)


def dps(sampler, denoiser, operator, y: torch.Tensor, shape, t_grid: torch.Tensor, scale: float = 1.0,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Diffusion Posterior Sampling (Chung et al. 2023, Alg. 1) as its reference code steps (condition_methods.py,
    PosteriorSampling; gaussian_diffusion.py, p_sample_loop): one step of `sampler` from x_t, then
    x_s -= scale * grad_{x_t} ||y - A(x0_hat(x_t))||, the norm taken per sample (the reference takes it over the
    whole batch, which couples the samples of a batch). `shape`: the samples', (B, *data shape)."""
    need_gaussian(denoiser.path, "DPS")
    x = prior_draw(denoiser.path, shape, t_grid, generator, y)
    for t, s in zip(t_grid[:-1], t_grid[1:]):
        x_t = x.detach().requires_grad_()
        with torch.enable_grad():
            x0, x1 = denoiser.predict(x_t, t)
            norm = (y - operator(x0)).flatten(1).norm(dim=1)
            grad, = torch.autograd.grad(norm.sum(), x_t)
        x_in = x_t.detach()
        x = one_step(sampler, _Evaluated(denoiser, x_in, t, (x0.detach(), x1.detach())), x_in, t, s, generator)
        x = x - scale * grad
    return x.detach()


def pf_ode(denoiser, x: torch.Tensor, t_from: float, t_to: float, rtol: float = 1e-7, atol: float = 1e-7):
    """x carried from t_from to t_to along the probability-flow ODE dx/dt = alpha' x0_hat + sigma' x1_hat (Song et al.
    2021, eq. 13) by adaptive dopri5 (torchdiffeq), in either direction: 0 -> 1 encodes data to noise, 1 -> 0 decodes
    (the DDIM paper's inversion, section 5)."""
    from torchdiffeq import odeint

    from .samplers.core import velocity_at

    path = denoiser.path
    times = torch.tensor([t_from, t_to], dtype=torch.float64, device=x.device)
    # an explicit first step skips torchdiffeq's step-size probe, which may evaluate outside [0, 1]; step_t keeps
    # steps from passing the end (torchdiffeq underflows with step_t = 0 when integrating backwards, so not there)
    options = {"first_step": abs(t_to - t_from) / 100} | ({"step_t": times[-1:].to(x.dtype)} if t_to else {})
    out = odeint(lambda t, y: velocity_at(denoiser, path, y, t.double()), x, times.to(x.dtype), rtol=rtol, atol=atol,
                 method="dopri5", options=options)
    return out[-1]


def encode(denoiser, x0: torch.Tensor, t: float = 1.0, **tolerances) -> torch.Tensor:
    """The noise x_t (t = 1: the prior) that the probability-flow ODE maps to x0."""
    return pf_ode(denoiser, x0, 0.0, t, **tolerances)


def decode(denoiser, x_t: torch.Tensor, t: float = 1.0, **tolerances) -> torch.Tensor:
    """The data x0 that the probability-flow ODE maps x_t to."""
    return pf_ode(denoiser, x_t, t, 0.0, **tolerances)


def ode_encode(sampler, denoiser, x0: torch.Tensor, t_grid: torch.Tensor) -> torch.Tensor:
    """x0, taken as the state at the grid's smallest time t > 0, carried up to t_0 by a deterministic `sampler` on the
    grid reversed: DDIM inversion (Song et al. 2021a, sec. 5.4; Dhariwal & Nichol 2021, App. F) for any ODE sampler."""
    return sampler(denoiser, denoiser.path, x0, t_grid[t_grid > 0].flip(0))


def ode_decode(sampler, denoiser, x_t: torch.Tensor, t_grid: torch.Tensor) -> torch.Tensor:
    """x_t at t_0 carried down the grid to its smallest time t > 0 by `sampler`: the inverse of ode_encode (the last
    step to t = 0, which would replace x by x0_hat, is not taken, so that decode(encode(x)) -> x as steps grow)."""
    return sampler(denoiser, denoiser.path, x_t, t_grid[t_grid > 0])


def slerp(z0: torch.Tensor, z1: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation per sample (Shoemake 1985), as the DDIM paper interpolates encodings (section 5.3):
    sin((1 - w) theta) / sin(theta) z0 + sin(w theta) / sin(theta) z1, theta the angle between z0 and z1; the straight
    line where they are (nearly) parallel."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]
    sin = torch.sin(theta)
    parallel = sin.abs() < 1e-7
    c0 = torch.where(parallel, 1 - w, torch.sin((1 - w) * theta) / torch.where(parallel, 1, sin))
    c1 = torch.where(parallel, w, torch.sin(w * theta) / torch.where(parallel, 1, sin))
    return (c0 * a + c1 * b).reshape(z0.shape)


def interpolate(denoiser, x_a: torch.Tensor, x_b: torch.Tensor, weights, t: float = 1.0, **tolerances) -> torch.Tensor:
    """Data between x_a and x_b: both encoded to t along the probability-flow ODE, their encodings slerped at each
    weight, each decoded; (len(weights), *x_a.shape)."""
    z_a, z_b = encode(denoiser, x_a, t, **tolerances), encode(denoiser, x_b, t, **tolerances)
    return torch.stack([decode(denoiser, slerp(z_a, z_b, float(w)), t, **tolerances) for w in weights])
