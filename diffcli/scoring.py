"""Scoring: metrics of samples against data, as `diffcli eval` reports them and `train.eval_every` tracks them.

2D toys: sliced Wasserstein, MMD, energy distance and mode coverage of samples against fresh data; exact NLL
through the probability-flow ODE. Images: Inception FID / KID, classifier-feature FID, bits per dimension.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import DiffcliError
from .data import build_data, file_label, to_float
from .metrics import energy_distance, mmd_rbf, sliced_wasserstein
from .toys import mixture_distribution

log = logging.getLogger("diffcli")
# 2D sample-vs-data distances: metric name -> (key in metrics.json, function of (samples, reference))
POINT_DISTANCES = {"sliced_wasserstein": ("sliced_wasserstein", sliced_wasserstein), "mmd": ("mmd", mmd_rbf),
                   "energy": ("energy_distance", energy_distance)}
TOY_METRICS = (*POINT_DISTANCES, "modes", "nll", "straightness")
IMAGE_METRICS = ("fid", "kid", "cfid", "bpd", "straightness")
LIKELIHOODS = {"nll", "bpd"}  # scored on real data: no sampling needed
MODEL_METRICS = LIKELIHOODS | {"straightness"}  # of the model itself, not of its samples


def mode_coverage(x: torch.Tensor, modes: torch.Tensor, std: float, min_share: float = 0.25) -> dict:
    """Mixture modes that received at least `min_share` of their expected share of samples.

    A sample counts for its nearest mode only when it lies within 4 std of it (else it is an
    off-manifold sample and counts against `in_modes`).
    """
    d = torch.cdist(x.double(), modes.double())
    dist, nearest = d.min(dim=1)
    close = dist < 4 * std
    counts = torch.bincount(nearest[close], minlength=len(modes))
    expected = len(x) / len(modes)
    return {"modes_covered": int((counts >= min_share * expected).sum()), "modes_total": len(modes),
            "in_modes": close.double().mean().item(), "mode_counts": counts.tolist()}


def toy_metrics(samples: torch.Tensor, reference: torch.Tensor, data, names=("sliced_wasserstein", "modes")) -> dict:
    """Distances of samples to fresh data of the same size, and mode coverage for mixtures."""
    metrics = {key: fn(samples, reference) for name, (key, fn) in POINT_DISTANCES.items() if name in names}
    if "modes" in names and getattr(data, "modes", None) is not None:
        metrics |= mode_coverage(samples, data.modes.cpu(), data.mode_std)
    return metrics


def data_log_prob(data_cfg: DictConfig, x: torch.Tensor) -> torch.Tensor | None:
    """Analytic log-density of a Gaussian-mixture toy at x (None for other data)."""
    mixture = mixture_distribution(data_cfg)
    return None if mixture is None else mixture.log_prob(x.double())


def toy_agreement(data_cfg: DictConfig, samples: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"agreement": the share of samples whose most probable component, argmax_k w_k N(x; mu_k, S_k), is the
    requested class} for a mixture toy; {} for other data."""
    mixture = mixture_distribution(data_cfg)
    if mixture is None:
        return {}
    log_p = mixture.component_distribution.log_prob(samples.double()[:, None]) + mixture.mixture_distribution.logits
    return {"agreement": (log_p.argmax(1) == labels).double().mean().item()}


def resolve_names(names, is_image: bool, data) -> list[str]:
    """The metric names to compute: `auto` picks the usual ones for the data; unknown names are errors."""
    if names == "auto" or names == ["auto"]:
        if not is_image:
            return [name for name in TOY_METRICS if name not in MODEL_METRICS]
        return ["cfid"] if data.labels is not None and data.shape[0] == 1 else ["fid", "kid"]
    names = [names] if isinstance(names, str) else list(names)
    valid = IMAGE_METRICS if is_image else TOY_METRICS
    kind = "image" if is_image else "2D"
    for name in names:
        if name not in valid:
            hint = " (bits/dim is `bpd` for images)" if name == "nll" else " (NLL of 2D data is `nll`)" if name == "bpd" else ""
            raise DiffcliError(f"metric {name} is not available for {kind} data{hint}; choose from {', '.join(valid)}")
    return names


def reference_images(data_cfg: DictConfig, mc: DictConfig, seed: int, split: str | None = None):
    """Real images to compare with: the training data, or its `split` (metric.reference_split), capped at n_reference.
    `data_cfg` is data.located's: the command's own root and path, never a checkpoint's."""
    split = split or mc.get("reference_split")
    if split and data_cfg.get("kind") == "torchvision":
        data_cfg = OmegaConf.merge(data_cfg, {"split": split})
    data = build_data(data_cfg, "cpu", seed=seed)
    images, n = data.images, mc.get("n_reference")
    if n and n < len(images):  # a seeded random subset, the same on every call
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]
    where = data_cfg.split if data_cfg.get("kind") == "torchvision" else Path(str(data_cfg.get("path", ""))).stem
    return data, images, file_label(f"{data_cfg.name}-{where}")


