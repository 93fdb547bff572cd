"""Probability paths x_t = alpha(t) x0 + sigma(t) x1, t in [0, 1], t = 0 data, t = 1 prior.

Every formulation of the toolkit is one of these paths; everything else (SDE drift and
diffusion, reverse SDE, probability-flow ODE) is derived from alpha, sigma and their derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import DiffcliError, short


def expand(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample (B,) or scalar coefficient against x of shape (B, ...)."""
    c = torch.as_tensor(c, device=x.device)
    if c.ndim == 1:
        c = c.reshape(-1, *([1] * (x.ndim - 1)))
    return c.to(x.dtype) if c.is_floating_point() else c


@dataclass(frozen=True)
class Prior:
    """The distribution of x1 on the unit scale: how to draw it, its log-density on [-sigma, sigma]-scaled points,
    and whether it is Gaussian (then eps, the score and Tweedie's formula are defined)."""

    sample: Callable  # (shape, generator, device) -> x1
    log_prob: Callable  # (x1 flattened to (B, D) float64, sigma(1)) -> (B,) float64
    gaussian: bool


def _gaussian_log_prob(x1: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x1; 0, sigma^2 I) per row."""
    d = x1.shape[1]
    return -0.5 * (x1 / sigma).pow(2).sum(1) - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)


def _uniform_log_prob(x1: torch.Tensor, sigma: float) -> torch.Tensor:
    """log U([-sigma, sigma]^D) per row: -D log(2 sigma) inside, -inf outside."""
    outside = (x1.abs() > sigma).any(1)
    return torch.full_like(x1[:, 0], -x1.shape[1] * math.log(2 * sigma)).masked_fill(outside, -math.inf)


# model.prior -> Prior: the one description of each prior (sampling, likelihood, what it allows)
PRIORS = {
    "gaussian": Prior(lambda shape, g, device: torch.randn(shape, generator=g, device=device), _gaussian_log_prob,
                      gaussian=True),
    "uniform": Prior(lambda shape, g, device: 2 * torch.rand(shape, generator=g, device=device) - 1,  # [-1, 1]^d
                     _uniform_log_prob, gaussian=False),
}


def get_prior(name: str) -> Prior:
    """PRIORS[name], or a one-line error naming the known priors."""
    if name not in PRIORS:
        raise DiffcliError(f"model.prior={name} is unknown; choose one of {', '.join(PRIORS)}")
    return PRIORS[name]


MAX_LEVELS = 10**6  # discrete steps or noise levels of a path: its tables are this long (a stored T is bounded)


class ProbabilityPath:
    """Base class: subclasses define alpha, sigma, d_alpha, d_sigma as functions of t, and t_from_s.

    Continuous-time paths train on times from one of TIME_DISTRIBUTIONS; discrete ones override `sample_t`.
    """

    prior = "gaussian"  # x1 ~ N(0, I): a name of PRIORS
    variance_preserving = False  # alpha^2 + sigma^2 = 1 (where v-prediction is defined)
    T: int | None = None  # number of discrete training steps; None for continuous time
    discrete = False  # trains on a fixed set of times (its own sample_t), so only dist=uniform over them

    def __init__(self, eps: float = 1e-5):
        if not 0 < eps < 1:
            raise DiffcliError(f"model.path.eps={eps} must lie in (0, 1): training times are t ~ U(eps, 1)")
        self.eps = eps

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def f(self, t: torch.Tensor) -> torch.Tensor:
        """SDE drift coefficient f(t) = alpha'/alpha of dx = f x dt + g dw (Kingma et al. 2021, eq. 33)."""
        return self.d_alpha(t) / self.alpha(t)

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        """Squared diffusion g(t)^2 = 2 sigma sigma' - 2 f sigma^2, the SDE with these marginals."""
        sigma = self.sigma(t)
        return 2 * sigma * self.d_sigma(t) - 2 * self.f(t) * sigma**2

    def marginal(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) x1."""
        return expand(self.alpha(t), x0) * x0 + expand(self.sigma(t), x0) * x1

    @property
    def gaussian_prior(self) -> bool:
        """Whether x1 is Gaussian, so that eps, the score and Tweedie's formula are defined (PRIORS)."""
        return get_prior(self.prior).gaussian

    def sample_prior(self, shape, generator: torch.Generator | None, device) -> torch.Tensor:
        """x1 ~ the prior (standard normal unless the path says otherwise)."""
        return get_prior(self.prior).sample(shape, generator, device)

    def t_from_s(self, s: torch.Tensor) -> torch.Tensor:
        """The t with sigma(t) / alpha(t) = s, in closed form (s may lie beyond the path's s(1))."""
        raise NotImplementedError

    def sample_t(self, n: int, generator: torch.Generator | None, device, dist: str = "uniform",
                 mean: float | None = None, std: float | None = None) -> torch.Tensor:
        """n training times from TIME_DISTRIBUTIONS[dist]; mean and std of its normal (None: the distribution's own)."""
        sample, (mean_0, std_0) = TIME_DISTRIBUTIONS[check_times(dist, self, mean, std)]
        return sample(self, n, generator, device, mean_0 if mean is None else mean, std_0 if std is None else std)


