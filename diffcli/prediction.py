"""What a network predicts, and the one place where predictions are converted into each other.

On a path x_t = alpha x0 + sigma x1 every parameterization is linear in (x0, x1):
    x0 = 1 x0 + 0 x1,   eps = x1 (Gaussian prior),   score = -x1 / sigma,
    v = alpha x1 - sigma x0 (Salimans & Ho 2022, sec. 4),   velocity = alpha' x0 + sigma' x1.
So a prediction p = c0 x0 + c1 x1 together with x_t determines (x0, x1) by a 2x2 solve.
"""

from __future__ import annotations

import torch
from torch import nn

from . import DiffcliError
from .paths import Path, expand

# prediction -> (c0, c1) as functions of (alpha, sigma, d_alpha, d_sigma)
COEFFICIENTS = {
    "x0": lambda a, s, da, ds: (torch.ones_like(a), torch.zeros_like(a)),
    "eps": lambda a, s, da, ds: (torch.zeros_like(a), torch.ones_like(a)),
    "score": lambda a, s, da, ds: (torch.zeros_like(a), -1 / s),
    "v": lambda a, s, da, ds: (-s, a),
    "velocity": lambda a, s, da, ds: (da, ds),
}


# predictions that only mean something on some paths: name -> (what it needs, test on the path)
REQUIRES = {
    "eps": ("a Gaussian prior (eps is Gaussian noise)", lambda path: path.prior == "gaussian"),
    "score": ("a Gaussian prior (score = -x1 / sigma)", lambda path: path.prior == "gaussian"),
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


def coefficients(prediction: str, path: Path, t: torch.Tensor):
    """(c0, c1) with prediction = c0 x0 + c1 x1 at time t."""
    return COEFFICIENTS[check_prediction(prediction)](path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t))


def target(prediction: str, path: Path, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target of a network trained to predict `prediction`."""
    c0, c1 = coefficients(prediction, path, t)
    return expand(c0, x0) * x0 + expand(c1, x0) * x1


def to_x0_x1(pred: torch.Tensor, prediction: str, path: Path, x_t: torch.Tensor, t: torch.Tensor):
    """Solve [alpha sigma; c0 c1] [x0; x1] = [x_t; pred] for (x0, x1)."""
    a, s = expand(path.alpha(t), x_t), expand(path.sigma(t), x_t)
    c0, c1 = (expand(c, x_t) for c in coefficients(prediction, path, t))
    det = a * c1 - s * c0
    return (c1 * x_t - s * pred) / det, (a * pred - c0 * x_t) / det


def convert(pred: torch.Tensor, source: str, dest: str, path: Path, x_t: torch.Tensor, t: torch.Tensor):
    """Convert a prediction of kind `source` into kind `dest` at (x_t, t)."""
    x0, x1 = to_x0_x1(pred, source, path, x_t, t)
    return target(dest, path, x0, x1, t)


class Denoiser(nn.Module):
    """What every sampler sees: denoiser(x_t, t) -> x0_hat, from a net predicting `prediction`.

    Counts network evaluations in `nfe`. `t` may be a scalar (one time for the whole batch).
    """

    def __init__(self, net: nn.Module, path: Path, prediction: str):
        super().__init__()
        self.net, self.path, self.prediction = net, path, check_prediction(prediction, path)
        self.nfe = 0

    @property
    def device(self) -> torch.device:
        """Where the net lives (its first parameter or buffer; the CPU for a net with neither)."""
        return next(iter([*self.net.parameters(), *self.net.buffers()]), torch.empty(0)).device

    def predict(self, x_t: torch.Tensor, t: torch.Tensor):
        """(x0_hat, x1_hat) at (x_t, t)."""
        t = torch.as_tensor(t, device=x_t.device)
        t_batch = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        self.nfe += 1
        out = self.net(x_t, t_batch.to(x_t.dtype)).to(x_t.dtype)
        return to_x0_x1(out, self.prediction, self.path, x_t, t_batch)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict(x_t, t)[0]
