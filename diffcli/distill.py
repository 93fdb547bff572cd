"""`diffcli distill`: a few-step student of a trained teacher, written as an ordinary training run whose checkpoints
sample, eval and edit use like any other (docs/guides/distillation.md).

- method=reflow (Liu et al. 2023, sec. 2.2): pairs (unit noise x1, the teacher's ODE endpoint from it) are drawn to
  a pair folder (pairs.py; a killed draw continues there, later runs reuse it), then a flow is trained on them with
  the coupling they fix; the student samples with Euler on a few equal steps.
- method=consistency (Song et al. 2023, Alg. 2): a consistency model trained on the teacher's data against one
  teacher ODE step between adjacent levels and an EMA target; the student samples with multistep consistency
  sampling.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from .distilling import (check_method, check_pair_sampler, student_config, student_init, teacher_record)
from .fitting import fit
from .loading import load_model, pick_device
from .loggers import Sweep
from .pairs import draw_pairs
from .ranges import check_distill_ranges
from .runs import claim_run_dir, release_run_dir
from .sampling import sampler_config, sampler_description, sampler_from_config
from .schema import DistillApp, validate

log = logging.getLogger("diffcli")


def run_distill(cfg: DictConfig, out_dir, overrides=(), sweep: Sweep | None = None) -> dict:
    """Distil cfg.teacher by cfg.method into out_dir; returns fit's summary with the student's config (`overrides`
    and `sweep` name the run to its trackers, logger=...)."""
    cfg = validate(cfg, DistillApp, "diffcli distill")
    check_distill_ranges(cfg)
    out_dir = Path(out_dir)
    teacher = load_model(cfg.teacher, pick_device(cfg.device), cfg.net_class)
    check_method(cfg, teacher)
    record = teacher_record(cfg, teacher)
    if cfg.method == "reflow":
        record |= _reflow_pairs(cfg, teacher, out_dir)
    student = student_config(cfg, teacher, record)
    log.info("distilling %s (step %d, %s) by %s into %s", teacher.file, teacher.step, teacher.config.model.name,
             cfg.method, out_dir)
    init = student_init(cfg, teacher, student)
    out = fit(student, out_dir, None, user_class=cfg.net_class, init=init, overrides=overrides, sweep=sweep,
              command="distill")
    return out | {"config": student}


def _reflow_pairs(cfg: DictConfig, teacher, out_dir: Path) -> dict:
    """Draw (or continue, or reuse) the teacher's pairs; returns their part of the `distill` record."""
    sampler_cfg = sampler_config(cfg, teacher.config.model)
    path, is_image = teacher.denoiser.path, teacher.kind == "images"
    sampler, grid = sampler_from_config(sampler_cfg, path, is_image, teacher.config.model.get("sampler_options"))
    check_pair_sampler(sampler, sampler.func.__name__)
    how = sampler_description(sampler, sampler_cfg, grid)
    folder = Path(cfg.reflow.pairs) if cfg.reflow.pairs else out_dir / "pairs"
    claim_run_dir(folder)  # one draw at a time into a folder
    try:
        settings = draw_pairs(folder, teacher.denoiser, sampler, grid, cfg.reflow.n, teacher.shape,
                              part_size=cfg.reflow.part_size, seed=cfg.seed, device=teacher.denoiser.device,
                              settings={"teacher": str(Path(teacher.file).resolve()), "teacher_step": teacher.step, "sampler": how},
                              n_classes=teacher.n_classes, guidance=float(cfg.guidance))
    finally:
        release_run_dir(folder)
    return {"sampler": how, "nfe": settings.get("nfe"), "pairs": str(folder.resolve()), "n_pairs": cfg.reflow.n}
