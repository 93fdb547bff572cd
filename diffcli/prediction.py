"""What a network predicts, and the one place where predictions are converted into each other.

On a path x_t = alpha x0 + sigma x1 every parameterization is linear in (x0, x1):
    x0 = 1 x0 + 0 x1,   eps = x1 (Gaussian prior),   score = -x1 / sigma,
    v = alpha x1 - sigma x0 (Salimans & Ho 2022, sec. 4),   velocity = alpha' x0 + sigma' x1,
    F = (x0 - c_skip x~) / c_out, EDM's network output (Karras et al. 2022, eq. 7), x~ = x_t / alpha.
So a prediction p = c0 x0 + c1 x1 together with x_t determines (x0, x1) by a 2x2 solve.

One prediction is not in that table: `consistency`, a consistency model's F with x0_hat = c_skip x~ + c_out F and
c_skip = 1, c_out = 0 at its boundary level s_min (Song et al. 2023, sec. 3 and appendix C). Its 2x2 system is
singular there, so `to_x0_x1` takes x0_hat from the formula and x1_hat = (x_t - alpha x0_hat) / sigma; it is
no regression target (`diffcli distill method=consistency` trains it), so `target` refuses it.

The input preconditioning `model.precond` (what the network is fed) lives here too, in `net_inputs`,
which the Denoiser and the training loss both call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import DiffcliError
from .paths import ProbabilityPath, expand

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
CONSISTENCY = "consistency"  # the one prediction outside COEFFICIENTS (see consistency_scalings)
PREDICTIONS = (*COEFFICIENTS, CONSISTENCY)


def consistency_scalings(alpha, sigma, s_min: float, sd: float):
    """(c_skip / alpha, c_out) of a consistency model at EDM's level s = sigma/alpha (Song et al. 2023, appendix C;
    openai/consistency_models cm/karras_diffusion.py:68, get_scalings_for_boundary_condition): c_skip = sd^2 /
    ((s - s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2), so x0_hat = (c_skip/alpha) x_t + c_out F.
    With r = alpha (s - s_min) = sigma - s_min alpha, c_skip/alpha = sd^2 alpha / (r^2 + sd^2 alpha^2) and
    c_out = sd r / sqrt(sigma^2 + sd^2 alpha^2): finite where alpha = 0 (a flow's t = 1)."""
    r = sigma - s_min * alpha
    return sd**2 * alpha / (r**2 + sd**2 * alpha**2), sd * r / edm_scale(alpha, sigma, sd)


# predictions that only mean something on some paths: name -> (what it needs, test on the path)
def _finite_x0(path: ProbabilityPath) -> bool:
    """Whether x0 = (x_t - sigma eps) / alpha is defined at every training time: not where a DDPM path's
    alpha_bar_T = 0 (zero terminal SNR), where eps and the score carry nothing of x0."""
    return not getattr(path, "zero_terminal_snr", False)


REQUIRES = {
    "eps": ("a Gaussian prior (eps is Gaussian noise) and alpha > 0 at t = 1 (with zero terminal SNR x0 = "
            "(x_t - sigma eps) / alpha is undefined there)",
            lambda path: path.gaussian_prior and _finite_x0(path)),
    "score": ("a Gaussian prior (score = -x1 / sigma) and alpha > 0 at t = 1 (with zero terminal SNR the score "
              "carries nothing of x0 there)", lambda path: path.gaussian_prior and _finite_x0(path)),
    "v": ("a variance-preserving path (alpha^2 + sigma^2 = 1)", lambda path: path.variance_preserving),
}


def check_prediction(prediction: str, path: ProbabilityPath | None = None) -> str:
    """Validate a prediction name (and, given a path, that it is defined there) with a one-line error."""
    if prediction not in PREDICTIONS:
        raise DiffcliError(f"model.prediction={prediction} is unknown; choose one of {', '.join(PREDICTIONS)}")
    need, holds = REQUIRES.get(prediction, (None, None))
    if path is not None and need and not holds(path):
        valid = [p for p in PREDICTIONS if p not in REQUIRES or REQUIRES[p][1](path)]
        raise DiffcliError(f"model.prediction={prediction} needs {need}, which this model ({type(path).__name__}, "
                           f"{path.prior} prior) lacks; use one of {', '.join(valid)}")
    return prediction


def coefficients(prediction: str, path: ProbabilityPath, t: torch.Tensor, sigma_data: float = SIGMA_DATA):
    """(c0, c1) with prediction = c0 x0 + c1 x1 at time t; a consistency model's F has none (one-line error)."""
    if check_prediction(prediction) == CONSISTENCY:
        raise DiffcliError("model.prediction=consistency is no regression target (a consistency model is trained "
                           "by consistency distillation); train it with diffcli distill method=consistency")
    return COEFFICIENTS[prediction](path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t), sigma_data)


def target(prediction: str, path: ProbabilityPath, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
           sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """The regression target of a network trained to predict `prediction`."""
    c0, c1 = coefficients(prediction, path, t, sigma_data)
    return expand(c0, x0) * x0 + expand(c1, x0) * x1


def to_x0_x1(pred: torch.Tensor, prediction: str, path: ProbabilityPath, x_t: torch.Tensor, t: torch.Tensor,
             sigma_data: float = SIGMA_DATA, sigma_min: float = 0.0):
    """Solve [alpha sigma; c0 c1] [x0; x1] = [x_t; pred] for (x0, x1); a consistency model's F (boundary level
    sigma_min) gives x0 = (c_skip/alpha) x_t + c_out F (consistency_scalings) and x1 = (x_t - alpha x0) / sigma."""
    a, s = expand(path.alpha(t), x_t), expand(path.sigma(t), x_t)
    if prediction == CONSISTENCY:
        c_skip, c_out = consistency_scalings(a, s, sigma_min, sigma_data)
        x0 = c_skip * x_t + c_out * pred
        return x0, (x_t - a * x0) / s
    c0, c1 = (expand(c, x_t) for c in coefficients(prediction, path, t, sigma_data))
    det = a * c1 - s * c0
    return (c1 * x_t - s * pred) / det, (a * pred - c0 * x_t) / det


def convert(pred: torch.Tensor, source: str, dest: str, path: ProbabilityPath, x_t: torch.Tensor, t: torch.Tensor,
            sigma_data: float = SIGMA_DATA, sigma_min: float = 0.0):
    """Convert a prediction of kind `source` into kind `dest` at (x_t, t) (sigma_min: a consistency model's)."""
    x0, x1 = to_x0_x1(pred, source, path, x_t, t, sigma_data, sigma_min)
    return target(dest, path, x0, x1, t, sigma_data)


# s = sigma/alpha is clamped to this range before EDM's c_noise = ln(s)/4: finite at t = 0 (s = 0) and at a
# flow's t = 1 (alpha = 0, s = inf); EDM's own levels [0.002, 80] lie well inside
S_RANGE = (1e-4, 1e4)


def edm_inputs(path: ProbabilityPath, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float):
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


def net_inputs(net, path: ProbabilityPath, x_t: torch.Tensor, t: torch.Tensor, precond: str = "none",
               sigma_data: float = SIGMA_DATA):
    """(x, time) that `net` is fed at (x_t, t) under `precond`; the one place the Denoiser and the loss share.

    A net with `raw_input = True` (net=oracle, whose exact E[x0 | x_t] is a function of the path's own x_t
    and t) is fed x_t and t as they are: preconditioning is a trained network's input scaling.
    """
    if getattr(net, "raw_input", False):
        return x_t, t
    return PRECONDS[check_precond(precond)](path, x_t, t, sigma_data)


def batch_times(t, x_t: torch.Tensor) -> torch.Tensor:
    """t as a (B,) tensor on x_t's device: a scalar time (one for the whole batch) is expanded."""
    t = torch.as_tensor(t, device=x_t.device)
    return t.expand(x_t.shape[0]) if t.ndim == 0 else t


class Denoiser(nn.Module):
    """What every sampler sees: predict(x_t, t, labels) -> (x0_hat, x1_hat), from a net predicting `prediction`,
    fed its inputs under `precond` (net_inputs); `sigma_data` is EDM's, for prediction F and precond edm;
    `sigma_min` is a consistency model's boundary level s_min, where x0_hat = x~ (prediction consistency).

    A value: it holds no conditions. Labels are passed per call (None: the net's unconditional input), or bound with
    guidance.condition, which also composes guidance around it; a sampler never changes when a condition is added.
    `t` may be a scalar (one time for the whole batch).
    """

    def __init__(self, net: nn.Module, path: ProbabilityPath, prediction: str, precond: str = "none",
                 sigma_data: float = SIGMA_DATA, sigma_min: float = 0.0):
        super().__init__()
        self.net, self.path, self.prediction = net, path, check_prediction(prediction, path)
        self.precond, self.sigma_data, self.sigma_min = check_precond(precond), sigma_data, float(sigma_min)

    @property
    def device(self) -> torch.device:
        """Where the net lives (its first parameter or buffer; the CPU for a net with neither)."""
        return next(iter([*self.net.parameters(), *self.net.buffers()]), torch.empty(0)).device

    @property
    def n_classes(self) -> int:
        """The classes the net was trained on (0: unconditional); class n_classes is "no label". A DDP-wrapped net
        (consistency distillation's student under torchrun) keeps them on its .module."""
        return int(getattr(self.net, "n_classes", getattr(getattr(self.net, "module", None), "n_classes", 0)))

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None):
        """(x0_hat, x1_hat) of one forward of the net at (x_t, t), given labels (ignored by an unconditional net)."""
        t = batch_times(t, x_t)
        x_in, t_in = net_inputs(self.net, self.path, x_t, t, self.precond, self.sigma_data)
        y = labels if self.n_classes else None
        args = (x_in, t_in.to(x_t.dtype)) if y is None else (x_in, t_in.to(x_t.dtype), y)
        return to_x0_x1(self.net(*args).to(x_t.dtype), self.prediction, self.path, x_t, t, self.sigma_data,
                        self.sigma_min)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(x_t, t, labels)[0]