class ImageScores:
    """FID/KID (Inception), classifier-FID and bits/dim of an image model, its samples fed batch by batch (add):
    only their features are kept (Inception's 2048 and the classifier's 128 numbers per image, in float32), so that
    n = 50,000 samples need no more memory than their features. The feature nets load first: a missing weights file
    fails before any sampling."""

    def __init__(self, names, data_cfg: DictConfig, mc: DictConfig, seed: int, device):
        # data_cfg: data.located's, so every real image comes from where this command says
        self.names, self.data_cfg, self.mc, self.seed = list(names), data_cfg, mc, seed
        self.inception = self.classifier = None
        if {"fid", "kid"} & set(names):
            from .inception import inception_weights, load_inception

            self.weights = inception_weights(mc.inception_weights)
            self.inception = load_inception(self.weights, device)
        if "cfid" in names:
            from .cfid import classifier_for

            self.classifier, self.info = classifier_for(data_cfg, cache_dir=Path(mc.cache_dir).expanduser(),
                                                        device=device, seed=seed, epochs=mc.classifier_epochs, log=log)
        self.features, self.cfid_features, self.probabilities, self.labels = [], [], [], []

    def add(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """The features of a batch of samples (and the class each was asked for)."""
        if self.inception is not None:
            from .inception import inception_features

            self.features.append(inception_features(self.inception, samples, self.mc.batch_size).float())
        if self.classifier is not None:
            from .cfid import classifier_outputs

            f, p = classifier_outputs(self.classifier, samples, self.mc.batch_size)
            self.cfid_features.append(f.float())
            self.probabilities.append(p.float())
        if labels is not None:
            self.labels.append(labels.cpu())

    def scores(self, denoiser) -> dict:
        """The metrics of every sample added so far (bits/dim: of real held-out images, through `denoiser`)."""
        out = {}
        if self.inception is not None:
            out |= self._inception_scores()
        if self.classifier is not None:
            from .cfid import classifier_outputs, classifier_scores

            _, images, _ = reference_images(self.data_cfg, self.mc, self.seed)
            f_reference = classifier_outputs(self.classifier, to_float(images), self.mc.batch_size)[0]
            out |= classifier_scores(torch.cat(self.cfid_features).double(), torch.cat(self.probabilities).double(),
                                     f_reference, torch.cat(self.labels) if self.labels else None)
            out |= {"classifier_accuracy": self.info["accuracy"], "classifier_trained_on": self.info["trained_on"]}
        if "bpd" in self.names:
            out |= _bits_per_dim(denoiser, self.data_cfg, self.mc, self.seed)
        return out

    def _inception_scores(self) -> dict:
        """FID and KID against cached Inception features of the real data."""
        from .inception import fid_kid, reference_features

        _, images, name = reference_images(self.data_cfg, self.mc, self.seed)
        reference = reference_features(self.inception, self.weights, images, name, self.mc.cache_dir,
                                       self.mc.batch_size)
        scores = fid_kid(torch.cat(self.features), reference, names=self.names, subsets=self.mc.kid_subsets,
                         subset_size=self.mc.kid_subset_size, seed=self.seed)
        scores["fid_reference"] = f"{name} ({len(images)} images)"
        return {k: v for k, v in scores.items() if k.split("_")[0] in self.names or k == "fid_reference"}


def _bits_per_dim(denoiser, data_cfg, mc, seed) -> dict:
    """Bits/dim of real held-out images (the test split when there is one) through the PF-ODE."""
    from .likelihood import bits_per_dim

    _, images, name = reference_images(data_cfg, OmegaConf.merge(mc, {"n_reference": None}), seed,
                                       split="test")
    images = images[: mc.nll_n]
    g = torch.Generator().manual_seed(seed)
    bpd, nfe = [], 0
    for batch in images.split(mc.batch_size):
        out = bits_per_dim(denoiser, batch.to(denoiser.device), generator=g, probes=mc.probes,
                           rtol=mc.rtol, atol=mc.atol)
        bpd.append(out["bpd"].cpu())
        nfe = max(nfe, out["nfe"])
    bpd = torch.cat(bpd)
    return {"bpd": bpd.mean().item(), "bpd_sem": _sem(bpd), "bpd_images": f"{name} ({len(bpd)})", "bpd_nfe": nfe}


def nll_2d(denoiser, data, data_cfg, mc, seed) -> dict:
    """Exact NLL (nats) of fresh data through the PF-ODE; next to it, the data's own entropy where known."""
    from .likelihood import log_likelihood

    g = torch.Generator().manual_seed(seed + 2)
    x = data.sample(mc.nll_n, g).cpu()
    out = log_likelihood(denoiser, x.to(denoiser.device), exact=True, rtol=mc.rtol, atol=mc.atol)
    nll = -out["log_p"].cpu()
    metrics = {"nll": nll.mean().item(), "nll_sem": _sem(nll), "nll_nfe": out["nfe"]}
    truth = data_log_prob(data_cfg, x)
    if truth is not None:  # E[-log p_data] on the same points: no model can go below it on average
        metrics["nll_data"] = -truth.mean().item()
    return metrics


def straightness_score(denoiser, shape, mc, seed: int) -> dict:
    """The straightness of the model's probability-flow ODE (Liu et al. 2023, eq. 3), averaged over
    metric.straightness_n trajectories from the prior, each by Euler on metric.straightness_steps steps; per
    trajectory it sums over the dimensions, and `straightness_per_dim` divides by their number."""
    from .likelihood import straightness

    if denoiser.prediction == "consistency":
        raise DiffcliError("metric=straightness measures a probability-flow ODE, and a consistency model has none "
                           "(it maps to the data in one evaluation): score the teacher, or a reflowed student")
    g = torch.Generator().manual_seed(seed + 3)
    x1 = denoiser.path.sample_prior((mc.straightness_n, *shape), g, "cpu")
    with torch.inference_mode():
        s = torch.cat([straightness(denoiser, batch.to(denoiser.device), mc.straightness_steps).cpu()
                       for batch in x1.split(mc.batch_size)])
    dims = math.prod(shape)
    return {"straightness": s.mean().item(), "straightness_sem": _sem(s), "straightness_per_dim": s.mean().item() / dims,
            "straightness_nfe": int(mc.straightness_steps)}


def _sem(v: torch.Tensor) -> float:
    return (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else float("nan")


def default_cache_dir() -> Path:
    """$DIFFCLI_CACHE, else ~/.cache/diffcli: where reference features and classifiers are kept."""
    return Path(os.environ.get("DIFFCLI_CACHE", "~/.cache/diffcli")).expanduser()


def reference_points(data, n: int, seed: int) -> torch.Tensor:
    """n fresh points of a 2D toy (on the CPU) that samples drawn with `seed` are scored against: the same draw in
    train.eval_every, train's final evaluation and diffcli eval, so their figures agree at equal n and seed."""
    return data.sample(n, torch.Generator(data.device).manual_seed(seed + 1)).cpu()


def quick_metric(samples: torch.Tensor, data, data_cfg: DictConfig, seed: int, device) -> dict:
    """The cheap metric of train.eval_every: sliced Wasserstein (2D) or classifier-FID (labelled images)."""
    if not data.is_image:
        return {"sliced_wasserstein": sliced_wasserstein(samples, reference_points(data, len(samples), seed))}
    from .cfid import classifier_fid, classifier_for

    classifier, _ = classifier_for(data_cfg, cache_dir=default_cache_dir(), device=device, seed=seed, log=log)
    scores = classifier_fid(classifier, samples, to_float(data.images.cpu()))
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def final_metrics(samples: torch.Tensor, data, data_cfg: DictConfig, seed: int, device) -> dict:
    """The metrics of a training run's end (objective.metric, metrics.json): eval's distances and mode coverage
    against fresh data of the same size for 2D points, classifier-FID with class balance for labelled images."""
    if data.is_image:
        return quick_metric(samples, data, data_cfg, seed, device)
    scores = toy_metrics(samples.cpu(), reference_points(data, len(samples), seed), data, (*POINT_DISTANCES, "modes"))
    return {k: v for k, v in scores.items() if isinstance(v, (int, float))}


def check_objective(objective, data) -> None:
    """objective.metric must be one that train's end computes for this data (schema.OBJECTIVES)."""
    from .ranges import OBJECTIVES

    metric = objective.get("metric") if objective is not None else None
    if metric is None:
        return
    fits = {"2D": not data.is_image, "2D mixture": getattr(data, "modes", None) is not None,
            "labelled images": data.is_image and getattr(data, "labels", None) is not None}
    needs = OBJECTIVES[metric][0]
    if not fits[needs]:
        usable = [m for m, (kind, _) in OBJECTIVES.items() if fits[kind]]
        raise DiffcliError(f"objective.metric={metric} needs {needs} data; for this data choose one of "
                           f"{', '.join(usable) if usable else 'none (images without labels have no quick metric)'}")
