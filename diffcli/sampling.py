"""Sampling: a sampler config resolved into (sampler function, time grid), the classes and conditions a command
line asks for, and generate(), which draws n samples in batches into a SampleResult."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from importlib.resources import files

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import DiffcliError, distributed
from .build import SAMPLER_NAMES, build_grid, build_sampler_fn
from .distributed import World
from .guidance import CountNFE, condition
from .hardware import PRECISIONS, bf16_pays
from .loading import LoadedModel, load_classifier, load_guide
from .prediction import Denoiser
from .samplers import check_sampler
from .samplers.core import CLIP_OPTIONS

log = logging.getLogger("diffcli")
DEFAULT_N = {"points": 2000, "images": 64}  # `diffcli sample` without n=: a readable scatter, an 8x8 grid
# batch_size=null (eval's default): 2D points are cheap; an image batch's activations are most of eval's memory
# (unet_small at 32x32x3: 2.0 GiB above the model at 1000, 0.6 GiB at 256, and faster: docs/benchmarks.md)
DEFAULT_BATCH = {"points": 1000, "images": 256}


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
    noise: torch.Tensor | None = None  # the unit noise x1 each sample started from (x_init = sigma(1) x1)

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
    own = model_cfg.get("sampler_options") or {}  # a distilled model's few-step grid and steps (diffcli distill)
    for key in (k for k in OWN_DEFAULTS if k in own):  # replaced, not merged: the grid's arguments are its own
        node[key] = own[key]
    if chosen is not None:  # sampler.steps=... given without sampler=...: it applies to the default sampler
        given = OmegaConf.to_container(chosen, resolve=True, throw_on_missing=False)
        node = OmegaConf.merge(node, {k: v for k, v in given.items() if v not in (None, "???")})
    return OmegaConf.create({"steps": cfg.get("steps"), "eta": cfg.get("eta", 0.0), "sampler": node}).sampler


OWN_DEFAULTS = ("grid", "default_steps")  # what a model's sampler_options may set in its own default sampler
GRID_OPTIONS = ("spacing", "steps_offset", "set_alpha_to_one")  # a DDIM grid's settings a model may carry


def model_options(sampler_cfg: DictConfig, options) -> DictConfig:
    """The sampler config with its `auto` settings taken from the model's own `sampler_options` (an imported
    diffusers scheduler's clipping, timestep spacing, steps_offset, set_alpha_to_one): a setting given on the
    command line wins, and a model without options keeps every `auto` as it is."""
    if not options:
        return sampler_cfg
    options = OmegaConf.to_container(options) if OmegaConf.is_config(options) else dict(options)
    node = OmegaConf.to_container(sampler_cfg, resolve=True)
    fn, grid = node.get("fn") or {}, node.get("grid") or {}
    if fn.get("clip_x0") == "auto" and "clip_x0" in options:
        fn |= {k: options[k] for k in CLIP_OPTIONS if k in options}
    if fn.get("use_clipped_model_output") == "auto" and "use_clipped_model_output" in options:
        fn["use_clipped_model_output"] = options["use_clipped_model_output"]
    if grid.get("name") == "ddim":
        grid |= {k: options[k] for k in GRID_OPTIONS if grid.get(k) == "auto" and k in options}
    return OmegaConf.create(node)


def sampler_from_config(sampler_cfg: DictConfig, path, is_image: bool = False, options=None):
    """(sampler function, time grid) from a `sampler/` config group entry, its `auto` settings first taken from
    the model's `options` (model_options).

    Both come from diffcli's own tables (diffcli/build.py). `clip_x0: auto` clamps the predicted x0
    to [-1, 1] for images, where every pixel lives (as Ho et al.'s sampler and diffusers' clip_sample
    do: it keeps an under-trained model's samples from saturating), and never for 2D points.
    """
    sampler_cfg = model_options(sampler_cfg, options)
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
    if asked is None and not conditional and not cfg.get("guide") and (cfg.get("guidance", 1.0) != 1.0
                                                                       or cfg.get("guidance_interval")):
        raise DiffcliError(f"guidance={cfg.get('guidance')} steers towards a class, and this model (trained without "
                           "labels, net=oracle) samples its whole mixture unless asked for one: set label= or labels=")
    if asked is None:
        return even_labels(n, k if conditional else 0)
    if max(asked) >= k:
        raise DiffcliError(f"class {max(asked)} does not exist: this model knows classes 0 to {k - 1}")
    return torch.tensor(asked).repeat(math.ceil(n / len(asked)))[:n]


def given_conditions(cfg: DictConfig) -> list[str]:
    """The conditions a command line sets (label, guidance, a guide or classifier ...), as `key=value` texts."""
    defaults = {"label": None, "labels": None, "guidance": 1.0, "guidance_interval": None, "guide": None,
                "classifier": None, "classifier_scale": 1.0}
    return [f"{k}={cfg.get(k)}" for k, default in defaults.items() if cfg.get(k, default) != default]


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


COMPILE_WORK = 50_000  # compile=auto: n x steps from which the compile (30-50 s on 2 CPU cores) is repaid


@dataclass(frozen=True)
class Speed:
    """How the network runs while sampling: autocast precision, torch.compile'd, channels-last inputs and weights."""

    precision: str = "fp32"
    compiled: bool = False
    nhwc: bool = False

    def __str__(self) -> str:
        return ", ".join([self.precision, *(["compiled"] if self.compiled else []),
                          *(["channels-last"] if self.nhwc else [])])


def inference_speed(options, device: torch.device, is_image: bool, work: int) -> Speed:
    """`precision`, `compile` and `channels_last` of a sampling command with `auto` resolved (docs/guides/sampling.md,
    "Speed"): for image nets, bf16 where it was measured to pay on this kind of device (hardware.bf16_pays), compiled
    when the run's work (n x steps) repays the compile, channels-last on CUDA or when compiled; fp32 eager otherwise."""
    precision = options.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if is_image and bf16_pays(device, "sample") else "fp32"
    compiled = options.get("compile", "auto")
    compiled = is_image and work >= COMPILE_WORK if compiled == "auto" else bool(compiled)
    nhwc = options.get("channels_last", "auto")
    nhwc = is_image and (device.type == "cuda" or compiled) if nhwc == "auto" else bool(nhwc) and is_image
    return Speed(precision, compiled, nhwc)


class FastNet(nn.Module):
    """A network run at a Speed: its inputs channels-last, its forward under autocast, compiled; its output back in
    the input's dtype, so that the sampler's state and arithmetic stay in fp32 (or float64)."""

    def __init__(self, net: nn.Module, speed: Speed):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if speed.nhwc else net
        # one graph per batch shape (a last smaller batch compiles once more); no dynamic-shape code
        self.run = torch.compile(self.net, dynamic=False) if speed.compiled else self.net
        self.dtype, self.nhwc, self.compiled, self.batch = PRECISIONS[speed.precision], speed.nhwc, speed.compiled, 0
        self.n_classes = int(getattr(net, "n_classes", 0))

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        b = x.shape[0]
        if self.compiled:  # a last, smaller batch is padded to the compiled size, not compiled again (30-50 s)
            self.batch = max(self.batch, b)
            x, *rest = (_pad_rows(v, b, self.batch) for v in (x, *rest))
        if self.nhwc and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.run(x, *rest)
        return out[:b].to(x.dtype).contiguous()


def _pad_rows(v, b: int, size: int):
    """A batch tensor of b rows padded to `size` with copies of its last row (the net treats rows independently:
    no batch statistics in eval mode); anything else as it is."""
    if not torch.is_tensor(v) or v.dim() == 0 or v.shape[0] != b or b == size:
        return v
    return torch.cat([v, v[-1:].expand(size - b, *v.shape[1:])])


def at_speed(denoiser: Denoiser, speed: Speed) -> Denoiser:
    """The denoiser with its network run at `speed`; the exact oracle (float64, no network) is left as it is."""
    if getattr(denoiser.net, "raw_input", False) or speed == Speed():
        return denoiser
    return Denoiser(FastNet(denoiser.net, speed), denoiser.path, denoiser.prediction, denoiser.precond,
                    denoiser.sigma_data, sigma_min=denoiser.sigma_min)


def batch_seed(seed: int, i: int) -> int:
    """The seed of batch i: `seed` itself for the first, then independent streams derived from (seed, i), so
    that a batch's noise depends on its index alone, not on which process draws it or what was drawn before."""
    if i == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, i]).generate_state(1, np.uint64)[0]) >> 1


