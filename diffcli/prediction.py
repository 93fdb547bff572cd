"""What a network predicts, and the one place where predictions are converted into each other.

On a path x_t = alpha x0 + sigma x1 every parameterization is linear in (x0, x1):
    x0 = 1 x0 + 0 x1,   eps = x1 (Gaussian prior),   score = -x1 / sigma,
    v = alpha x1 - sigma x0 (Salimans & Ho 2022, sec. 4),   velocity = alpha' x0 + sigma' x1,
    F = (x0 - c_skip x~) / c_out, EDM's network output (Karras et al. 2022, eq. 7), x~ = x_t / alpha.
So a prediction p = c0 x0 + c1 x1 together with x_t determines (x0, x1) by a 2x2 solve.

The input preconditioning `model.precond` (what the network is fed) lives here too, in `net_inputs`,
which the Denoiser and the training loss both call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import DiffcliError
from .paths import Path, expand

SIGMA_DATA = 0.5  # EDM's sigma_data, the data's standard deviation (Karras et al. 2022, Table 1)


def edm_scale(alpha, sigma, sigma_data: float):
    """sqrt(sigma^2 + sigma_data^2 alpha^2): alpha sqrt(sigma_edm^2 + sigma_data^2) at EDM's noise level
    sigma_edm = sigma/alpha, in a form finite at alpha = 0."""
    return torch.sqrt(sigma**2 + sigma_data**2 * alpha**2)


def _edm_F(a, s, da, ds, sd):
    """F = (x0 - c_skip x~) / c_out, EDM's c_skip, c_out (Karras et al. 2022, Table 1) at the level s/a:
    c0 = s / (sd r), c1 = -sd a / r with r = sqrt(s^2 + sd^2 a^2); finite at both ends of every path."""
    r = edm_scale(a, s, sd)
    return s / (sd * r), -sd * a / r


# prediction -> (c0, c1) as functions of (alpha, sigma, d_alpha, d_sigma, sigma_data)
COEFFICIENTS = {
    "x0": lambda a, s, da, ds, sd: (torch.ones_like(a), torch.zeros_like(a)),
    "eps": lambda a, s, da, ds, sd: (torch.zeros_like(a), torch.ones_like(a)),
    "score": lambda a, s, da, ds, sd: (torch.zeros_like(a), -1 / s),
    "v": lambda a, s, da, ds, sd: (-s, a),
    "velocity": lambda a, s, da, ds, sd: (da, ds),
    "F": _edm_F,
}


# predictions that only mean something on some paths: name -> (what it needs, test on the path)
def _finite_x0(path: Path) -> bool:
    """Whether x0 = (x_t - sigma eps) / alpha is defined at every training time: not where a DDPM path's
    alpha_bar_T = 0 (zero terminal SNR), where eps and the score carry nothing of x0."""
    return not getattr(path, "zero_terminal_snr", False)


REQUIRES = {
    "eps": ("a Gaussian prior (eps is Gaussian noise) and alpha > 0 at t = 1 (with zero terminal SNR x0 = "
            "(x_t - sigma eps) / alpha is undefined there)",
            lambda path: path.prior == "gaussian" and _finite_x0(path)),
    "score": ("a Gaussian prior (score = -x1 / sigma) and alpha > 0 at t = 1 (with zero terminal SNR the score "
              "carries nothing of x0 there)", lambda path: path.prior == "gaussian" and _finite_x0(path)),
    "v": ("a variance-preserving path (alpha^2 + sigma^2 = 1)", lambda path: path.variance_preserving),
}


def check_prediction(prediction: str, path: Path | None = None) -> str:
    """Validate a prediction name (and, given a path, that it is defined there) with a one-line error."""
    if prediction not in COEFFICIENTS:
        raise DiffcliError(f"model.prediction={prediction} is unknown; choose one of {', '.join(COEFFICIENTS)}")
    need, holds = REQUIRES.get(prediction, (None, None))
    if path is not None and need and not holds(path):
        valid = [p for p in COEFFICIENTS if p not in REQUIRES or REQUIRES[p][1](path)]
        raise DiffcliError(f"model.prediction={prediction} needs {need}, which this model ({type(path).__name__}, "
                           f"{path.prior} prior) lacks; use one of {', '.join(valid)}")
    return prediction


def coefficients(prediction: str, path: Path, t: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c0, c1) with prediction = c0 x0 + c1 x1 at time t."""
    return COEFFICIENTS[check_prediction(prediction)](path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t),
                                                      sigma_data)


