"""`diffcli train`: one readable loop, counted in steps.

Every step's randomness (batch, t, noise) comes from a generator seeded by (seed, step), so a
run resumed at step k draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path as FsPath

import torch
from omegaconf import DictConfig

from . import DiffcliError
from .build import CLASSIFIERS, build_net, build_path
from .checkpoint import load_state, load_weights, newest_state, prune, remove_temporaries, save_ema, save_state
from .data import build_data, no_labels
from .ema import EMA, initial_share
from .evaluate import quick_metric
from .summary import read_jsonl
from . import distributed
from .losses import check_coupling, check_weighting, classifier_loss, draw, pair_loss
from .paths import check_times
from .prediction import NoisyClassifier, check_precond, check_prediction
from .sample import (even_labels, generate, model_denoiser, pick_device, pyplot, sampler_config, sampler_description,
                     sampler_from_config, save_picture)
from .schema import TrainApp, check_ranges, resume_overrides, validate

log = logging.getLogger("diffcli")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_STEPS = 1000  # compile=auto: runs this long repay the one-off compile (about a minute on 2 CPU cores)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for one training step: a pure function of (seed, step)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def resume_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict, FsPath, str | None]:
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


class Logger:
    """Loss, LR, gradient norm and throughput to log.jsonl; a progress bar or plain log lines."""

    def __init__(self, out_dir: FsPath, total: int, start: int):
        for name in ("log.jsonl", "eval.jsonl"):  # a resumed run: drop rows logged after its checkpoint
            _truncate(out_dir / name, start)
        self.file = open(out_dir / "log.jsonl", "a")
        self.eval_file = out_dir / "eval.jsonl"
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def tick(self) -> None:
        """One step done: move the bar (host-side only, no device sync)."""
        if self.bar:
            self.bar.advance(self.task)

    def __call__(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        loss = "n/a (every step skipped)" if record["loss"] is None else f"{record['loss']:.4f}"
        info = f"loss {loss}  lr {record['lr']:.2e}  {record['it_per_s']:.1f} it/s"
        if self.bar:
            self.bar.update(self.task, info=info)
        else:
            log.info("step %d  %s  grad %.3f", record["step"], info, record["grad_norm"])

    def metrics(self, step: int, metrics: dict) -> None:
        """An evaluation of the EMA weights (train.eval_every) to eval.jsonl."""
        with open(self.eval_file, "a") as fh:
            fh.write(json.dumps({"step": step} | metrics) + "\n")
        text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        (self.bar.console.log if self.bar else log.info)(f"eval at step {step}: {text}")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
        self.file.close()


def _truncate(file: FsPath, step: int) -> None:
    """Keep the rows of a .jsonl log up to `step` (and drop a half-written last line)."""
    if file.exists():
        file.write_text("".join(json.dumps(row) + "\n" for row in read_jsonl(file) if row["step"] <= step))


def plot_loss(out_dir: FsPath, title: str) -> FsPath:
    """loss.png from log.jsonl, with the eval_every metric beside it when there is one."""
    plt = pyplot()
    rows = [r for r in read_jsonl(out_dir / "log.jsonl") if r.get("loss") is not None]  # null: all steps skipped
    evals = read_jsonl(out_dir / "eval.jsonl")
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    ax.grid(alpha=0.3)
    if evals:
        key = next(k for k, v in evals[0].items() if k != "step" and isinstance(v, float))
        axes[0][1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o")
        axes[0][1].set(xlabel="step", ylabel=key, title=f"{key} of EMA samples (train.eval_every)")
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=120)
    plt.close(fig)
    return out_dir / "loss.png"


_LOCKS: dict[str, object] = {}


def claim_run_dir(out_dir: FsPath) -> None:
    """Hold an exclusive lock on the run folder for this process's life: a second run writing
    into the same folder (the same hydra.run.dir, or train.resume of a running run) is refused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = open(out_dir / ".diffcli.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DiffcliError(f"another diffcli train is writing into {out_dir}; wait for it to finish or give "
                           "another folder (hydra.run.dir=...)") from None
    _LOCKS[str(out_dir.resolve())] = handle  # held until release_run_dir, or the end of the process