def sample_batches(denoiser, sampler, grid, n: int, shape, *, batch_size: int, seed: int, device: torch.device,
                   labels: torch.Tensor | None = None, trajectory: bool = False, world: World | None = None,
                   **conditions) -> Iterator[SampleResult]:
    """The n samples batch by batch, in order, on the CPU: sample i of class labels[i] when labels are given, under
    the guidance `conditions` (guidance.condition's arguments), batch i drawn from its own seed (batch_seed).

    With a `world` of several processes (torchrun), rank r draws batches r, r + W, ...; rank 0 yields them all in
    order, the others nothing: the samples are the same for every world size. With `trajectory`, each batch holds
    the states the sampler visited, (frames, b, *shape).
    """
    world = world or World(device=device)
    starts = list(range(0, n, batch_size))
    # a classifier's gradient needs autograd; everything else runs without its bookkeeping
    mode = torch.no_grad if conditions.get("classifier") is not None else torch.inference_mode
    for first in range(0, len(starts), world.size):
        i, out = first + world.rank, None
        if i < len(starts):
            with mode():
                out = _one_batch(denoiser, sampler, grid, starts[i], min(batch_size, n - starts[i]), shape,
                                 batch_seed(seed, i), device, labels, trajectory, conditions)
        if world.main:
            yield from (b for b in distributed.gather(world, out) if b is not None)
        else:
            distributed.gather(world, out)