def target(prediction: str, path: Path, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
           sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """The regression target of a network trained to predict `prediction`."""
    c0, c1 = coefficients(prediction, path, t, sigma_data)
    return expand(c0, x0) * x0 + expand(c1, x0) * x1


def to_x0_x1(pred: torch.Tensor, prediction: str, path: Path, x_t: torch.Tensor, t: torch.Tensor,
             sigma_data: float = SIGMA_DATA):
    """Solve [alpha sigma; c0 c1] [x0; x1] = [x_t; pred] for (x0, x1)."""
    a, s = expand(path.alpha(t), x_t), expand(path.sigma(t), x_t)
    c0, c1 = (expand(c, x_t) for c in coefficients(prediction, path, t, sigma_data))
    det = a * c1 - s * c0
    return (c1 * x_t - s * pred) / det, (a * pred - c0 * x_t) / det


def convert(pred: torch.Tensor, source: str, dest: str, path: Path, x_t: torch.Tensor, t: torch.Tensor,
            sigma_data: float = SIGMA_DATA):
    """Convert a prediction of kind `source` into kind `dest` at (x_t, t)."""
    x0, x1 = to_x0_x1(pred, source, path, x_t, t, sigma_data)
    return target(dest, path, x0, x1, t, sigma_data)


# s = sigma/alpha is clamped to this range before EDM's c_noise = ln(s)/4: finite at t = 0 (s = 0) and at a
# flow's t = 1 (alpha = 0, s = inf); EDM's own levels [0.002, 80] lie well inside
S_RANGE = (1e-4, 1e4)


def edm_inputs(path: Path, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float):
    """EDM's network inputs (Karras et al. 2022, Table 1) on any path: c_in x~ = x_t / sqrt(sigma^2 + sd^2 alpha^2)
    and c_noise = ln(s) / 4, with x~ = x_t / alpha and s = sigma / alpha clamped to S_RANGE."""
    a, s = path.alpha(t), path.sigma(t)
    log_s = (torch.log(s) - torch.log(a)).clamp(math.log(S_RANGE[0]), math.log(S_RANGE[1]))  # +-inf at the ends
    return x_t / expand(edm_scale(a, s, sigma_data), x_t), log_s / 4


# model.precond -> fn(path, x_t, t, sigma_data) -> (what the network is fed for x, for time)
PRECONDS = {"none": lambda path, x_t, t, sigma_data: (x_t, t), "edm": edm_inputs}


def check_precond(precond: str) -> str:
    """Validate a model.precond name with a one-line error."""
    if precond not in PRECONDS:
        raise DiffcliError(f"model.precond={precond} is unknown; choose one of {', '.join(PRECONDS)}")
    return precond


def net_inputs(net, path: Path, x_t: torch.Tensor, t: torch.Tensor, precond: str = "none",
               sigma_data: float = SIGMA_DATA):
    """(x, time) that `net` is fed at (x_t, t) under `precond`; the one place the Denoiser and the loss share.

    A net with `raw_input = True` (net=oracle, whose exact E[x0 | x_t] is a function of the path's own x_t
    and t) is fed x_t and t as they are: preconditioning is a trained network's input scaling.
    """
    if getattr(net, "raw_input", False):
        return x_t, t
    return PRECONDS[check_precond(precond)](path, x_t, t, sigma_data)


def _extrapolate(base, target, w):
    """base + w (target - base) on (x0_hat, x1_hat): the one rule of CFG and autoguidance; w a float or (B,)."""
    w = w if isinstance(w, float) else expand(w, base[0])
    return tuple(b + w * (c - b) for b, c in zip(base, target))


class NoisyClassifier(nn.Module):
    """log p_t(y | x_t), (B, K), from a classifier net trained on the same path (losses.classifier_loss), fed its
    inputs under `precond` as in training: what the Denoiser's classifier guidance differentiates."""

    def __init__(self, net: nn.Module, path: Path, precond: str = "none", sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net, self.path, self.precond, self.sigma_data = net, path, check_precond(precond), sigma_data
        self.n_classes = int(net.n_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in, t_in = net_inputs(self.net, self.path, x_t, t, self.precond, self.sigma_data)
        return torch.log_softmax(self.net(x_in, t_in.to(x_t.dtype)).to(x_t.dtype), dim=-1)


class Denoiser(nn.Module):
    """What every sampler sees: denoiser(x_t, t) -> x0_hat, from a net predicting `prediction`, fed its
    inputs under `precond` (net_inputs); `sigma_data` is EDM's, for prediction F and precond edm.

    Conditions live here, so every sampler gets them unchanged: `labels` (the classes of the batch being
    sampled, set by `generate`), `guidance` (the guidance weight w: classifier-free, or autoguidance when a
    weaker `guide` Denoiser is set) and `classifier` / `classifier_scale` (classifier guidance). Counts network
    evaluations in `nfe` (a guided evaluation, one batched forward of both halves, counts once). `t` may be a scalar (one time for the whole batch).
    """

    def __init__(self, net: nn.Module, path: Path, prediction: str, precond: str = "none",
                 sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net, self.path, self.prediction = net, path, check_prediction(prediction, path)
        self.precond, self.sigma_data = check_precond(precond), sigma_data
        self.nfe = 0
        self.labels: torch.Tensor | None = None  # (B,) requested classes; None: unconditional
        self.guidance = 1.0  # w: D_uncond + w (D_cond - D_uncond); 1 is the plain conditional model
        self.classifier = None  # fn(x_t, t) -> log p_t(. | x_t), (B, K), differentiable in x_t
        self.classifier_scale = 0.0
        self.guide: Denoiser | None = None  # autoguidance's weaker model, on the same path
        self.guidance_interval: tuple[float, float] | None = None  # guide only where lo < sigma/alpha <= hi

    def _weight(self, t: torch.Tensor):
        """w where the noise level s = sigma/alpha lies in the guidance interval (Kynkäänniemi et al. 2024, eq. 5),
        1 elsewhere: a float when the batch agrees, else a per-sample tensor."""
        w = float(self.guidance)
        if self.guidance_interval is None:
            return w
        lo, hi = self.guidance_interval
        s = self.path.sigma(t) / self.path.alpha(t)  # inf where alpha = 0
        inside = (s > lo) & (s <= hi)
        if inside.all() or not inside.any():
            return w if inside.all() else 1.0
        return torch.where(inside, w, 1.0).to(t.dtype)

    @property
    def device(self) -> torch.device:
        """Where the net lives (its first parameter or buffer; the CPU for a net with neither)."""
        return next(iter([*self.net.parameters(), *self.net.buffers()]), torch.empty(0)).device

    @property
    def n_classes(self) -> int:
        """The classes the net was trained on (0: unconditional); class n_classes is "no label"."""
        return int(getattr(self.net, "n_classes", 0))

    def _x0_x1(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
        """(x0_hat, x1_hat) of one forward of the net, given labels y (None: the net's unconditional input)."""
        x_in, t_in = net_inputs(self.net, self.path, x_t, t, self.precond, self.sigma_data)
        args = (x_in, t_in.to(x_t.dtype)) if y is None else (x_in, t_in.to(x_t.dtype), y)
        return to_x0_x1(self.net(*args).to(x_t.dtype), self.prediction, self.path, x_t, t, self.sigma_data)

    def _guided(self, x_t: torch.Tensor, t: torch.Tensor):
        """Classifier-free guidance (Ho & Salimans 2022, eq. 6) on (x0_hat, x1_hat), both halves in one forward;
        linear in the prediction, so it is the same rule on the score, eps or velocity."""
        y, w = self.labels, self._weight(t)
        if self.guide is not None:
            return self._autoguided(x_t, t, w)
        if not self.n_classes:
            if self.guidance != 1:
                raise DiffcliError(f"guidance={w} needs a class-conditional model; this one was trained without "
                                   "labels (train it with model.cond=class)")
            return self._x0_x1(x_t, t, None)
        if isinstance(w, float) and w in (0, 1):  # one half suffices: conditional, or unconditional ("no label")
            return self._x0_x1(x_t, t, y if w == 1 else torch.full_like(y, self.n_classes))
        null = torch.full_like(y, self.n_classes)
        x0, x1 = self._x0_x1(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        (x0_c, x0_u), (x1_c, x1_u) = x0.chunk(2), x1.chunk(2)
        return _extrapolate((x0_u, x1_u), (x0_c, x1_c), w)

    def _autoguided(self, x_t: torch.Tensor, t: torch.Tensor, w):
        """Autoguidance (Karras et al. 2024, eq. 2): D_guide + w (D - D_guide), the guide a weaker version of the
        same model (conditional or not) given the same labels."""
        x0, x1 = self._x0_x1(x_t, t, self.labels if self.n_classes else None)
        self.guide.labels = self.labels if self.guide.n_classes else None
        return _extrapolate(self.guide.predict(x_t, t), (x0, x1), w)

    def _classifier_guided(self, x0: torch.Tensor, x1: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Classifier guidance (Dhariwal & Nichol 2021, sec. 4): score + s grad log p_t(y | x_t), written through
        Tweedie, x0_hat = (x_t + sigma^2 score) / alpha: x0 += s sigma^2/alpha grad, x1 -= s sigma grad."""
        if self.path.prior != "gaussian":
            raise DiffcliError("classifier guidance adds to the score, and a flow with a uniform prior has none (Tweedie's "
                               "formula needs Gaussian x1); use classifier-free guidance (guidance=) instead")
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = self.classifier(x, t).gather(1, self.labels.long()[:, None]).sum()
            grad = torch.autograd.grad(log_p, x)[0].to(x_t.dtype)
        a, s = expand(self.path.alpha(t), x_t), expand(self.path.sigma(t), x_t)
        scale = self.classifier_scale
        # alpha = 0 (a flow's t = 1): grad vanishes while sigma^2/alpha diverges; their product's limit,
        # s (E[x0 | y] - E[x0]), is not in a classifier's gradient, so that evaluation stays unguided
        return x0 + torch.where(a > 0, scale * s**2 / torch.where(a > 0, a, 1) * grad, 0), x1 - scale * s * grad

    def predict(self, x_t: torch.Tensor, t: torch.Tensor):
        """(x0_hat, x1_hat) at (x_t, t), under the labels and guidance set on the Denoiser."""
        t = torch.as_tensor(t, device=x_t.device)
        t_batch = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        self.nfe += 1
        if self.labels is None and self.guide is not None:
            return self._autoguided(x_t, t_batch, self._weight(t_batch))
        if self.labels is None:
            if self.guidance != 1 or self.classifier is not None:
                raise DiffcliError("guidance needs the classes to generate: set label= or labels= (or leave "
                                   "both unset for an even spread over the classes)")
            return self._x0_x1(x_t, t_batch, None)
        if len(self.labels) != len(x_t):
            raise ValueError(f"{len(self.labels)} labels for a batch of {len(x_t)}")
        x0, x1 = self._guided(x_t, t_batch)
        if self.classifier is not None and self.classifier_scale:
            x0, x1 = self._classifier_guided(x0, x1, x_t, t_batch)
        return x0, x1

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict(x_t, t)[0]
