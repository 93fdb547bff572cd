"""The pieces of a training run: the model and its optimization built from a config, one optimizer step, the
learning-rate schedule, the `auto` speed settings, the restore of a saved state, and TrainState, which holds
all of it for the loop in diffcli/fitting.py.

Every step's randomness (batch, t, noise) comes from a generator seeded by (seed, step), so a
run resumed at step k draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import DiffcliError, distributed
from .build import CLASSIFIERS, build_net
from .checkpoint import load_state, load_weights, newest_state, remove_temporaries
from .data import build_data, no_labels
from .ema import EMA, initial_share
from .guidance import NoisyClassifier
from .hardware import PRECISIONS, bf16_pays
from .losses import check_coupling, check_weighting, classifier_loss, draw, pair_loss
from .paths import check_times
from .prediction import check_precond, check_prediction
from .ranges import check_ranges
from .schema import resume_overrides

COMPILE_STEPS = 1000  # compile=auto: runs this long repay the one-off compile (about a minute on 2 CPU cores)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for one training step: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict, Path, str | None]:
    """The stored config of the run to resume, with this command's `train.*` overrides on top
    (schema.resume_overrides: any other override that changes the run is refused)."""
    run_dir, newest = newest_state(cfg.train.resume)
    remove_temporaries(run_dir / "checkpoints")  # half-written files of a killed write
    state = load_state(newest)
    resumed, user_class = resume_overrides(cfg, state["config"], overrides, run_dir)
    return resumed, state, run_dir, user_class


def check_train_config(cfg: DictConfig, path) -> None:
    """One-line errors for bad training settings (the model's path already built)."""
    tc = cfg.train
    check_ranges(cfg)
    if tc.precision not in ("auto", *PRECISIONS):
        raise DiffcliError(f"train.precision={tc.precision} is unknown; choose one of auto, {', '.join(PRECISIONS)}")
    if tc.lr_schedule not in LR_DECAY:
        raise DiffcliError(f"train.lr_schedule={tc.lr_schedule} is unknown; choose one of {', '.join(LR_DECAY)}")
    if cfg.model.get("prior") is not None and "prior" not in inspect.signature(type(path)).parameters:
        raise DiffcliError(f"model.prior={cfg.model.prior}: {cfg.model.name}'s path has a Gaussian prior only; "
                           "other priors need model=flow")
    check_prediction(cfg.model.prediction, path)
    if cfg.model.prediction == "consistency" and (cfg.get("distill") or {}).get("method") != "consistency":
        raise DiffcliError("model.prediction=consistency is a consistency model's, which diffcli distill "
                           "method=consistency trains from a teacher; choose another prediction")
    check_precond(cfg.model.precond)
    check_times(cfg.model.times.dist, path, cfg.model.times.mean, cfg.model.times.std)
    check_weighting(cfg.model.weighting, path)
    check_coupling(cfg.model.get("coupling") or "independent")


def schedule_warnings(tc: DictConfig) -> list[str]:
    """One line for each thing a run of train.steps cannot do as set: reach the learning rate after a longer
    warm-up, or average out the initial weights with an EMA whose half-life is longer than the run."""
    out = []
    if tc.steps < tc.warmup:
        out.append(f"train.steps={tc.steps} is smaller than train.warmup={tc.warmup}: the learning rate never reaches "
                   f"train.lr={tc.lr:g} (it ends at {tc.lr * tc.steps / tc.warmup:.2g}); lower train.warmup")
    share = initial_share(tc.ema.decay, tc.ema.warmup, tc.steps)
    if share > 0.5:
        out.append(f"the EMA's half-life is longer than the run: after {tc.steps} steps it still holds {share:.0%} of "
                   f"the initial random weights (train.ema.decay={tc.ema.decay:g}, train.ema.warmup={tc.ema.warmup}), "
                   "and samples come from those; lower train.ema.decay or set train.ema.warmup=10")
    return out


def build_model(cfg: DictConfig, device: torch.device, user_class: str | None = None, fits: dict | None = None,
                data=None):
    """Data (cfg.data's, unless `data` is given: reflow's pairs) and network of a run (the network from diffcli's
    classes, or `user_class` named on the command line);
    model.cond=class, or a classifier net, gives the network the data's classes and records them in cfg.model (so
    in checkpoints)."""
    torch.manual_seed(cfg.seed)  # initialisation (and Fourier features); dropout after it
    data = build_data(cfg.data, device, seed=cfg.seed) if data is None else data
    n_classes = 0
    if is_classifier(cfg) and cfg.model.get("cond", "none") == "class":
        raise DiffcliError(f"net={cfg.net._target_.rsplit('.', 1)[-1]} is a classifier of x_t, not a class-conditional "
                           "model: drop model.cond=class")
    if cfg.model.get("cond", "none") == "class" or is_classifier(cfg):
        if not data.n_classes:
            raise no_labels(cfg.data.name)
        n_classes = data.n_classes
        cfg.model.n_classes, cfg.model.class_names = n_classes, data.class_names
    try:  # a resumed run's network must fit its saved weights (`fits`) before it is built for real
        net = build_net(cfg.net, data.shape, user_class=user_class, n_classes=n_classes, fits=fits)
    except DiffcliError as e:
        raise DiffcliError(f"train.resume: {e}" if fits is not None else str(e)) from None
    return data, net.to(device)


def is_classifier(cfg: DictConfig) -> bool:
    """Whether the run trains a noise-conditional classifier p_t(y | x_t) (net=unet_classifier, mlp_classifier)."""
    return cfg.net.get("_target_") in CLASSIFIERS


@torch.no_grad()
def noisy_accuracy(net, path, model_cfg: DictConfig, data, device, n: int = 1000,
                   times=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict:
    """A classifier's accuracy on n labelled examples noised to each t of `times` (its training data for images:
    there is no held-out split; fresh points for toys)."""
    g = torch.Generator(device).manual_seed(12345)
    x0, y = data.labelled_batch(0, n, g)
    x1 = path.sample_prior(x0.shape, g, device)
    classifier = NoisyClassifier(net, path, model_cfg.precond, model_cfg.sigma_data)  # as classifier= will feed it
    out = {}
    for t_val in times:
        t = torch.full((n,), t_val, device=device)
        log_p = classifier(path.marginal(x0, x1, t), t)
        out[f"t={t_val:g}"] = (log_p.argmax(1) == y.to(log_p.device)).float().mean().item()
    return out


def drop_labels(y: torch.Tensor, n_classes: int, p_uncond: float, g: torch.Generator) -> torch.Tensor:
    """Each label replaced by the "no label" class n_classes with probability p_uncond (Ho & Salimans 2022, Alg. 1)."""
    drop = torch.rand(y.shape, generator=g, device=g.device).to(y.device) < p_uncond
    return torch.where(drop, n_classes, y)


# train.lr_schedule: the LR multiplier after the warm-up, given the fraction `done` of the remaining steps
LR_DECAY = {"constant": lambda done: 1.0,
            "cosine": lambda done: 0.5 * (1 + math.cos(math.pi * done))}  # SGDR (Loshchilov & Hutter 2017) eq. 5


def lr_factor(step: int, tc: DictConfig) -> float:
    """LR multiplier of optimizer step `step` (0-based): linear warm-up, then train.lr_schedule's decay."""
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    return LR_DECAY[tc.lr_schedule](min(1.0, (step - tc.warmup) / max(tc.steps - tc.warmup, 1)))


def speed_settings(tc: DictConfig, device: torch.device, is_image: bool) -> tuple[str, bool, bool]:
    """train.precision, train.compile and train.channels_last with `auto` resolved (docs/guides/training.md, "Precision and speed"): for
    image nets where bf16 was measured to pay for training on this kind of device (hardware.bf16_pays), bf16,
    compiled on runs that repay the compile, NHWC on CUDA or when compiled; fp32 eager elsewhere."""
    fast = is_image and bf16_pays(device, "train")
    compiled = fast and tc.steps >= COMPILE_STEPS if tc.compile == "auto" else bool(tc.compile)
    precision = ("bf16" if fast else "fp32") if tc.precision == "auto" else tc.precision
    # NHWC: cuDNN's layout; on a CPU only compiled code gains from it (eager bf16 NHWC loses 43%, most of it in
    # torch's channels-last GroupNorm backward: docs/guides/training.md, "Precision and speed")
    setting = tc.get("channels_last", "auto")
    nhwc = is_image and ((device.type == "cuda" or compiled) if setting == "auto" else bool(setting))
    return precision, compiled, nhwc


def build_optimization(cfg: DictConfig, net, device: torch.device, precision: str):
    """EMA, optimizer, grad scaler and autocast context of a run at `precision` (resolved, never `auto`)."""
    tc = cfg.train
    ema = EMA(net, decay=tc.ema.decay, warmup=tc.ema.warmup)
    # fused: one kernel per step, and it takes a found_inf flag, so a non-finite step is skipped on the
    # device without a host sync (CUDA and CPU)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                            fused=device.type in ("cuda", "cpu"))
    dtype = PRECISIONS[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)  # fp16 needs loss scaling
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    return ema, opt, scaler, autocast


def restore(state: dict, net, ema: EMA, opt, scaler, device: torch.device) -> int:
    """Load a training state saved by save_state; returns the step to continue from."""
    load_weights(net, state["net"], "its training weights")
    load_weights(ema.net, state["ema"], "its EMA weights")
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DiffcliError(f"its optimizer state does not fit the network ({str(e).splitlines()[0][:150]}); "
                           "the file is damaged; resume from an older state_<step>.safetensors") from None
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"]


def train_step(model, path, model_cfg, x0, g, opt, scaler, autocast, grad_clip, micro: int, world,
               y: torch.Tensor | None = None, classify: bool = False, x1: torch.Tensor | None = None,
               objective=None) -> tuple:
    """One optimizer step on the global batch x0 (labels y, already dropped to "no label" where drawn; x1 the noise
    paired with each x0, else drawn), this rank's share of it in micro-batches of `micro`; `classify`: the
    cross-entropy of a noise-conditional classifier of y instead of the denoising loss; `objective`: a loss of its
    own (consistency distillation), called as objective(model, x0, x1, t, y) on each micro-batch.

    Returns (loss, grad_norm, finite) as device tensors; a step whose loss or gradient is not finite
    leaves weights and optimizer state untouched (decided on the device: no host sync).
    """
    x0, x1, t = draw(path, x0, g, model_cfg.get("coupling") or "independent", model_cfg.times, x1)  # the global batch
    t = t if objective is None else objective.draw(len(x0), g)
    accum = x0.shape[0] // (micro * world.size)
    opt.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=x0.device)
    for k in range(accum):
        part = slice((world.rank * accum + k) * micro, (world.rank * accum + k + 1) * micro)
        sync = k == accum - 1 or world.size == 1  # DDP: all-reduce gradients on the last micro-batch only
        inputs = dict(precond=model_cfg.precond, sigma_data=model_cfg.sigma_data)
        with (nullcontext() if sync else model.no_sync()), autocast:
            if objective is not None:
                micro_loss = objective(model, x0[part], x1[part], t[part], None if y is None else y[part]) / accum
            elif classify:
                micro_loss = classifier_loss(model, path, x0[part], x1[part], t[part], y[part], **inputs) / accum
            else:
                micro_loss = pair_loss(model, path, model_cfg.prediction, x0[part], x1[part], t[part],
                                       model_cfg.weighting, snr_gamma=model_cfg.snr_gamma,
                                       y=None if y is None else y[part], **inputs) / accum
        scaler.scale(micro_loss).backward()
        loss += micro_loss.detach()
    scaler.unscale_(opt)  # clip the true gradient, not the scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    # fp16's scaler skips overflowing steps itself (and lowers its scale): only a non-finite loss counts there
    finite = torch.isfinite(loss) if scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(grad_norm)
    if scaler.is_enabled():
        scaler.step(opt)
    elif opt.defaults.get("fused"):
        opt.found_inf = (~finite).float()  # the fused kernel skips the update (and its step count) on 1
        opt.step()
        del opt.found_inf
    elif finite:  # an unfused optimizer has no device-side skip: this costs a sync
        opt.step()
    scaler.update()
    return loss, grad_norm, finite


class Tally:
    """Counts of a run's steps. On the device, read at log intervals only (no host sync per step): the summed loss
    of finite steps and their number since the last log line, skipped (non-finite) steps, the longest run of them.
    On the host: the steps since the last log line and when it was written."""

    def __init__(self, device: torch.device):
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.loss_sum, self.n_finite, self.skipped, self.run_of_bad, self.worst_run = (zero() for _ in range(5))
        self.since_log, self.t_log = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.since_log += 1
        self.loss_sum += torch.where(finite, loss, 0)
        self.n_finite += finite
        self.skipped += ~finite
        self.run_of_bad = torch.where(finite, 0, self.run_of_bad + 1)
        self.worst_run = torch.maximum(self.worst_run, self.run_of_bad)


@dataclass
class TrainState:
    """Everything a training run holds between steps: its config and folder, the path, data and network (`model` is
    what the step runs: DDP-wrapped and compiled as set), the EMA, optimizer, LR schedule, scaler and autocast, and
    the step to continue from."""

    cfg: DictConfig
    out_dir: Path
    path: object
    world: object
    data: object
    net: torch.nn.Module
    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    autocast: object
    precision: str
    compiled: bool
    nhwc: bool
    micro: int
    start: int
    classify: bool  # a noise-conditional classifier p_t(y | x_t): cross-entropy, no samples
    conditional: bool  # a class-conditional model (model.cond=class)
    objective: object = None  # a loss of its own (distilling.ConsistencyObjective), else the denoising loss
    trackers: object = None  # the run's experiment trackers (loggers.Trackers; none chosen: it does nothing)

    def batch(self, step: int, g: torch.Generator):
        """The global batch of `step`: x0 and, for a conditional model, its labels after dropout (for a classifier
        its labels as they are), in the run's memory format; and x1, the noise paired with each x0 (reflow's pairs:
        pairs.PairData), or None where the step draws it."""
        tc, n_classes, x1 = self.cfg.train, self.cfg.model.get("n_classes") or 0, None
        if hasattr(self.data, "pair_batch"):
            x0, x1, y = self.data.pair_batch(step, tc.batch_size)
            y = y if self.conditional else None
        elif self.conditional or self.classify:
            x0, y = self.data.labelled_batch(step, tc.batch_size, g)
        else:
            x0, y = self.data.batch(step, tc.batch_size, g), None
        if self.nhwc:
            x0, x1 = (None if x is None else x.contiguous(memory_format=torch.channels_last) for x in (x0, x1))
        return x0, y if y is None or self.classify else drop_labels(y, n_classes, tc.p_uncond, g), x1


def build_state(cfg: DictConfig, out_dir: Path, path, world, data, net, micro: int, saved: dict | None) -> TrainState:
    """A run's TrainState: `auto` speed settings resolved, optimization built, a saved state restored."""
    tc, device = cfg.train, world.device
    precision, compiled, nhwc = speed_settings(tc, device, data.is_image)
    if nhwc:
        net = net.to(memory_format=torch.channels_last)
    ema, opt, scaler, autocast = build_optimization(cfg, net, device, precision)
    start = restore(saved, net, ema, opt, scaler, device) if saved else 0
    # built after the optimizer state is loaded so that last_epoch restores its LR
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc), last_epoch=start - 1)
    model = distributed.wrap(world, net)
    if compiled:
        model = torch.compile(model)  # state dicts are taken from `net`, so no _orig_mod. prefixes
    return TrainState(cfg, out_dir, path, world, data, net, model, ema, opt, sched, scaler, autocast, precision,
                      compiled, nhwc, micro, start, is_classifier(cfg), cfg.model.get("cond", "none") == "class")