def _one_batch(denoiser, sampler, grid, start, b, shape, seed, device, labels, trajectory, conditions) -> SampleResult:
    """Batch [start, start + b) of a sampling run, from its own generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    x1 = denoiser.path.sample_prior((b, *shape), g, device)
    batch_labels = None if labels is None else labels[start : start + b].to(device)
    counted = CountNFE(condition(denoiser, batch_labels, **conditions))
    visited = [] if trajectory else None
    extra = {} if visited is None else {"trajectory": visited}
    x0 = sampler(counted, denoiser.path, x1 * denoiser.path.sigma(grid[0]), grid, generator=g, **extra).cpu()
    return SampleResult(x0, None if labels is None else labels[start : start + b], counted.nfe, grid,
                        trajectory=torch.stack(visited).cpu() if trajectory else None, noise=x1.cpu())


def collect(batches: Iterable[SampleResult]) -> SampleResult:
    """The batches of one run as one SampleResult (NFE: the mean over batches)."""
    batches = list(batches)
    first = batches[0]
    return dataclasses.replace(
        first, samples=torch.cat([b.samples for b in batches]),
        labels=None if first.labels is None else torch.cat([b.labels for b in batches]),
        nfe=sum(b.nfe for b in batches) // len(batches),
        trajectory=None if first.trajectory is None else torch.cat([b.trajectory for b in batches], dim=1),
        noise=None if first.noise is None else torch.cat([b.noise for b in batches]))


def generate(denoiser, sampler, grid, n: int, shape, *, batch_size: int, seed: int, device: torch.device,
             labels: torch.Tensor | None = None, trajectory: bool = False, **conditions) -> SampleResult:
    """n samples (sample_batches, in one process) as one SampleResult on the CPU, reproducible from `seed`."""
    return collect(sample_batches(denoiser, sampler, grid, n, shape, batch_size=batch_size, seed=seed, device=device,
                                  labels=labels, trajectory=trajectory, **conditions))


@dataclass(frozen=True)
class Plan:
    """A sampling run as a command line asks for it, decided before the first batch: the denoiser at its Speed, the
    sampler and its grid, the classes and guidance, and what to say about it."""

    model: LoadedModel
    denoiser: Denoiser
    sampler: object
    grid: torch.Tensor
    n: int
    labels: torch.Tensor | None
    conditions: dict
    batch_size: int
    seed: int
    description: str
    speed: Speed

    def batches(self, world: World | None = None, trajectory: bool = False) -> Iterator[SampleResult]:
        """The run's samples batch by batch (on rank 0 only under torchrun); a non-finite batch stops the run."""
        for out in sample_batches(self.denoiser, self.sampler, self.grid, self.n, self.model.shape,
                                  batch_size=self.batch_size, seed=self.seed, device=self.denoiser.device,
                                  labels=self.labels, trajectory=trajectory, world=world, **self.conditions):
            bad = (~torch.isfinite(out.samples.flatten(1))).any(1).sum().item()
            if bad:
                raise DiffcliError(f"{bad} of {len(out.samples)} samples in a batch from {self.model.file} (step "
                                   f"{self.model.step}) are not finite (NaN or inf): the weights diverged or the "
                                   "sampler is unstable; try an earlier checkpoint or another sampler")
            yield self.described(out)

    def described(self, out: SampleResult) -> SampleResult:
        """`out` with what drew it: the sampler, its description and the guidance."""
        guided = "classifier" in self.conditions
        return dataclasses.replace(out, sampler=self.sampler.func.__name__, description=self.description,
                                   guidance=self.conditions["guidance"],
                                   classifier_scale=self.conditions.get("classifier_scale") if guided else None)


