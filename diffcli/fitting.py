"""The training loop that `diffcli train` and `diffcli distill` share: one readable loop, counted in steps, over a
TrainState (diffcli/training.py): each step draws its batch, takes one optimizer step and updates the EMA; logging,
the non-finite check, pictures, evaluations and checkpoints are named functions around it (the shape of NVlabs/edm's
training_loop)."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import DiffcliError, distributed
from .build import build_path
from .checkpoint import load_weights, prune, remove_temporaries, save_ema, save_state
from .data import config_kind
from .distilling import ConsistencyObjective, pair_data
from .loading import load_model, model_denoiser, pick_device
from .loggers import RunInfo, Sweep, Trackers, check_installed
from .plots import plot_loss, save_picture
from .ranges import objective_direction
from .runs import Logger, Silent, StopFlag, claim_run_dir, read_jsonl, release_run_dir, write_text
from .sampling import (at_speed, even_labels, generate, inference_speed, sampler_config, sampler_description,
                       sampler_from_config)
from .scoring import check_objective, final_metrics, quick_metric
from .training import (Tally, TrainState, build_model, build_state, check_train_config, noisy_accuracy,
                       schedule_warnings, step_generator, train_step)

log = logging.getLogger("diffcli")


def fit(cfg: DictConfig, out_dir, saved: dict | None = None, user_class: str | None = None,
        init: dict | None = None, overrides=(), sweep: Sweep | None = None, command: str = "train") -> dict:
    """Train the run `cfg` describes into out_dir (from the training state `saved`, if resumed; else from the
    weights `init`, a distilled student's teacher's, if given); the `command` that asks, its `overrides` and its
    `sweep` name it to the trackers."""
    out_dir = Path(out_dir)
    path = build_path(cfg.model.path)
    check_train_config(cfg, path)
    check_installed(cfg.get("logger"))
    for line in schedule_warnings(cfg.train):
        log.warning(line)
    # an invalid sampler would stop the run at its first sample_every, after the work: refuse it now
    sampler_from_config(sampler_config(cfg, cfg.model), path, config_kind(cfg.data) == "images", cfg.model.get(
        "sampler_options"))
    world = distributed.setup(pick_device(cfg.device))
    out_dir = Path(distributed.shared(world, str(out_dir)))
    try:
        out = _train(cfg, out_dir, saved, path, world, user_class, init, RunInfo(
            out_dir, command, OmegaConf.to_container(cfg, resolve=True), list(overrides), sweep))
    except BaseException:
        distributed.teardown(world, wait=False)  # no barrier: the other ranks may never reach it
        raise
    finally:
        release_run_dir(out_dir)
    distributed.teardown(world)
    return out


def _train(cfg: DictConfig, out_dir: Path, saved: dict | None, path, world, user_class=None, init=None,
           run: RunInfo | None = None) -> dict:
    """Set up the run's folder and state, then the loop; a network with nothing to fit is saved as it is."""
    tc, ckpt_dir = cfg.train, out_dir / "checkpoints"
    micro = distributed.micro_batch(world, tc.batch_size, tc.grad_accum)
    if world.main:
        claim_run_dir(out_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(ckpt_dir)
    method = cfg.distill.method if cfg.get("distill") else None
    data = pair_data(cfg, world.device) if method == "reflow" else None
    data, net = build_model(cfg, world.device, user_class, fits=saved["net"] if saved else None, data=data)
    if init is not None and saved is None:
        load_weights(net, init, "the teacher's weights")
    check_objective(cfg.get("objective"), data)
    if tc.get("eval_every") and data.is_image and data.labels is None:
        raise DiffcliError(f"train.eval_every={tc.eval_every} scores samples by classifier-FID, which needs labelled "
                           f"images; {cfg.data.name} has none: set train.eval_every=0 and run diffcli eval on checkpoints")
    if not any(p.requires_grad for p in net.parameters()):  # net=oracle: exact already, nothing to fit
        if world.main:
            save_ema(ckpt_dir / "ema_0.safetensors", net.state_dict(), cfg, 0, data.shape)
        log.info("%s has no trainable parameters: wrote %s, nothing to train", cfg.net._target_, ckpt_dir)
        return {"out_dir": str(out_dir), "steps": 0, "loss_curve": None}
    s = build_state(cfg, out_dir, path, world, data, net, micro, saved)
    if method == "consistency":
        teacher = load_model(cfg.distill.teacher, world.device, user_class)  # train.resume reads it again
        s.objective = ConsistencyObjective(cfg, s.net, path, teacher)
        if saved and saved["target"]:
            load_weights(s.objective.target_net, saved["target"], "its target network")
    log.info("%s: %s on %s, net %s (%.2fM parameters), device %s x %d, %d steps, batch %d (%d per pass), %s%s%s",
             out_dir, cfg.model.name, cfg.data.name, cfg.net._target_.rsplit(".", 1)[-1],
             sum(p.numel() for p in net.parameters()) / 1e6, world.device, world.size, tc.steps, tc.batch_size, micro,
             s.precision, ", compiled" if s.compiled else "", ", channels-last" if s.nhwc else "")
    s.trackers = Trackers(cfg.get("logger") if world.main else None, dataclasses.replace(run, start=s.start))
    s.trackers.wait_open()
    try:
        out = _loop_and_finish(s)
    except BaseException as e:
        s.trackers.close("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    s.trackers.close()
    return out


def _loop_and_finish(s: TrainState) -> dict:
    """The loop, then (rank 0) the loss curve, the final evaluation of objective.metric and the trackers' files."""
    cfg, out_dir, tally = s.cfg, s.out_dir, Tally(s.world.device)
    training_loop(s, tally)
    if not s.world.main:
        return {"out_dir": str(out_dir), "steps": cfg.train.steps, "loss_curve": None}
    skipped = int(tally.skipped.item())
    if s.classify:
        return _classifier_done(s, skipped)
    picture = plot_loss(out_dir, f"{cfg.model.name} ({cfg.model.prediction}) on {cfg.data.name}")
    record = final_evaluation(s)
    _hand_over(s, picture, record)
    log.info("done: %s, %s (%d non-finite steps skipped)", out_dir / "checkpoints", picture, skipped)
    return {"out_dir": str(out_dir), "steps": cfg.train.steps, "loss_curve": str(picture), "skipped": skipped,
            "objective": record["objective"]["value"] if record else None}


def final_evaluation(s: TrainState) -> dict | None:
    """metrics.json of a run with an objective.metric: train.eval_n EMA samples scored by scoring.final_metrics (the
    record of diffcli eval, plus the objective's value, which diffcli train returns to Hydra's sweeper)."""
    cfg = s.cfg
    metric = (cfg.get("objective") or {}).get("metric")
    if metric is None:
        return None
    samples, how = ema_samples(s, cfg.train.eval_n)
    metrics = final_metrics(samples, s.data, cfg.data, cfg.seed, s.world.device)
    value = float(metrics[metric])
    record = {"ckpt": str(s.out_dir / "checkpoints" / f"ema_{cfg.train.steps}.safetensors"), "step": cfg.train.steps,
              "data": cfg.data.name, "model": cfg.model.name, "sampler": how, "n": cfg.train.eval_n, "seed": cfg.seed,
              "metrics": metrics, "objective": {"metric": metric, "value": value,
                                                "direction": objective_direction(metric, cfg.objective.direction)}}
    write_text(s.out_dir / "metrics.json", json.dumps(record, indent=2))
    log.info("objective %s = %.6g (%s, %d EMA samples): %s", metric, value, record["objective"]["direction"],
             cfg.train.eval_n, s.out_dir / "metrics.json")
    return record


def _hand_over(s: TrainState, picture: Path, record: dict | None) -> None:
    """The trackers' end of a run: its final metrics, loss curve, logs, metrics.json and newest EMA checkpoint."""
    rows = read_jsonl(s.out_dir / "log.jsonl")
    evals = read_jsonl(s.out_dir / "eval.jsonl")
    final = {"loss": rows[-1]["loss"]} if rows and rows[-1].get("loss") is not None else {}
    final |= {k: v for k, v in (evals[-1] if evals else {}).items() if k != "step"}
    s.trackers.finish(final | (record["metrics"] if record else {}))
    newest = s.out_dir / "checkpoints" / f"ema_{s.cfg.train.steps}.safetensors"
    for file in (picture, s.out_dir / "log.jsonl", s.out_dir / "metrics.json", newest):
        if file.exists():
            s.trackers.artifact(file)


def training_loop(s: TrainState, tally: Tally) -> None:
    """Steps s.start .. train.steps; a signal stops it after the current step, with a checkpoint."""
    tc, world = s.cfg.train, s.world
    logger, stop = Logger(s.out_dir, tc.steps, s.start, s.trackers) if world.main else Silent(), StopFlag()
    try:
        s.model.train()
        for step in range(s.start, tc.steps):
            g = step_generator(s.cfg.seed, step, world.device)
            x0, y, x1 = s.batch(step, g)
            loss, grad_norm, finite = train_step(s.model, s.path, s.cfg.model, x0, g, s.opt, s.scaler, s.autocast,
                                                 tc.grad_clip, s.micro, world, y, s.classify, x1, s.objective)
            if s.objective is not None:
                s.objective.after_step(s.net)  # the target network follows the student (its own EMA)
            s.sched.step()
            s.ema.update(s.net, step)
            tally.add(loss, finite)  # stays on the device: no host sync until the log line
            done = step + 1
            logger.tick()
            at_log = done % tc.log_every == 0 or done == tc.steps
            at_ckpt = done % tc.ckpt_every == 0 or done == tc.steps
            if at_log:
                log_progress(s, logger, tally, done, grad_norm)
            if at_log or at_ckpt:  # checked before any checkpoint
                check_nonfinite(s, tally, done)
            signalled = stop.signum is not None if world.size == 1 else at_log and distributed.any_rank(
                world, stop.signum is not None)  # every rank must stop after the same step
            if world.main:
                maintenance(s, logger, done, save=at_ckpt or signalled)
            if signalled:
                stopped(s, stop.signum or signal.SIGTERM, done)
    finally:
        stop.restore()
        logger.close()


def log_progress(s: TrainState, logger, tally: Tally, done: int, grad_norm: torch.Tensor) -> None:
    """One log.jsonl row: the mean loss of the finite steps since the last row (all ranks), LR, throughput."""
    now = time.perf_counter()
    elapsed, tally.t_log = now - tally.t_log, now
    losses = distributed.mean(s.world, torch.stack([tally.loss_sum, tally.n_finite]))
    mean_loss = (losses[0] / losses[1]).item() if losses[1].item() > 0 else None  # all skipped: no loss
    since = tally.since_log
    logger({"step": done, "loss": mean_loss, "lr": s.sched.get_last_lr()[0], "grad_norm": grad_norm.item(),
            "it_per_s": since / elapsed, "samples_per_s": since * s.cfg.train.batch_size / elapsed,
            "skipped": int(tally.skipped.item())})
    tally.loss_sum.zero_(), tally.n_finite.zero_()
    tally.since_log = 0


def check_nonfinite(s: TrainState, tally: Tally, done: int) -> None:
    """Stop the run after train.max_nonfinite consecutive non-finite steps (each one was skipped)."""
    tc = s.cfg.train
    if tally.worst_run.item() >= tc.max_nonfinite:
        raise DiffcliError(
            f"{int(tally.worst_run.item())} consecutive training steps had a non-finite loss or gradient (by "
            f"step {done}; train.max_nonfinite={tc.max_nonfinite}): stopped; the last good checkpoint is "
            f"in {s.out_dir / 'checkpoints'}; lower train.lr, keep train.grad_clip, or use train.precision=fp32/bf16")


def maintenance(s: TrainState, logger, done: int, save: bool) -> None:
    """Rank 0 after a step: the sample picture (every run ends with one; a classifier cannot sample), the
    evaluation of train.eval_every, the checkpoint."""
    tc = s.cfg.train
    if tc.sample_every and (done % tc.sample_every == 0 or done == tc.steps) and not s.classify:
        sample_grid(s, done)
    if tc.get("eval_every") and done % tc.eval_every == 0 and not s.classify:
        logger.metrics(done, quick_metric(ema_samples(s, tc.eval_n)[0], s.data, s.cfg.data, s.cfg.seed,
                                          s.world.device))
    if save:
        checkpoint(s, done)


def checkpoint(s: TrainState, step: int) -> None:
    """ema_<step> (what sample needs) and state_<step> (what resume needs), then the oldest pruned."""
    ckpt_dir, shape = s.out_dir / "checkpoints", s.data.shape
    save_ema(ckpt_dir / f"ema_{step}.safetensors", s.ema.net.state_dict(), s.cfg, step, shape)
    save_state(ckpt_dir / f"state_{step}.safetensors", net=s.net, ema_net=s.ema.net, optimizer=s.opt,
               scaler=s.scaler if s.scaler.is_enabled() else None, step=step, cfg=s.cfg, shape=shape,
               target_net=None if s.objective is None else s.objective.target_net)
    prune(ckpt_dir, s.cfg.train.keep_last)


def ema_samples(s: TrainState, n: int) -> tuple[torch.Tensor, str]:
    """n samples of the EMA weights with the run's sampler, the same noise every time (seed), and what drew them."""
    cfg = s.cfg
    sampler_cfg = sampler_config(cfg, cfg.model)
    sampler, grid = sampler_from_config(sampler_cfg, s.path, s.data.is_image)
    # the network as sampling runs it here (hardware.bf16_pays "sample"), in the layout it trains in, never compiled
    speed = inference_speed({"compile": False, "channels_last": s.nhwc}, s.world.device, s.data.is_image, 0)
    out = generate(at_speed(model_denoiser(s.ema.net, s.path, cfg.model), speed), sampler, grid, n, s.data.shape,
                   batch_size=min(n, 1000), seed=cfg.seed, device=s.world.device,
                   labels=even_labels(n, cfg.model.get("n_classes") or 0))
    return out.samples, f"{sampler_description(sampler, sampler_cfg, grid)}, NFE {out.nfe}"


def sample_grid(s: TrainState, step: int) -> None:
    """samples_<step>.png: EMA samples (over fresh data for 2D), titled with what drew them."""
    cfg, data, n = s.cfg, s.data, s.cfg.train.n_samples
    ref = None if data.is_image else data.sample(n, torch.Generator(s.world.device).manual_seed(cfg.seed))
    samples, how = ema_samples(s, n)
    title = f"{cfg.model.name} ({cfg.model.prediction}) on {cfg.data.name}: EMA at step {step}\n{how}"
    file = save_picture(samples, s.out_dir / f"samples_{step:07d}.png", ref,
                        even_labels(n, cfg.model.get("n_classes") or 0), title)
    if s.trackers is not None:
        s.trackers.picture(step, "samples", file)


def stopped(s: TrainState, signum: int, done: int) -> None:
    """The end of a run stopped by a signal: its checkpoint is written; say how to continue."""
    log.warning("stopped by signal %d: checkpoint at step %d in %s; continue with train.resume=%s",
                signum, done, s.out_dir / "checkpoints", s.out_dir)
    raise SystemExit(128 + signum)


def _classifier_done(s: TrainState, skipped: int) -> dict:
    """The end of a classifier's run: its accuracy against the noise level (accuracy.json, logged) and its loss."""
    cfg, out_dir = s.cfg, s.out_dir
    accuracy = noisy_accuracy(s.ema.net.eval(), s.path, cfg.model, s.data, s.world.device)
    write_text(out_dir / "accuracy.json", json.dumps(accuracy, indent=2))
    picture = plot_loss(out_dir, f"classifier p_t(y | x_t) on {cfg.model.name}'s path, {cfg.data.name}")
    log.info("done: %s; accuracy of the EMA classifier on noised data: %s; use it with classifier=%s",
             picture, ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()), out_dir)
    return {"out_dir": str(out_dir), "steps": cfg.train.steps, "loss_curve": str(picture), "skipped": skipped,
            "accuracy": accuracy}
