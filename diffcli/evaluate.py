"""`diffcli eval`: score a checkpoint the way the field does, record everything needed to reproduce it.

The metrics are diffcli/scoring.py's; `diffcli summary <dir>` gathers a sweep's metrics.json files into one table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .data import build_data
from .loading import load_model, pick_device
from .plots import save_picture
from .runs import fmt
from .sampling import draw
from .schema import check_ranges
from .scoring import LIKELIHOODS, image_metrics, nll_2d, resolve_names, toy_agreement, toy_metrics

log = logging.getLogger("diffcli")


def run_eval(cfg: DictConfig, out_dir) -> dict:
    """Writes metrics.json and samples.png into out_dir and prints the metrics as a table."""
    check_ranges(cfg)
    mc, t0 = cfg.metric, time.perf_counter()
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, device, cfg.get("net_class"))
    train_cfg = model.config
    data = build_data(train_cfg.data, torch.device("cpu"), seed=cfg.seed)
    names = resolve_names(OmegaConf.to_object(mc.names) if OmegaConf.is_list(mc.names) else mc.names,
                          data.is_image, data)
    if {"fid", "kid"} & set(names):  # fail before sampling, not after
        from .inception import inception_weights

        inception_weights(mc.inception_weights)
    record = {"ckpt": str(model.file), "step": model.step, "data": train_cfg.data.name, "model": train_cfg.model.name,
              "sampler": None, "steps": None, "nfe": None, "n": None, "seed": cfg.seed}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, samples, labels = {}, None, None
    if set(names) - LIKELIHOODS:
        out = draw(cfg, model, device)
        samples, labels = out.samples, out.labels
        record |= {"sampler": out.sampler, "steps": out.steps, "nfe": out.nfe, "n": cfg.n}
        if labels is not None:
            record |= {"guidance": out.guidance, "classifier_scale": out.classifier_scale,
                       "labels": sorted(set(labels.tolist()))}
    if data.is_image:
        metrics = image_metrics(names, samples, train_cfg, mc, model.denoiser, cfg.seed, device, labels)
        if samples is not None:
            save_picture(samples, out_dir / "samples.png", labels=labels)
    else:
        if samples is not None:
            reference = data.sample(cfg.n, torch.Generator().manual_seed(cfg.seed + 1))  # as sample's reference
            metrics = toy_metrics(samples, reference, data, names)
            if labels is not None:
                metrics |= toy_agreement(train_cfg.data, samples, labels)
            save_picture(samples, out_dir / "samples.png", reference, labels)
        if "nll" in names:
            metrics |= nll_2d(model.denoiser, data, train_cfg.data, mc, cfg.seed)
    record |= {"metrics": metrics, "metric_settings": OmegaConf.to_container(mc, resolve=True),
               "seconds": round(time.perf_counter() - t0, 2)}
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    print_table(record)
    log.info("wrote %s", out_dir / "metrics.json")
    return record


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