def plan(cfg: DictConfig, model: LoadedModel, device: torch.device) -> Plan:
    """The sampling run that a sample or eval command line asks of a loaded model (logged as it is decided)."""
    n = cfg.n if cfg.get("n") is not None else DEFAULT_N[model.kind]
    sampler_cfg = sampler_config(cfg, model.config.model)
    sampler, grid = sampler_from_config(sampler_cfg, model.denoiser.path, model.kind == "images",
                                        model.config.model.get("sampler_options"))
    how = sampler_description(sampler, sampler_cfg, grid)
    conditions = requested_conditions(cfg, model, device)
    labels = requested_labels(cfg, model, n, conditions.get("classifier"))
    speed = inference_speed(cfg, device, model.kind == "images", n * (len(grid) - 1))
    if "guide" in conditions:
        conditions["guide"] = at_speed(conditions["guide"], speed)
    guided = "classifier" in conditions
    log.info("sampling %d from %s (step %d) with %s%s; the network in %s", n, model.file, model.step, how,
             "" if labels is None else f", classes {sorted(set(labels.tolist()))[:10]}, guidance w = "
             f"{conditions['guidance']}" + (f", classifier scale {conditions['classifier_scale']}" if guided else ""),
             speed)
    return Plan(model, at_speed(model.denoiser, speed), sampler, grid, n, labels, conditions,
                cfg.batch_size if cfg.get("batch_size") is not None else DEFAULT_BATCH[model.kind],
                cfg.seed, how, speed)


def draw(cfg: DictConfig, model: LoadedModel, device: torch.device, trajectory: bool = False) -> SampleResult:
    """cfg.n samples of a loaded model with the command line's sampler, classes and guidance, in one process."""
    run = plan(cfg, model, device)
    out = collect(run.batches(trajectory=trajectory))
    log.info("sampled %d with %s: %d network evaluations (NFE) per sample", run.n, run.description, out.nfe)
    return out
