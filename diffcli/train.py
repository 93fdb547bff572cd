"""`diffcli train`: a config (or a run to resume) handed to the training loop (diffcli/fitting.py)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from .fitting import fit
from .loggers import Sweep
from .schema import TrainApp, validate
from .training import resume_config

log = logging.getLogger("diffcli")


def run_train(cfg: DictConfig, out_dir, overrides: list[str] = (), sweep: Sweep | None = None) -> dict:
    """Train; checkpoints, log.jsonl, loss.png and sample grids go to out_dir (or the resumed run); with an
    objective.metric also metrics.json, whose value the result's "objective" holds (for Hydra's sweeper)."""
    saved = None
    cfg = validate(cfg, TrainApp, "diffcli train")  # again: Hydra lets `+key=value` through unchecked
    user_class = cfg.net.get("_target_")  # composed from shipped configs and this command line only
    if cfg.train.get("resume"):
        cfg, saved, out_dir, user_class = resume_config(cfg, list(overrides))
        log.info("resuming %s from step %d", out_dir, saved["step"])
    return fit(cfg, out_dir, saved, user_class, overrides=overrides, sweep=sweep)
