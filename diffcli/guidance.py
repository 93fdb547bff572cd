"""Conditions as denoisers over denoisers: bound labels, classifier-free guidance, autoguidance, classifier
guidance, and the counting of network evaluations.

Each class here has the Denoiser's signature, predict(x_t, t, labels=None) -> (x0_hat, x1_hat), and wraps
another; `condition` composes them in the one valid order. Samplers see only that signature, so none changes
when a condition is added (as NVlabs/edm passes `class_labels` and k-diffusion `extra_args` per call).
"""

from __future__ import annotations

import torch
from torch import nn

from . import DiffcliError
from .paths import ProbabilityPath, expand
from .prediction import SIGMA_DATA, Denoiser, batch_times, check_precond, net_inputs


class Wrapped:
    """A denoiser around `inner`: the same path, device, classes and net; forward is predict's x0_hat."""

    def __init__(self, inner):
        self.inner = inner

    path = property(lambda self: self.inner.path)
    device = property(lambda self: self.inner.device)
    n_classes = property(lambda self: self.inner.n_classes)
    net = property(lambda self: self.inner.net)
    precond = property(lambda self: self.inner.precond)
    sigma_data = property(lambda self: self.inner.sigma_data)
    sigma_min = property(lambda self: self.inner.sigma_min)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(x_t, t, labels)[0]


class Labelled(Wrapped):
    """`inner` with the classes of the batch bound: sample i is drawn of class labels[i]."""

    def __init__(self, inner, labels: torch.Tensor):
        super().__init__(inner)
        self.labels = labels

    def predict(self, x_t, t, labels=None):
        labels = self.labels if labels is None else labels
        if len(labels) != len(x_t):
            raise ValueError(f"{len(labels)} labels for a batch of {len(x_t)}")
        return self.inner.predict(x_t, t, labels)


def _need_labels(labels) -> None:
    """Classifier-free and classifier guidance steer towards a class: refuse a call without one."""
    if labels is None:
        raise DiffcliError("guidance steers towards a class, and none was given: set label= or labels=")


def _extrapolate(base, target, w):
    """base + w (target - base) on (x0_hat, x1_hat): the one rule of CFG and autoguidance; w a float or (B,)."""
    w = w if isinstance(w, float) else expand(w, base[0])
    return tuple(b + w * (c - b) for b, c in zip(base, target))


class _Weighted(Wrapped):
    """A guidance weight w, applied only where the noise level s = sigma/alpha lies in `interval`."""

    def __init__(self, inner, w: float, interval: tuple[float, float] | None):
        super().__init__(inner)
        self.w, self.interval = float(w), interval

    def weight(self, t: torch.Tensor):
        """w where lo < s <= hi (Kynkäänniemi et al. 2024, eq. 5), 1 elsewhere: a float when the batch agrees, else
        a per-sample tensor."""
        if self.interval is None:
            return self.w
        lo, hi = self.interval
        s = self.path.sigma(t) / self.path.alpha(t)  # inf where alpha = 0
        inside = (s > lo) & (s <= hi)
        if inside.all() or not inside.any():
            return self.w if inside.all() else 1.0
        return torch.where(inside, self.w, 1.0).to(t.dtype)