def _uniform_t(path: ProbabilityPath, n: int, generator, device, mean: float, std: float) -> torch.Tensor:
    """t ~ U(eps, 1) (Song et al. 2021, sec. 3.3: eps keeps 1/sigma finite)."""
    return path.eps + (1 - path.eps) * torch.rand(n, generator=generator, device=device)


def _lognormal_t(path: ProbabilityPath, n: int, generator, device, mean: float, std: float) -> torch.Tensor:
    """ln s ~ N(mean, std^2) for s = sigma/alpha (Karras et al. 2022, Table 1: P_mean, P_std), t = t_from_s(s).

    Not clipped to [0, 1]: VE and VP extend beyond it in closed form, so ln s is exactly normal, as EDM draws
    sigma (training/loss.py, EDMLoss); a flow covers every s > 0 inside (0, 1).
    """
    return path.t_from_s(torch.exp(mean + std * torch.randn(n, generator=generator, device=device)))


def _logit_normal_t(path: ProbabilityPath, n: int, generator, device, mean: float, std: float) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(mean, std^2) (Esser et al. 2024, eq. 19), kept in [eps, 1] as the uniform draws."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device)).clamp(path.eps, 1)


# model.times.dist -> (fn(path, n, generator, device, mean, std) -> t, its default (mean, std))
TIME_DISTRIBUTIONS = {
    "uniform": (_uniform_t, (None, None)),
    "lognormal": (_lognormal_t, (-1.2, 1.2)),  # EDM's P_mean, P_std
    "logit_normal": (_logit_normal_t, (0.0, 1.0)),  # SD3's m, s
}


def check_times(dist: str, path: ProbabilityPath, mean: float | None = None, std: float | None = None) -> str:
    """Validate a training-time distribution for this path with a one-line error."""
    if dist not in TIME_DISTRIBUTIONS:
        raise DiffcliError(f"model.times.dist={dist} is unknown; choose one of {', '.join(TIME_DISTRIBUTIONS)}")
    if dist == "uniform" and (mean, std) != (None, None):
        raise DiffcliError(f"model.times.mean={mean}, model.times.std={std}: uniform times have neither; "
                           "set model.times.dist=lognormal or logit_normal, or leave them null")
    if path.discrete and dist != "uniform":
        raise DiffcliError(f"model.times.dist={dist}: {type(path).__name__} trains on its own discrete times; "
                           "use model.times.dist=uniform, or a continuous model (vesde, vpsde, subvpsde, flow, edm)")
    return dist


def _check_range(name_lo: str, lo: float, name_hi: str, hi: float) -> None:
    if not 0 < lo < hi:
        raise DiffcliError(f"need 0 < {name_lo} < {name_hi}, got {name_lo}={lo}, {name_hi}={hi}; "
                           f"set model.path.{name_lo} below model.path.{name_hi}")


