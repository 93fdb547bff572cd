"""`diffcli eval`: score a checkpoint the way the field does, record everything needed to reproduce it.

The metrics are diffcli/scoring.py's; `diffcli summary <dir>` gathers a sweep's metrics.json files into one table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import DiffcliError, distributed
from .data import build_data, located
from .loading import load_model, pick_device
from .loggers import RunInfo, Sweep, Trackers, check_installed
from .plots import PICTURE_IMAGES, save_picture
from .ranges import check_ranges
from .runs import fmt, progress, write_text
from .sampling import Plan, SampleResult, collect, given_conditions, plan
from .scoring import (MODEL_METRICS, ImageScores, nll_2d, reference_points, resolve_names, straightness_score,
                      toy_agreement, toy_metrics)

log = logging.getLogger("diffcli")


def run_eval(cfg: DictConfig, out_dir, overrides=(), sweep: Sweep | None = None) -> dict | None:
    """Writes metrics.json and samples.png into out_dir and prints the metrics as a table (rank 0 under torchrun,
    the ranks splitting the sampling: sampling.sample_batches; the other ranks return None); logger=... hands the
    metrics to the trackers, joining the training run's own tracker run where there is one."""
    check_ranges(cfg)
    check_installed(cfg.get("logger"))
    world = distributed.setup(pick_device(cfg.device))
    try:
        record = _eval(cfg, Path(distributed.shared(world, str(out_dir))), world)
    except BaseException:
        distributed.teardown(world, wait=False)
        raise
    distributed.teardown(world)
    if record is not None:
        _track(cfg, Path(out_dir), record, list(overrides), sweep)
    return record


def _track(cfg: DictConfig, out_dir: Path, record: dict, overrides: list, sweep: Sweep | None) -> None:
    """The evaluation's metrics at its checkpoint's step (eval/<name>), its picture and metrics.json, to the
    trackers; the training run's folder (a checkpoint under <run>/checkpoints/) names the tracker run to join."""
    run_dir = Path(record["ckpt"]).parent.parent
    joins = run_dir if (run_dir / "log.jsonl").exists() else None
    trackers = Trackers(cfg.get("logger"), RunInfo(out_dir, "eval", OmegaConf.to_container(cfg, resolve=True),
                                                   overrides, sweep, joins=joins))
    step = record["step"] or 0
    trackers.scalars(step, {f"eval/{k}": v for k, v in record["metrics"].items()})
    if (out_dir / "samples.png").exists():  # none for a likelihood alone
        trackers.picture(step, "eval_samples", out_dir / "samples.png")
    trackers.artifact(out_dir / "metrics.json")
    trackers.close()