class ClassifierFree(_Weighted):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) on (x0_hat, x1_hat) of a class-conditional model,
    both halves in one forward; linear in the prediction, so it is the same rule on the score, eps or velocity."""

    def predict(self, x_t, t, labels=None):
        _need_labels(labels)
        t = batch_times(t, x_t)
        w, null = self.weight(t), torch.full_like(labels, self.n_classes)
        if isinstance(w, float) and w in (0, 1):  # one half suffices: conditional, or unconditional ("no label")
            return self.inner.predict(x_t, t, labels if w == 1 else null)
        x0, x1 = self.inner.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        (x0_c, x0_u), (x1_c, x1_u) = x0.chunk(2), x1.chunk(2)
        return _extrapolate((x0_u, x1_u), (x0_c, x1_c), w)


class Autoguided(_Weighted):
    """Autoguidance (Karras et al. 2024, eq. 2): D_guide + w (D - D_guide), the guide a weaker version of the same
    model (conditional or not) given the same labels."""

    def __init__(self, inner, guide, w: float, interval: tuple[float, float] | None = None):
        super().__init__(inner, w, interval)
        self.guide = guide

    def predict(self, x_t, t, labels=None):
        t = batch_times(t, x_t)
        x0_x1 = self.inner.predict(x_t, t, labels)
        return _extrapolate(self.guide.predict(x_t, t, labels), x0_x1, self.weight(t))


class NoisyClassifier(nn.Module):
    """log p_t(y | x_t), (B, K), from a classifier net trained on the same path (losses.classifier_loss), fed its
    inputs under `precond` as in training: what classifier guidance differentiates (not the classifier-FID net)."""

    def __init__(self, net: nn.Module, path: ProbabilityPath, precond: str = "none", sigma_data: float = SIGMA_DATA):
        super().__init__()
        self.net, self.path, self.precond, self.sigma_data = net, path, check_precond(precond), sigma_data
        self.n_classes = int(net.n_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_in, t_in = net_inputs(self.net, self.path, x_t, t, self.precond, self.sigma_data)
        return torch.log_softmax(self.net(x_in, t_in.to(x_t.dtype)).to(x_t.dtype), dim=-1)


class ClassifierGuided(Wrapped):
    """Classifier guidance (Dhariwal & Nichol 2021, sec. 4): score + s grad log p_t(y | x_t), written through
    Tweedie, x0_hat = (x_t + sigma^2 score) / alpha: x0 += s sigma^2/alpha grad, x1 -= s sigma grad."""

    def __init__(self, inner, classifier, scale: float):
        super().__init__(inner)
        if not self.path.gaussian_prior:
            raise DiffcliError("classifier guidance adds to the score, and a flow with a uniform prior has none "
                               "(Tweedie's formula needs Gaussian x1); use classifier-free guidance (guidance=) instead")
        self.classifier, self.scale = classifier, float(scale)

    def predict(self, x_t, t, labels=None):
        _need_labels(labels)
        t = batch_times(t, x_t)
        x0, x1 = self.inner.predict(x_t, t, labels)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            log_p = self.classifier(x, t).gather(1, labels.long()[:, None]).sum()
            grad = torch.autograd.grad(log_p, x)[0].to(x_t.dtype)
        a, s = expand(self.path.alpha(t), x_t), expand(self.path.sigma(t), x_t)
        # alpha = 0 (a flow's t = 1): grad vanishes while sigma^2/alpha diverges; their product's limit,
        # s (E[x0 | y] - E[x0]), is not in a classifier's gradient, so that evaluation stays unguided
        return (x0 + torch.where(a > 0, self.scale * s**2 / torch.where(a > 0, a, 1) * grad, 0),
                x1 - self.scale * s * grad)


class CountNFE(Wrapped):
    """Counts network evaluations per sample in `nfe`: one call evaluates every sample of the batch once (a guided
    call, one batched forward of both halves or of model and guide, counts once)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.nfe = 0

    def predict(self, x_t, t, labels=None):
        self.nfe += 1
        return self.inner.predict(x_t, t, labels)


def condition(denoiser: Denoiser, labels: torch.Tensor | None = None, guidance: float = 1.0,
              guidance_interval: tuple[float, float] | None = None, guide=None, classifier=None,
              classifier_scale: float = 0.0):
    """`denoiser` under the given conditions, composed in the one valid order: guidance (autoguidance with a `guide`,
    else classifier-free) on the model, classifier guidance on that, the labels bound outermost."""
    out = denoiser
    if guide is not None:
        out = Autoguided(out, guide, guidance, guidance_interval)
    elif not denoiser.n_classes and guidance != 1:
        raise DiffcliError(f"guidance={guidance} needs a class-conditional model; this one was trained without "
                           "labels (train it with model.cond=class)")
    elif denoiser.n_classes and (guidance != 1 or guidance_interval is not None):
        out = ClassifierFree(out, guidance, guidance_interval)
    elif guidance_interval is not None:  # nothing it could apply to: refuse rather than ignore it
        raise DiffcliError("guidance_interval limits classifier-free guidance or autoguidance, and this model has "
                           "neither (trained without labels, no guide=): drop guidance_interval, or give guide=<ckpt>")
    if classifier is not None and classifier_scale:
        out = ClassifierGuided(out, classifier, classifier_scale)
    return out if labels is None else Labelled(out, labels)
