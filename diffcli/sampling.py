"""Sampling: a sampler config resolved into (sampler function, time grid), the classes and conditions a command
line asks for, and generate(), which draws n samples in batches into a SampleResult."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from importlib.resources import files

import torch
from omegaconf import DictConfig, OmegaConf

from . import DiffcliError
from .build import SAMPLER_NAMES, build_grid, build_sampler_fn
from .guidance import CountNFE, condition
from .loading import LoadedModel, load_classifier, load_guide
from .samplers import check_sampler

log = logging.getLogger("diffcli")
DEFAULT_N = {"points": 2000, "images": 64}  # `diffcli sample` without n=: a readable scatter, an 8x8 grid


@dataclass(frozen=True)
class SampleResult:
    """What a sampling run drew: samples on the CPU (data space), the class asked of each (None: unconditional),
    the network evaluations per sample, the time grid and what ran; `trajectory` (frames, n, *shape) on request."""

    samples: torch.Tensor
    labels: torch.Tensor | None
    nfe: int
    grid: torch.Tensor
    sampler: str = ""
    description: str = ""
    guidance: float = 1.0
    classifier_scale: float | None = None
    trajectory: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        return len(self.grid) - 1


def sampler_config(cfg: DictConfig, model_cfg: DictConfig) -> DictConfig:
    """The `sampler` node of cfg, or (when none was chosen) the formulation's default `model.sampler`.

    The default's YAML is read from the shipped configs and resolved against cfg's `steps` and
    `eta`, exactly as if `sampler=<model.sampler>` had been given on the command line; a bare
    `sampler: {steps: ...}` node (sample.yaml, eval.yaml) is merged over it, so
    `diffcli eval -m sampler.steps=5,10,20` sweeps the default sampler's steps.
    """
    chosen = cfg.get("sampler")
    if chosen is not None and not OmegaConf.is_missing(chosen, "fn"):
        if "_target_" not in chosen.fn:
            raise DiffcliError("sampler.fn.* options were given without a sampler: choose the sampler too, "
                               "e.g. sampler=langevin sampler.fn.n_steps=50")
        return chosen

    if model_cfg.sampler not in SAMPLER_NAMES:  # the name picks a shipped file: never a path of its own
        raise DiffcliError(f"model.sampler={model_cfg.sampler} is not a diffcli sampler; choose one of "
                           f"{', '.join(SAMPLER_NAMES)}")
    node = OmegaConf.load(files("diffcli.configs").joinpath("sampler", f"{model_cfg.sampler}.yaml"))
    if chosen is not None:  # sampler.steps=... given without sampler=...: it applies to the default sampler
        given = OmegaConf.to_container(chosen, resolve=True, throw_on_missing=False)
        node = OmegaConf.merge(node, {k: v for k, v in given.items() if v not in (None, "???")})
    return OmegaConf.create({"steps": cfg.get("steps"), "eta": cfg.get("eta", 0.0), "sampler": node}).sampler


def sampler_from_config(sampler_cfg: DictConfig, path, is_image: bool = False):
    """(sampler function, time grid) from a `sampler/` config group entry.

    Both come from diffcli's own tables (diffcli/build.py). `clip_x0: auto` clamps the predicted x0
    to [-1, 1] for images, where every pixel lives (as Ho et al.'s sampler and diffusers' clip_sample
    do: it keeps an under-trained model's samples from saturating), and never for 2D points.
    """
    fn = build_sampler_fn(sampler_cfg.fn, is_image)
    check_sampler(fn.func.__name__, path, **fn.keywords)  # refuse an invalid pair before any work
    steps = sampler_cfg.steps if sampler_cfg.steps is not None else sampler_cfg.default_steps
    if steps is None and sampler_cfg.grid.get("name") != "levels":  # a DDPM model's own steps, all of them
        steps = path.T or sampler_cfg.get("continuous_steps")
    return fn, build_grid(sampler_cfg.grid, path, None if steps is None else int(steps))


def sampler_description(sampler, sampler_cfg: DictConfig, grid: torch.Tensor) -> str:
    """What runs, for logs and titles: the sampler and its time grid, e.g. 'langevin on the levels grid of 10 times'
    (the NFE, which the grid alone does not fix, is logged once sampling has counted it)."""
    return (f"{sampler.func.__name__} on the {sampler_cfg.grid.get('name', '?')} grid of {len(grid)} times "
            f"(t = {grid[0].item():.3g} to {grid[-1].item():.3g})")


def even_labels(n: int, n_classes: int) -> torch.Tensor | None:
    """0, 1, ..., K-1, 0, 1, ...: n labels spread evenly over the classes (None for an unconditional model)."""
    return torch.arange(n) % n_classes if n_classes else None


def requested_labels(cfg: DictConfig, model: LoadedModel, n: int, classifier=None) -> torch.Tensor | None:
    """The class of each of the n samples: `label=`, `labels=` (cycled), or for a model trained with labels (or
    guided by a classifier) an even spread; None when none was asked of a model trained without (net=oracle knows
    its mixture's classes but samples the mixture itself unless asked for one)."""
    k = model.denoiser.n_classes or (classifier.n_classes if classifier is not None else 0)
    conditional = model.n_classes > 0 or classifier is not None
    label, labels = cfg.get("label"), cfg.get("labels")
    if label is not None and labels is not None:
        raise DiffcliError("give label=<class> or labels=[...], not both")
    asked = [label] if label is not None else (list(labels) if labels is not None else None)
    if not k:
        if asked is not None or (cfg.get("guidance", 1.0) != 1.0 and not cfg.get("guide")):
            what = "label=/labels=" if asked is not None else f"guidance={cfg.get('guidance')}"
            raise DiffcliError(f"{what} needs a class-conditional model; this one was trained without labels "
                               "(train one with model.cond=class, or guide it with classifier=<ckpt>)")
        return None
    if asked is None:
        return even_labels(n, k if conditional else 0)
    if max(asked) >= k:
        raise DiffcliError(f"class {max(asked)} does not exist: this model knows classes 0 to {k - 1}")
    return torch.tensor(asked).repeat(math.ceil(n / len(asked)))[:n]


def requested_conditions(cfg: DictConfig, model: LoadedModel, device) -> dict:
    """The guidance a command line asks for, as guidance.condition's keyword arguments, companions loaded."""
    interval = cfg.get("guidance_interval")
    out = {"guidance": float(cfg.get("guidance", 1.0)),
           "guidance_interval": None if interval is None else (float(interval[0]), float(interval[1]))}
    if cfg.get("classifier"):
        out |= {"classifier": load_classifier(cfg.classifier, device, model),
                "classifier_scale": float(cfg.get("classifier_scale", 1.0))}
    elif cfg.get("classifier_scale", 1.0) != 1.0:
        raise DiffcliError(f"classifier_scale={cfg.classifier_scale} needs classifier=<ckpt of a noise-conditional "
                           "classifier> (diffcli train net=unet_classifier ...)")
    if cfg.get("guide"):
        out["guide"] = load_guide(cfg.guide, device, cfg.get("net_class"), model)
    return out


@torch.no_grad()
def generate(denoiser, sampler, grid, n: int, shape, *, batch_size: int, seed: int, device: torch.device,
             labels: torch.Tensor | None = None, trajectory: bool = False, **conditions) -> SampleResult:
    """n samples in batches, reproducible from `seed`, returned on the CPU; sample i of class labels[i] when labels
    are given, under the guidance `conditions` (guidance.condition's arguments).

    With `trajectory`, the result holds the states the sampler visited, (frames, n, *shape).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    out, frames, nfe = [], [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x1 = denoiser.path.sample_prior((b, *shape), g, device)
        batch_labels = None if labels is None else labels[start : start + b].to(device)
        counted = CountNFE(condition(denoiser, batch_labels, **conditions))
        visited = [] if trajectory else None
        extra = {} if visited is None else {"trajectory": visited}
        out.append(sampler(counted, denoiser.path, x1 * denoiser.path.sigma(grid[0]), grid, generator=g,
                           **extra).cpu())
        nfe.append(counted.nfe)
        if visited is not None:
            frames.append(torch.stack(visited))
    return SampleResult(torch.cat(out), labels, sum(nfe) // len(nfe), grid,
                        trajectory=torch.cat(frames, dim=1) if trajectory else None)


def draw(cfg: DictConfig, model: LoadedModel, device: torch.device, trajectory: bool = False) -> SampleResult:
    """cfg.n samples of a loaded model with the command line's sampler, classes and guidance (sample and eval)."""
    n = cfg.n if cfg.get("n") is not None else DEFAULT_N[model.kind]
    sampler_cfg = sampler_config(cfg, model.config.model)
    sampler, grid = sampler_from_config(sampler_cfg, model.denoiser.path, model.kind == "images")
    how = sampler_description(sampler, sampler_cfg, grid)
    conditions = requested_conditions(cfg, model, device)
    labels = requested_labels(cfg, model, n, conditions.get("classifier"))
    guided = "classifier" in conditions
    log.info("sampling %d from %s (step %d) with %s%s", n, model.file, model.step, how,
             "" if labels is None else f", classes {sorted(set(labels.tolist()))[:10]}, guidance w = "
             f"{conditions['guidance']}" + (f", classifier scale {conditions['classifier_scale']}" if guided else ""))
    out = generate(model.denoiser, sampler, grid, n, model.shape, batch_size=cfg.batch_size, seed=cfg.seed,
                   device=device, labels=labels, trajectory=trajectory, **conditions)
    bad = (~torch.isfinite(out.samples.flatten(1))).any(1).sum().item()
    if bad:
        raise DiffcliError(f"{bad} of {n} samples from {model.file} (step {model.step}) are not finite (NaN or inf): "
                           "the weights diverged or the sampler is unstable; try an earlier checkpoint or another "
                           "sampler")
    log.info("sampled %d with %s: %d network evaluations (NFE) per sample", n, how, out.nfe)
    return dataclasses.replace(out, sampler=sampler.func.__name__, description=how, guidance=conditions["guidance"],
                               classifier_scale=conditions.get("classifier_scale") if guided else None)