def _eval(cfg: DictConfig, out_dir: Path, world) -> dict | None:
    mc, t0, device = cfg.metric, time.perf_counter(), world.device
    model = load_model(cfg.ckpt, device, cfg.get("net_class"))
    train_cfg, is_image = model.config, model.kind == "images"
    data_cfg, data, names = _data_and_names(cfg, model)
    sampling = bool(set(names) - MODEL_METRICS)
    if not sampling and given_conditions(cfg):  # a likelihood of real data under the bare model: nothing to steer
        raise DiffcliError(f"metric={'/'.join(names)} scores real data under the unconditional model, so "
                           f"{' '.join(given_conditions(cfg))} would be ignored: drop it, or add a sample metric")
    run = plan(cfg, model, device) if sampling else None
    if not world.main:  # the other ranks draw their batches and hand them to rank 0
        for _ in run.batches(world) if run else ():
            pass
        return None
    # images: the feature nets load (and a missing weights file fails) before any sampling
    scores = ImageScores(names, data_cfg, mc, cfg.seed, device) if is_image else None
    record = {"ckpt": str(model.file), "step": model.step, "data": train_cfg.data.name, "model": train_cfg.model.name,
              "sampler": None, "steps": None, "nfe": None, "n": None, "seed": cfg.seed}
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, shown = {}, None
    if run is not None:
        shown = _sample_and_score(run, world, scores, keep=PICTURE_IMAGES if is_image else run.n)
        record |= {"sampler": shown.sampler, "steps": shown.steps, "nfe": shown.nfe, "n": run.n,
                   "speed": str(run.speed)}
        if run.labels is not None or given_conditions(cfg):  # autoguidance of an unconditional model too
            record |= {"guidance": shown.guidance, "classifier_scale": shown.classifier_scale,
                       "labels": None if run.labels is None else sorted(set(run.labels.tolist()))}
    if "straightness" in names:  # first: a consistency model is refused before minutes of sampling are scored
        metrics |= straightness_score(model.denoiser, model.shape, mc, cfg.seed)
    if is_image:
        metrics |= scores.scores(model.denoiser)
        if shown is not None:
            save_picture(shown.samples, out_dir / "samples.png", labels=shown.labels)
    else:
        if shown is not None:
            samples, labels = shown.samples, shown.labels
            reference = reference_points(data, cfg.n, cfg.seed)  # as sample's and train's reference
            metrics |= toy_metrics(samples, reference, data, names)
            if labels is not None:
                metrics |= toy_agreement(train_cfg.data, samples, labels)
            save_picture(samples, out_dir / "samples.png", reference, labels)
        if "nll" in names:
            metrics |= nll_2d(model.denoiser, data, train_cfg.data, mc, cfg.seed)
    record |= {"metrics": metrics, "metric_settings": OmegaConf.to_container(mc, resolve=True),
               "seconds": round(time.perf_counter() - t0, 2)}
    write_text(out_dir / "metrics.json", json.dumps(record, indent=2))  # a killed eval leaves none, not half of one
    print_table(record)
    log.info("wrote %s", out_dir / "metrics.json")
    return record


def _data_and_names(cfg: DictConfig, model):
    """(the real data's config: the checkpoint's with this command's root/path/download, the data set or None, the
    metric names). Images are read only where a metric needs them (ImageScores), here only when `auto` asks whether
    they have labels; a 2D toy is generated, never read."""
    is_image, names = model.kind == "images", cfg.metric.names
    requested = OmegaConf.to_object(names) if OmegaConf.is_list(names) else names
    auto = requested in ("auto", ["auto"])
    if not auto:  # a metric of the wrong kind is refused before any data is located or read
        resolve_names(requested, is_image, None)
    data_cfg = located(model.config.data, cfg.data, model.kind)
    data = build_data(data_cfg, torch.device("cpu"), seed=cfg.seed) if auto or not is_image else None
    return data_cfg, data, resolve_names(requested, is_image, data)


def _sample_and_score(run: Plan, world, scores: ImageScores | None, keep: int) -> SampleResult:
    """Draw the run's samples batch by batch, handing each to `scores` (images); returns the first `keep` samples
    (the picture's; for 2D points all of them) with the run's mean NFE."""
    kept, nfe, done = [], [], 0
    t0 = time.perf_counter()
    with progress(run.n, "sampling") as bar:
        for batch in run.batches(world):
            if scores is not None:
                scores.add(batch.samples, batch.labels)
            if done < keep:
                kept.append(dataclasses.replace(batch, samples=batch.samples[: keep - done],
                                                labels=None if batch.labels is None else batch.labels[: keep - done]))
            done += len(batch.samples)
            nfe.append(batch.nfe)
            bar(len(batch.samples))
    log.info("sampled %d with %s: %d network evaluations (NFE) per sample, %.1f samples/s", run.n, run.description,
             sum(nfe) // len(nfe), run.n / (time.perf_counter() - t0))
    return dataclasses.replace(collect(kept), nfe=sum(nfe) // len(nfe))


def print_table(record: dict) -> None:
    """The metrics of one evaluation as a rich table."""
    from rich.console import Console
    from rich.table import Table

    how = f"{record['sampler']}, {record['steps']} steps, NFE {record['nfe']}, n={record['n']}" if record["sampler"] else ""
    table = Table(title=f"{record['model']} on {record['data']}, step {record['step']}" + (f"\n{how}" if how else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in record["metrics"].items():
        table.add_row(key, fmt(value))
    Console().print(table)