def release_run_dir(out_dir: FsPath) -> None:
    handle = _LOCKS.pop(str(out_dir.resolve()), None)
    if handle is not None:
        handle.close()  # closing the file drops the lock


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the end of the current step and exits.

    Stopping between steps (never inside one) is what makes the saved state exact. A second
    signal exits at once (no traceback): a checkpoint being written then stays a temporary file,
    which the next start of the run deletes, so the older checkpoints are untouched.
    """

    def __init__(self):
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None:
            os.write(2, b"diffcli: stopped at once by a second signal; the last checkpoint is the newest complete one\n")
            os._exit(128 + signum)
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def build_model(cfg: DictConfig, device: torch.device, user_class: str | None = None):
    """Data and network of a run (the network from diffcli's classes, or `user_class` named on the command line);
    model.cond=class, or a classifier net, gives the network the data's classes and records them in cfg.model (so
    in checkpoints)."""
    torch.manual_seed(cfg.seed)  # initialisation (and Fourier features); dropout after it
    data = build_data(cfg.data, device, seed=cfg.seed)
    n_classes = 0
    if is_classifier(cfg) and cfg.model.get("cond", "none") == "class":
        raise DiffcliError(f"net={cfg.net._target_.rsplit('.', 1)[-1]} is a classifier of x_t, not a class-conditional "
                           "model: drop model.cond=class")
    if cfg.model.get("cond", "none") == "class" or is_classifier(cfg):
        if not data.n_classes:
            raise no_labels(cfg.data.name)
        n_classes = data.n_classes
        cfg.model.n_classes, cfg.model.class_names = n_classes, data.class_names
    return data, build_net(cfg.net, data.shape, user_class=user_class, n_classes=n_classes).to(device)


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


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 has units of its own here: a CUDA GPU that has bf16, or a CPU with AMX tiles (oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def speed_settings(tc: DictConfig, device: torch.device, is_image: bool) -> tuple[str, bool, bool]:
    """train.precision, train.compile and train.channels_last with `auto` resolved (README, "CPU speed"): for
    image nets where bf16 has units of its own, bf16, compiled on runs that repay the compile, NHWC on CUDA or
    when compiled; fp32 eager elsewhere (without AMX a CPU emulates bf16, 15x slower)."""
    fast = is_image and fast_bf16(device)
    compiled = fast and tc.steps >= COMPILE_STEPS if tc.compile == "auto" else bool(tc.compile)
    precision = ("bf16" if fast else "fp32") if tc.precision == "auto" else tc.precision
    # NHWC: cuDNN's layout; on a CPU only compiled code gains from it (eager bf16 NHWC loses 43%, most of it in
    # torch's channels-last GroupNorm backward: README, "CPU speed")
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
               y: torch.Tensor | None = None, classify: bool = False) -> tuple:
    """One optimizer step on the global batch x0 (labels y, already dropped to "no label" where drawn), this
    rank's share of it in micro-batches of `micro`; `classify`: the cross-entropy of a noise-conditional classifier
    of y instead of the denoising loss.

    Returns (loss, grad_norm, finite) as device tensors; a step whose loss or gradient is not finite
    leaves weights and optimizer state untouched (decided on the device: no host sync).
    """
    x0, x1, t = draw(path, x0, g, model_cfg.get("coupling") or "independent", model_cfg.times)  # the global batch
    accum = x0.shape[0] // (micro * world.size)
    opt.zero_grad(set_to_none=True)
    loss = torch.zeros((), device=x0.device)
    for k in range(accum):
        part = slice((world.rank * accum + k) * micro, (world.rank * accum + k + 1) * micro)
        sync = k == accum - 1 or world.size == 1  # DDP: all-reduce gradients on the last micro-batch only
        inputs = dict(precond=model_cfg.precond, sigma_data=model_cfg.sigma_data)
        with (nullcontext() if sync else model.no_sync()), autocast:
            if classify:
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


class _Silent:
    """The logger of ranks other than 0: they write nothing."""

    def __call__(self, *args):
        pass

    tick = metrics = close = __call__


def run_train(cfg: DictConfig, out_dir, overrides: list[str] = ()) -> dict:
    """Train; checkpoints, log.jsonl, loss.png and sample grids go to out_dir (or the resumed run)."""
    out_dir, state = FsPath(out_dir), None
    cfg = validate(cfg, TrainApp, "diffcli train")  # again: Hydra lets `+key=value` through unchecked
    user_class = cfg.net.get("_target_")  # composed from shipped configs and this command line only
    if cfg.train.get("resume"):
        cfg, state, out_dir, user_class = resume_config(cfg, list(overrides))
        log.info("resuming %s from step %d", out_dir, state["step"])
    path = build_path(cfg.model.path)
    check_train_config(cfg, path)
    for line in schedule_warnings(cfg.train):
        log.warning(line)
    # an invalid sampler would stop the run at its first sample_every, after the work: refuse it now
    sampler_from_config(sampler_config(cfg, cfg.model), path, cfg.data.kind != "toy")
    world = distributed.setup(pick_device(cfg.device))
    out_dir = FsPath(distributed.shared(world, str(out_dir)))
    try:
        out = _train(cfg, out_dir, state, path, world, user_class)
    except BaseException:
        distributed.teardown(world, wait=False)  # no barrier: the other ranks may never reach it
        raise
    finally:
        release_run_dir(out_dir)
    distributed.teardown(world)
    return out


def _train(cfg: DictConfig, out_dir: FsPath, state: dict | None, path, world, user_class=None) -> dict:
    tc, device, ckpt_dir = cfg.train, world.device, out_dir / "checkpoints"
    micro = distributed.micro_batch(world, tc.batch_size, tc.grad_accum)
    if world.main:
        claim_run_dir(out_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(ckpt_dir)
    data, net = build_model(cfg, device, user_class)
    n_classes = cfg.model.get("n_classes") or 0
    conditional, classify = cfg.model.get("cond", "none") == "class", is_classifier(cfg)
    if tc.get("eval_every") and data.is_image and data.labels is None:
        raise DiffcliError(f"train.eval_every={tc.eval_every} scores samples by classifier-FID, which needs labelled "
                           f"images; {cfg.data.name} has none: set train.eval_every=0 and run diffcli eval on checkpoints")
    if not any(p.requires_grad for p in net.parameters()):  # net=oracle: exact already, nothing to fit
        if world.main:
            save_ema(ckpt_dir / "ema_0.safetensors", net.state_dict(), cfg, 0, data.shape)
        log.info("%s has no trainable parameters: wrote %s, nothing to train", cfg.net._target_, ckpt_dir)
        return {"out_dir": str(out_dir), "steps": 0, "loss_curve": None}
    precision, compiled, nhwc = speed_settings(tc, device, data.is_image)
    if nhwc:
        net = net.to(memory_format=torch.channels_last)
    ema, opt, scaler, autocast = build_optimization(cfg, net, device, precision)
    start = restore(state, net, ema, opt, scaler, device) if state else 0
    # built after the optimizer state is loaded so that last_epoch restores its LR
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc), last_epoch=start - 1)
    model = distributed.wrap(world, net)
    if compiled:
        model = torch.compile(model)  # state dicts are taken from `net`, so no _orig_mod. prefixes
    log.info("%s: %s on %s, net %s (%.2fM parameters), device %s x %d, %d steps, batch %d (%d per pass), %s%s%s",
             out_dir, cfg.model.name, cfg.data.name, cfg.net._target_.rsplit(".", 1)[-1],
             sum(p.numel() for p in net.parameters()) / 1e6, device, world.size, tc.steps, tc.batch_size, micro,
             precision, ", compiled" if compiled else "", ", channels-last" if nhwc else "")

    def checkpoint(step: int) -> None:
        save_ema(ckpt_dir / f"ema_{step}.safetensors", ema.net.state_dict(), cfg, step, data.shape)
        save_state(ckpt_dir / f"state_{step}.safetensors", net=net, ema_net=ema.net, optimizer=opt,
                   scaler=scaler if scaler.is_enabled() else None, step=step, cfg=cfg, shape=data.shape)
        prune(ckpt_dir, tc.keep_last)

    def ema_samples(n: int) -> tuple[torch.Tensor, str]:
        """n samples of the EMA weights with the run's sampler, the same noise every time (seed), and what drew them."""
        sampler_cfg = sampler_config(cfg, cfg.model)
        sampler, grid = sampler_from_config(sampler_cfg, path, data.is_image)
        denoiser = model_denoiser(ema.net, path, cfg.model)
        samples = generate(denoiser, sampler, grid, n, data.shape, batch_size=min(n, 1000), seed=cfg.seed,
                           device=device, labels=even_labels(n, cfg.model.get("n_classes") or 0))
        nfe = denoiser.nfe // math.ceil(n / min(n, 1000))
        return samples, f"{sampler_description(sampler, sampler_cfg, grid)}, NFE {nfe}"

    def sample_grid(step: int) -> None:
        ref = None if data.is_image else data.sample(tc.n_samples, torch.Generator(device).manual_seed(cfg.seed))
        samples, how = ema_samples(tc.n_samples)
        title = f"{cfg.model.name} ({cfg.model.prediction}) on {cfg.data.name}: EMA at step {step}\n{how}"
        save_picture(samples, out_dir / f"samples_{step:07d}.png", ref, even_labels(tc.n_samples, n_classes), title)

    def evaluate(step: int) -> None:
        logger.metrics(step, quick_metric(ema_samples(tc.eval_n)[0], data, cfg.data, cfg.seed, device))

    logger, stop = Logger(out_dir, tc.steps, start) if world.main else _Silent(), StopFlag()
    zero = lambda: torch.zeros((), device=device)  # noqa: E731
    # device-side tallies, read at log intervals only: loss of finite steps, their count, skipped steps
    loss_sum, n_finite, skipped, run_of_bad, worst_run = zero(), zero(), zero(), zero(), zero()
    since_log, t_log = 0, time.perf_counter()
    try:
        model.train()
        for step in range(start, tc.steps):
            g = step_generator(cfg.seed, step, device)
            x0, y = data.labelled_batch(step, tc.batch_size, g) if conditional or classify else \
                (data.batch(step, tc.batch_size, g), None)
            if nhwc:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            loss, grad_norm, finite = train_step(model, path, cfg.model, x0, g, opt, scaler, autocast,
                                                 tc.grad_clip, micro, world,
                                                 y if y is None or classify else drop_labels(y, n_classes, tc.p_uncond, g),
                                                 classify)
            sched.step()
            ema.update(net, step)
            loss_sum += torch.where(finite, loss, 0)  # stays on the device: no host sync until the log line
            n_finite += finite
            skipped += ~finite
            run_of_bad = torch.where(finite, 0, run_of_bad + 1)
            worst_run = torch.maximum(worst_run, run_of_bad)
            done, since_log = step + 1, since_log + 1
            logger.tick()
            at_log = done % tc.log_every == 0 or done == tc.steps
            if at_log:
                elapsed, t_log = time.perf_counter() - t_log, time.perf_counter()
                losses = distributed.mean(world, torch.stack([loss_sum, n_finite]))
                mean_loss = (losses[0] / losses[1]).item() if losses[1].item() > 0 else None  # all skipped: no loss
                logger({"step": done, "loss": mean_loss,
                        "lr": sched.get_last_lr()[0], "grad_norm": grad_norm.item(), "it_per_s": since_log / elapsed,
                        "samples_per_s": since_log * tc.batch_size / elapsed, "skipped": int(skipped.item())})
                loss_sum.zero_(), n_finite.zero_()
                since_log = 0
            at_ckpt = done % tc.ckpt_every == 0 or done == tc.steps
            if (at_log or at_ckpt) and worst_run.item() >= tc.max_nonfinite:  # checked before any checkpoint
                raise DiffcliError(
                    f"{int(worst_run.item())} consecutive training steps had a non-finite loss or gradient (by "
                    f"step {done}; train.max_nonfinite={tc.max_nonfinite}): stopped; the last good checkpoint is "
                    f"in {ckpt_dir}; lower train.lr, keep train.grad_clip, or use train.precision=fp32/bf16")
            signalled = stop.signum is not None if world.size == 1 else at_log and distributed.any_rank(
                world, stop.signum is not None)  # every rank must stop after the same step
            if world.main:
                # every run ends with a picture of its samples; a classifier cannot sample
                if tc.sample_every and (done % tc.sample_every == 0 or done == tc.steps) and not classify:
                    sample_grid(done)
                if tc.get("eval_every") and done % tc.eval_every == 0 and not classify:
                    evaluate(done)
                if at_ckpt or signalled:
                    checkpoint(done)
            if signalled:
                signum = stop.signum or signal.SIGTERM
                log.warning("stopped by signal %d: checkpoint at step %d in %s; continue with train.resume=%s",
                            signum, done, ckpt_dir, out_dir)
                raise SystemExit(128 + signum)
    finally:
        stop.restore()
        logger.close()
    if not world.main:
        return {"out_dir": str(out_dir), "steps": tc.steps, "loss_curve": None}
    if classify:
        return _classifier_done(cfg, out_dir, ema.net, path, data, device, int(skipped.item()))
    picture = plot_loss(out_dir, f"{cfg.model.name} ({cfg.model.prediction}) on {cfg.data.name}")
    log.info("done: %s, %s (%d non-finite steps skipped)", ckpt_dir, picture, int(skipped.item()))
    return {"out_dir": str(out_dir), "steps": tc.steps, "loss_curve": str(picture), "skipped": int(skipped.item())}


def _classifier_done(cfg: DictConfig, out_dir: FsPath, net, path, data, device, skipped: int) -> dict:
    """The end of a classifier's run: its accuracy against the noise level (accuracy.json, logged) and its loss."""
    accuracy = noisy_accuracy(net.eval(), path, cfg.model, data, device)
    (out_dir / "accuracy.json").write_text(json.dumps(accuracy, indent=2))
    picture = plot_loss(out_dir, f"classifier p_t(y | x_t) on {cfg.model.name}'s path, {cfg.data.name}")
    log.info("done: %s; accuracy of the EMA classifier on noised data: %s; use it with classifier=%s",
             picture, ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()), out_dir)
    return {"out_dir": str(out_dir), "steps": cfg.train.steps, "loss_curve": str(picture), "skipped": skipped,
            "accuracy": accuracy}