class VEPath(ProbabilityPath):
    """Variance exploding: alpha = 1, sigma = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021, eq. 30)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5):
        super().__init__(eps)
        if sigma_max is None:
            raise DiffcliError("model.path.sigma_max is unset for this dataset; compute its largest pairwise distance "
                               "with scripts/sigma_max.py and pass data.sigma_max=<value>")
        _check_range("sigma_min", sigma_min, "sigma_max", sigma_max)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=_dtype(t)))

    def sigma(self, t):
        return self.sigma_min * torch.exp(self.log_ratio * torch.as_tensor(t, dtype=_dtype(t)))

    def d_alpha(self, t):
        return torch.zeros_like(torch.as_tensor(t, dtype=_dtype(t)))

    def d_sigma(self, t):
        return self.log_ratio * self.sigma(t)

    def t_from_s(self, s):
        return torch.log(s / self.sigma_min) / self.log_ratio


class NCSNPath(VEPath):
    """NCSN (Song & Ermon 2019): the VE path on L geometric levels sigma_1 > ... > sigma_L.

    Level i sits at t = (L - i) / (L - 1): t = 1 is sigma_1 = sigma_max, t = 0 is sigma_L = sigma_min.
    """

    discrete = True

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 1.0, L: int = 10):
        if int(L) != L or not 2 <= L <= MAX_LEVELS:
            raise DiffcliError(f"model.path.L={short(L, 20)} must be an integer in [2, {MAX_LEVELS}] (the number of "
                               "noise levels)")
        super().__init__(sigma_min, sigma_max)
        self.L = int(L)
        self.levels = torch.linspace(0, 1, self.L, dtype=torch.float64)  # ascending t: sigma_L ... sigma_1

    def sample_t(self, n, generator, device, dist: str = "uniform", mean=None, std=None):
        """A noise level drawn uniformly among the L (the sum over levels of NCSN's eq. 5)."""
        check_times(dist, self, mean, std)
        i = torch.randint(0, self.L, (n,), generator=generator, device=device)
        return i.float() / (self.L - 1)


class VPPath(ProbabilityPath):
    """Variance preserving with linear beta(t) (Song et al. 2021, eq. 33):
    alpha = exp(-t^2 (b_max - b_min) / 4 - t b_min / 2), sigma = sqrt(1 - alpha^2)."""

    variance_preserving = True

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5):
        super().__init__(eps)
        _check_range("beta_min", beta_min, "beta_max", beta_max)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t):
        return self.beta_min + torch.as_tensor(t, dtype=_dtype(t)) * (self.beta_max - self.beta_min)

    def log_alpha(self, t):
        t = torch.as_tensor(t, dtype=_dtype(t))
        return -t**2 * (self.beta_max - self.beta_min) / 4 - t * self.beta_min / 2

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(t)))

    def d_alpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def neg_log_alpha_from_s(self, s):
        """-log alpha at s = sigma/alpha: alpha = 1 / sqrt(1 + s^2)."""
        return 0.5 * torch.log1p(s**2)

    def t_from_s(self, s):
        """The root t >= 0 of (b_max - b_min) t^2 / 4 + b_min t / 2 = -log alpha(s), in the form without cancellation."""
        a, b, c = (self.beta_max - self.beta_min) / 4, self.beta_min / 2, self.neg_log_alpha_from_s(s)
        return 2 * c / (b + torch.sqrt(b**2 + 4 * a * c))


class SubVPPath(VPPath):
    """sub-VP (Song et al. 2021, eq. 34): the VP alpha with sigma = 1 - alpha^2, so g^2 = beta (1 - alpha^4)."""

    variance_preserving = False

    def sigma(self, t):
        return -torch.expm1(2 * self.log_alpha(t))

    def d_sigma(self, t):
        return -2 * self.alpha(t) * self.d_alpha(t)

    def neg_log_alpha_from_s(self, s):
        """-log alpha at s = (1 - alpha^2)/alpha: alpha = (sqrt(s^2 + 4) - s) / 2, so -log alpha = asinh(s / 2)."""
        return torch.asinh(s / 2)


