"""`diffcli sample`: rebuild a model from its checkpoint alone, sample, save samples.npz + a picture."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import DiffcliError, distributed, short
from .data import build_data
from .loading import load_model, pick_device
from .plots import PICTURE_IMAGES, save_field_picture, save_picture, save_trajectory_picture
from .ranges import check_ranges
from .runs import StreamedNpz, progress
from .sampling import Plan, SampleResult, collect, plan
from .scoring import reference_points

log = logging.getLogger("diffcli")


def reference_data(train_cfg: DictConfig, n: int, seed: int) -> torch.Tensor | None:
    """Fresh points of the 2D toy the model was trained on; None for any other data: sample reads no data files,
    and a stored data config never chooses files to read."""
    if train_cfg.data.get("kind") != "toy":
        return None
    data = build_data(train_cfg.data, torch.device("cpu"), seed=seed)
    return None if data.is_image else reference_points(data, n, seed)


def run_sample(cfg: DictConfig, out_dir) -> SampleResult:
    """Sample `cfg.n` points from `cfg.ckpt`; writes samples.npz and pictures into out_dir (rank 0 under torchrun,
    the ranks splitting the batches: sampling.sample_batches). The samples are streamed to the file batch by
    batch; the returned SampleResult holds those the pictures show (all of them for 2D points)."""
    check_ranges(cfg)
    options = cfg.get("sample") or {}
    world = distributed.setup(pick_device(cfg.device))
    try:
        out = _sample(cfg, Path(distributed.shared(world, str(out_dir))), world, bool(options.get("save_trajectory")),
                      bool(options.get("plot_field")))
    except BaseException:
        distributed.teardown(world, wait=False)
        raise
    distributed.teardown(world)
    return out


def _sample(cfg: DictConfig, out_dir: Path, world, trajectory: bool, field: bool) -> SampleResult | None:
    model = load_model(cfg.ckpt, world.device, cfg.get("net_class"))
    if field and model.kind != "points":
        raise DiffcliError("sample.plot_field=true draws 2D fields; this model was trained on images")
    if field and model.config.data.get("kind") != "toy":  # the field is drawn over the toy's own points
        raise DiffcliError(f"sample.plot_field=true draws over the 2D toy a model was trained on; this checkpoint's "
                           f"stored data.kind={short(model.config.data.get('kind'), 24)} is not a toy (damaged or edited)")
    run = plan(cfg, model, world.device)
    if not world.main:  # the other ranks draw their batches and hand them to rank 0
        for _ in run.batches(world, trajectory):
            pass
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    npz = StreamedNpz(out_dir / "samples.npz")
    try:
        out = _stream(run, npz, world, trajectory, keep=run.n if model.kind == "points" else PICTURE_IMAGES)
        npz.add("nfe", out.nfe)
        npz.add("t_grid", out.grid.numpy())
        if run.labels is not None:  # the requested class of every sample
            npz.add("labels", run.labels.numpy())
        if out.trajectory is not None:
            frames = out.trajectory if model.kind == "points" else _thin(out.trajectory)
            npz.add("trajectory", frames.numpy())
            save_trajectory_picture(frames, out_dir / "trajectories.png")
        npz.close()
    except BaseException:
        npz.discard()
        raise
    reference = reference_data(model.config, run.n, cfg.seed) if model.kind == "points" else None
    save_picture(out.samples, out_dir / "samples.png", reference, out.labels)
    if field:
        save_field_picture(model.denoiser, reference, out_dir / "field.png")
    log.info("wrote %s and pictures in %s (%s, NFE %d per sample)", out_dir / "samples.npz", out_dir, out.description,
             out.nfe)
    return out


def _stream(run: Plan, npz: StreamedNpz, world, trajectory: bool, keep: int) -> SampleResult:
    """Write the run's samples into npz as they come; returns the first `keep` of them (with their trajectories,
    16 at most for images) and the run's mean NFE."""
    npz.begin("samples", (run.n, *run.model.shape), "float32")
    kept, nfe = [], []
    done, t0 = 0, time.perf_counter()
    with progress(run.n, "sampling") as bar:
        for batch in run.batches(world, trajectory):
            npz.write(batch.samples.numpy())
            nfe.append(batch.nfe)
            if done < keep:
                kept.append(_first(batch, keep - done, trajectory))
            done += len(batch.samples)
            bar(len(batch.samples))
    npz.end()
    out = collect(kept)
    log.info("sampled %d with %s: %d network evaluations (NFE) per sample, %.1f samples/s", run.n, run.description,
             sum(nfe) // len(nfe), run.n / (time.perf_counter() - t0))
    return dataclasses.replace(out, nfe=sum(nfe) // len(nfe))


def _first(batch: SampleResult, k: int, trajectory: bool) -> SampleResult:
    """The first k samples of a batch (and of its trajectory)."""
    return dataclasses.replace(batch, samples=batch.samples[:k],
                               labels=None if batch.labels is None else batch.labels[:k],
                               trajectory=batch.trajectory[:, :k] if trajectory else None)


def _thin(frames: torch.Tensor, max_frames: int = 21, max_samples: int = 16) -> torch.Tensor:
    """Image trajectories are large: keep a few samples at a few moments."""
    keep = torch.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().long()
    return frames[keep][:, :max_samples]
