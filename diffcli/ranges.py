"""The ranges of config values: what a type cannot say ("positive", "one of these names", "at most what a machine
holds"), checked on every composed config and on every stored one before any work (the types are diffcli/schema.py's)."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from . import DiffcliError

# Upper bounds keep a size typed (or read from a stored config) from asking for more memory than any machine has.
MAX_STEPS, MAX_N, MAX_BATCH = 10**6, 10**7, 2**20
EDIT_TASKS = ("inpaint", "colorize", "sdedit", "encode", "decode", "interpolate", "dps")
MAX_CLASSES = 10_000  # a class count sizes the label embedding, and 10,000 names take 2 s to validate
# objective.metric -> (the data it needs, its direction): what diffcli train can score its EMA samples by at the end
OBJECTIVES = {"sliced_wasserstein": ("2D", "minimize"), "mmd": ("2D", "minimize"), "energy_distance": ("2D", "minimize"),
              "modes_covered": ("2D mixture", "maximize"), "in_modes": ("2D mixture", "maximize"),
              "cfid": ("labelled images", "minimize"), "confidence": ("labelled images", "maximize"),
              "class_entropy": ("labelled images", "maximize")}


def objective_direction(metric, direction: str) -> str:
    """minimize or maximize: objective.direction, or with `auto` the metric's own (minimize with no metric)."""
    return direction if direction != "auto" else OBJECTIVES.get(metric, ("", "minimize"))[1]