class FlowPath(ProbabilityPath):
    """Flow matching / rectified flow: x_t = (1 - t) x0 + t x1 with any simple prior (Lipman et al. 2023;
    Liu et al. 2023); the conditional field is alpha' x0 + sigma' x1 = x1 - x0."""

    def __init__(self, prior: str = "gaussian", eps: float = 1e-5):
        super().__init__(eps)
        get_prior(prior)  # one line for an unknown name
        self.prior = prior

    def alpha(self, t):
        return 1 - torch.as_tensor(t, dtype=_dtype(t))

    def sigma(self, t):
        return torch.as_tensor(t, dtype=_dtype(t)).clone()

    def d_alpha(self, t):
        return -torch.ones_like(torch.as_tensor(t, dtype=_dtype(t)))

    def d_sigma(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=_dtype(t)))

    def t_from_s(self, s):
        return 1 / (1 + 1 / s)  # s / (1 + s), also at s = inf (t = 1)


def _linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020, sec. 4)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def _cosine_betas(T: int, beta_start: float, beta_end: float, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999 as there."""
    alpha_bar = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def _scaled_linear_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Latent diffusion's schedule, linear in sqrt(beta) (diffusers' beta_schedule="scaled_linear")."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def _sigmoid_betas(T: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """GeoDiff's sigmoid schedule (Xu et al. 2022; diffusers' beta_schedule="sigmoid"): beta_start + (beta_end -
    beta_start) sigmoid(u), u evenly spaced on [-6, 6]."""
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start


def _given_betas(betas: list, T: int) -> torch.Tensor:
    """T betas given as numbers (diffusers' trained_betas), each in (0, 1)."""
    b = torch.tensor(betas, dtype=torch.float64)
    if b.shape != (T,) or not bool(((b > 0) & (b < 1)).all()):
        raise DiffcliError(f"model.path.betas must be {T} numbers in (0, 1) (one per step of T={T}); got "
                           f"{len(betas)} numbers from {b.min().item() if len(b) else 'none'} to "
                           f"{b.max().item() if len(b) else 'none'}")
    return b


# model.path.schedule -> betas; diffusers' names: linear, squaredcos_cap_v2 (our cosine), scaled_linear, sigmoid
BETA_SCHEDULES = {"linear": _linear_betas, "cosine": _cosine_betas, "scaled_linear": _scaled_linear_betas,
                  "sigmoid": _sigmoid_betas}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose alpha_bar_T = 0 exactly (Lin et al. 2024, Algorithm 1): sqrt(alpha_bar) shifted to end at 0
    and scaled to keep its first value."""
    a = torch.exp(0.5 * torch.cumsum(torch.log1p(-betas), 0))  # sqrt(alpha_bar_i)
    a = (a - a[-1]) * (a[0] / (a[0] - a[-1]))
    alpha_bar = a**2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


class DDPMPath(ProbabilityPath):
    """DDPM's discrete VP path: alpha_bar_i = prod_{j<=i} (1 - beta_j), step i at t = (i + 1) / T; the betas of
    `schedule`, or the T numbers `betas` (diffusers' trained_betas) instead.

    Between grid points log alpha_bar is interpolated linearly, so the path is defined for every
    t in [0, 1] (alpha(0) = 1) and continuous-time samplers apply to it too. With zero_terminal_snr the
    betas are rescaled so that alpha(1) = 0 (Lin et al. 2024); log alpha_bar has no finite end there, so the
    last segment interpolates alpha itself linearly to 0.
    """

    variance_preserving = True
    discrete = True

    def __init__(self, T: int = 1000, schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02, zero_terminal_snr: bool = False, betas: list[float] | None = None):
        super().__init__()
        if int(T) != T or not 2 <= T <= MAX_LEVELS:
            raise DiffcliError(f"model.path.T must be an integer in [2, {MAX_LEVELS}], got {short(T, 20)}")
        if schedule not in BETA_SCHEDULES:
            raise DiffcliError(f"model.path.schedule={schedule} is unknown; choose one of {sorted(BETA_SCHEDULES)}")
        if not 0 < beta_start < beta_end < 1:
            raise DiffcliError(f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
        self.T, self.schedule = int(T), schedule
        self.betas = (BETA_SCHEDULES[schedule](self.T, beta_start, beta_end) if betas is None
                      else _given_betas(betas, self.T))
        self.zero_terminal_snr = bool(zero_terminal_snr)
        if self.zero_terminal_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        # log alpha_bar on the grid t_k = k / T, k = 0..T, with alpha_bar(0) = 1 (clean data); -inf at T with
        # zero_terminal_snr
        self.log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-self.betas), 0)])

    def _segment(self, t: torch.Tensor):
        """Grid segment index i, offset w in [0, 1], for u = t T in [i, i + 1]."""
        u = torch.as_tensor(t).double() * self.T
        i = u.floor().clamp(0, self.T - 1)
        return i.long(), u - i

    def _log_alpha_bar(self, t):
        table = self.log_alpha_bar.to(torch.as_tensor(t).device)
        i, w = self._segment(t)
        return (1 - w) * table[i] + w * table[i + 1], (table[i + 1] - table[i]) * self.T

    def _alpha(self, t):
        """(alpha, d alpha / dt) in float64: exp(la / 2) on log-linear segments, linear to 0 on a zero-terminal-SNR
        path's last segment."""
        la, dla = self._log_alpha_bar(t)
        a, da = torch.exp(0.5 * la), 0.5 * dla * torch.exp(0.5 * la)
        if not self.zero_terminal_snr:
            return a, da
        i, w = self._segment(t)
        a_last = torch.exp(0.5 * self.log_alpha_bar[self.T - 1]).to(a.device)  # alpha at t = (T - 1) / T
        last = i == self.T - 1
        return torch.where(last, (1 - w) * a_last, a), torch.where(last, -a_last * self.T, da)

    def alpha(self, t):
        return self._alpha(t)[0].to(_dtype(t))

    def _sigma(self, t):
        """sqrt(1 - alpha_bar) in float64, through expm1 (exact near t = 0), and from alpha on a zero-terminal-SNR
        path's last segment."""
        la, _ = self._log_alpha_bar(t)
        sigma = torch.sqrt(-torch.expm1(la))
        if self.zero_terminal_snr:
            sigma = torch.where(self._segment(t)[0] == self.T - 1, torch.sqrt(1 - self._alpha(t)[0] ** 2), sigma)
        return sigma

    def sigma(self, t):
        return self._sigma(t).to(_dtype(t))

    def d_alpha(self, t):
        return self._alpha(t)[1].to(_dtype(t))

    def d_sigma(self, t):
        # sigma^2 = 1 - alpha^2  =>  sigma' = -alpha alpha' / sigma
        a, da = self._alpha(t)
        return (-a * da / self._sigma(t)).to(_dtype(t))

    def sample_t(self, n: int, generator: torch.Generator | None, device, dist: str = "uniform", mean=None,
                 std=None) -> torch.Tensor:
        """Training times uniform on the grid {1/T, ..., 1}: DDPM's uniform integer step (Alg. 1)."""
        check_times(dist, self, mean, std)
        i = torch.randint(0, self.T, (n,), generator=generator, device=device)
        return (i + 1).float() / self.T

    def t_from_s(self, s):
        """alpha_bar = 1 / (1 + s^2) located on the piecewise-linear log alpha_bar (its last segment extended beyond
        t = 1, as alpha and sigma are)."""
        s = torch.as_tensor(s)
        la = -torch.log1p(s.double() ** 2)
        table = self.log_alpha_bar.to(la.device)
        i = (torch.searchsorted(-table, -la) - 1).clamp(0, self.T - 1)  # log alpha_bar decreases: -table ascends
        t = (i + (la - table[i]) / (table[i + 1] - table[i])) / self.T
        if self.zero_terminal_snr:  # the last segment is linear in alpha = 1 / sqrt(1 + s^2)
            a_last = torch.exp(0.5 * table[self.T - 1])
            t = torch.where(i == self.T - 1, (self.T - torch.exp(0.5 * la) / a_last) / self.T, t)
        return t.to(_dtype(s))

    def timestep_to_t(self, i: torch.Tensor) -> torch.Tensor:
        """DDPM's integer step i in {0..T-1} (diffusers' `timestep`) as path time t = (i + 1) / T."""
        return (torch.as_tensor(i, dtype=torch.float64) + 1) / self.T


def _dtype(t) -> torch.dtype:
    t = torch.as_tensor(t)
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()