# key -> (test, what it must be); checked on the composed config (and on a checkpoint's stored one) before any work
RANGES = {
    "train.steps": (lambda v: v > 0, "a positive integer"),
    "train.batch_size": (lambda v: 0 < v <= MAX_BATCH, f"a positive integer <= {MAX_BATCH}"),
    "train.lr": (lambda v: v > 0, "a positive number"),
    "train.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two numbers in [0, 1), e.g. [0.9,0.999]"),
    "train.weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "train.warmup": (lambda v: v >= 0, "an integer >= 0"),
    "train.grad_clip": (lambda v: v is None or v > 0, "a positive number or null (no clipping)"),
    "train.ema.decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.ema.warmup": (lambda v: v >= 0, "an integer >= 0"),
    "train.channels_last": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "train.compile": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "precision": (lambda v: v in ("auto", "fp32", "bf16", "fp16"), "auto, fp32, bf16 or fp16"),
    "compile": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "channels_last": (lambda v: v in ("auto", True, False), "auto, true or false"),
    "train.grad_accum": (lambda v: v > 0, "a positive integer"),
    "train.max_nonfinite": (lambda v: v > 0, "a positive integer"),
    "train.log_every": (lambda v: v > 0, "a positive integer"),
    "train.ckpt_every": (lambda v: v > 0, "a positive integer"),
    "train.sample_every": (lambda v: v >= 0, "an integer >= 0 (0: never)"),
    "train.eval_every": (lambda v: v >= 0, "an integer >= 0 (0: never)"),
    "train.n_samples": (lambda v: 0 < v <= 10_000, "a positive integer <= 10000 (the samples of one picture)"),
    "train.eval_n": (lambda v: 0 < v <= MAX_N, f"a positive integer <= {MAX_N}"),
    "train.keep_last": (lambda v: v >= 0, "an integer >= 0 (0: keep all)"),
    "data.sigma_max": (lambda v: v is None or v > 0, "a positive number (the data's largest pairwise distance)"),
    "model.sigma_data": (lambda v: v > 0, "a positive number (the data's standard deviation)"),
    "model.snr_gamma": (lambda v: v > 0, "a positive number"),
    "metric.straightness_n": (lambda v: 0 < v <= MAX_N, f"a positive integer <= {MAX_N}"),
    "metric.straightness_steps": (lambda v: 0 < v <= 100_000, "a positive integer"),
    "sample_steps": (lambda v: 0 < v <= 1000, "a positive integer (1-4 for a distilled model)"),
    "reflow.n": (lambda v: 0 < v <= MAX_N, f"a positive integer <= {MAX_N}"),
    "reflow.part_size": (lambda v: 0 < v <= MAX_BATCH, f"a positive integer <= {MAX_BATCH}"),
    "consistency.N": (lambda v: 2 <= v <= 10_000, "an integer >= 2 (the levels of the teacher's ODE)"),
    "consistency.mu": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "model.sigma_min": (lambda v: v is None or v >= 0, "a number >= 0 (the consistency model's boundary noise level)"),
    "model.times.mean": (lambda v: True, "a finite number or null"),
    "model.times.std": (lambda v: v is None or v > 0, "a positive number or null"),
    "model.cond": (lambda v: v in ("none", "class"), "none or class (a class-conditional model)"),
    "train.p_uncond": (lambda v: 0 <= v <= 1, "a number in [0, 1] (the share of labels dropped; 0.1 is usual)"),
    "label": (lambda v: v is None or v >= 0, "a class index >= 0"),
    "labels": (lambda v: v is None or (len(v) > 0 and all(c >= 0 for c in v)), "a non-empty list of class indices"),
    "guidance_interval": (lambda v: v is None or (len(v) == 2 and 0 <= v[0] < v[1]),
                          "[lo, hi] with 0 <= lo < hi, noise levels sigma/alpha (e.g. [0.28,5.42])"),
    "classifier_scale": (lambda v: v >= 0, "a number >= 0 (0: no classifier guidance, 1: Bayes' conditional)"),
    "guidance": (lambda v: v >= 0, "a number >= 0 (0: unconditional, 1: conditional, > 1: guided)"),
    "steps": (lambda v: v is None or 0 < v <= MAX_STEPS, f"a positive integer <= {MAX_STEPS} (or null for the "
              "sampler's default)"),
    "sampler.steps": (lambda v: v is None or 0 < v <= MAX_STEPS, f"a positive integer <= {MAX_STEPS} or null"),
    "sampler.default_steps": (lambda v: v is None or 0 < v <= MAX_STEPS, f"a positive integer <= {MAX_STEPS} or null"),
    "sampler.continuous_steps": (lambda v: v is None or 0 < v <= MAX_STEPS,
                                 f"a positive integer <= {MAX_STEPS} or null"),
    "eta": (lambda v: v >= 0, "a number >= 0 (0: deterministic DDIM, 1: DDPM-like)"),
    "n": (lambda v: v is None or 0 < v <= MAX_N, f"a positive integer <= {MAX_N}"),
    "batch_size": (lambda v: v is None or 0 < v <= MAX_BATCH, f"a positive integer <= {MAX_BATCH} (or null for the "
                   "data's default)"),
    "task": (lambda v: v in EDIT_TASKS, f"one of {', '.join(EDIT_TASKS)}"),
    "method": (lambda v: v in ("replace", "repaint", "dps"), "replace, repaint or dps (task=inpaint)"),
    "strength": (lambda v: 0 <= v <= 1, "a number in [0, 1] (0: the input unchanged, 1: a fresh sample)"),
    "jump_length": (lambda v: 0 < v <= MAX_STEPS, "a positive integer (RePaint's jump length; 10 in the paper)"),
    "jump_n_sample": (lambda v: 0 < v <= 1000, "a positive integer <= 1000 (RePaint's resamplings; 1: none)"),
    "sigma_y": (lambda v: v >= 0, "a number >= 0 (the measurement noise)"),
    "scale": (lambda v: v >= 0, "a number >= 0 (DPS's step size)"),
    "frames": (lambda v: 2 <= v <= 1000, "an integer in [2, 1000]"),
    "metric.batch_size": (lambda v: v > 0, "a positive integer"),
    "metric.kid_subsets": (lambda v: v > 0, "a positive integer"),
    "metric.kid_subset_size": (lambda v: v > 1, "an integer > 1"),
    "metric.nll_n": (lambda v: v > 0, "a positive integer"),
    "metric.probes": (lambda v: v > 0, "a positive integer"),
    "metric.rtol": (lambda v: v > 0, "a positive number"),
    "metric.atol": (lambda v: v > 0, "a positive number"),
    "metric.n_reference": (lambda v: v is None or v > 0, "a positive integer or null (all)"),
    "metric.classifier_epochs": (lambda v: v is None or v > 0, "a positive integer or null"),
    "objective.metric": (lambda v: v is None or v in OBJECTIVES, f"null or one of {', '.join(OBJECTIVES)}"),
    "objective.direction": (lambda v: v in ("auto", "minimize", "maximize"), "auto, minimize or maximize"),
    "logger.flush_timeout": (lambda v: v >= 0, "a number of seconds >= 0"),
    "logger.wandb.mode": (lambda v: v in ("offline", "online", "disabled"), "offline, online or disabled"),
}


def check_ranges(cfg: DictConfig) -> None:
    """One line for the first value out of its range (NaN and infinities included)."""
    from omegaconf import OmegaConf

    for key, (ok, what) in RANGES.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        numbers = value if isinstance(value, list) else [value]
        finite = all(not isinstance(v, float) or math.isfinite(v) for v in numbers)
        if not (finite and ok(value)):
            raise DiffcliError(f"{key}={value} must be {what}")


def check_distill_ranges(cfg: DictConfig) -> None:
    """check_ranges of a distill command line: its `method` is not edit's, and its `train` keys (null: the
    teacher's) are checked on the student's config, once merged."""
    from omegaconf import OmegaConf

    check_ranges(OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("method", "train")]))
