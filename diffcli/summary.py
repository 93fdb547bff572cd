"""`diffcli summary DIR`: one table of a sweep's runs, as summary.csv, and its pictures.

Evaluation runs (metrics.json): their metrics, quality against NFE (quality_vs_nfe.png) and against a guidance
weight or classifier scale. Training runs (log.jsonl): each job's final loss, its last eval.jsonl metric and a
contact sheet of the jobs' last sample pictures (samples_sheet.png). It reads files only: no run is loaded.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from . import DiffcliError
from .plots import contact_sheet, plot_against
from .runs import fmt, read_jsonl

# the settings of a run (not its metrics): shared ones go into the table's title
SETTINGS = ("run", "overrides", "model", "data", "step", "sampler", "steps", "nfe", "n", "guidance",
            "classifier_scale", "picture")


def _overrides_of(run: Path) -> str:
    """The command-line overrides of a Hydra job (its .hydra/overrides.yaml), as one string."""
    file = run / ".hydra" / "overrides.yaml"
    return " ".join(OmegaConf.load(file)) if file.is_file() else ""


def _name(run: Path, root: Path) -> str:
    return str(run.relative_to(root)) if run != root else "."


def _in_job_order(files) -> list[Path]:
    """Files of a sweep's jobs in job order (0, 1, ..., 10, not 0, 1, 10)."""
    key = lambda f: (len(f.parts), [int(p) if p.isdigit() else math.inf for p in f.parts], str(f))  # noqa: E731
    return sorted(files, key=key)


def collect(root) -> list[dict]:
    """Every metrics.json under root (a sweep or any folder of eval runs), oldest job first."""
    root, rows = Path(root), []
    for f in _in_job_order(root.rglob("metrics.json")):
        record = json.loads(f.read_text())
        scalars = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append({"run": _name(f.parent, root), "overrides": _overrides_of(f.parent),
                     **{k: record.get(k) for k in SETTINGS[2:-1]}, **scalars})
    return rows


def collect_training(root) -> list[dict]:
    """Every training run under root (a folder with log.jsonl): its final loss, its last eval.jsonl metrics and
    its last picture of samples."""
    root, rows = Path(root), []
    for f in _in_job_order(root.rglob("log.jsonl")):
        run, config = f.parent, f.parent / ".hydra" / "config.yaml"
        cfg = OmegaConf.load(config) if config.is_file() else OmegaConf.create()  # data: nothing is resolved
        logged = [r for r in read_jsonl(f) if r.get("loss") is not None]
        evals = read_jsonl(run / "eval.jsonl")
        pictures = sorted(run.glob("samples_*.png"))
        rows.append({"run": _name(run, root), "overrides": _overrides_of(run),
                     "model": OmegaConf.select(cfg, "model.name", default=None),
                     "data": OmegaConf.select(cfg, "data.name", default=None),
                     "step": logged[-1]["step"] if logged else None, "loss": logged[-1]["loss"] if logged else None,
                     **({f"{k} (step {evals[-1]['step']})": v for k, v in evals[-1].items() if isinstance(v, float)}
                        if evals else {}),
                     "picture": pictures[-1].name if pictures else None})
    return rows


def summarize(root) -> dict:
    """The table of a sweep (printed, summary.csv) and its pictures: for evaluations quality against NFE
    (quality_vs_nfe.png) and, for a sweep over guidance= or classifier_scale=, against that
    (quality_vs_guidance.png, quality_vs_classifier_scale.png); for training runs a contact sheet of their last
    samples (samples_sheet.png)."""
    root = Path(root)
    rows = collect(root) if root.is_dir() else []
    training = not rows
    rows = collect_training(root) if training and root.is_dir() else rows
    if not rows:
        raise DiffcliError(f"no metrics.json or log.jsonl under {root}; point diffcli summary at an eval or training "
                           f"run or sweep folder (e.g. outputs/multirun/eval/<date>_<time>)")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(root / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    _print_summary(rows, columns, root, "training runs" if training else "evaluations")
    out = {"rows": rows, "csv": str(root / "summary.csv")}
    if training:
        if any(r["picture"] for r in rows):
            out["plot"] = str(contact_sheet(swept_only(rows), root, root / "samples_sheet.png"))
        return out
    plotted = [k for k in columns if k not in SETTINGS and any(isinstance(r.get(k), float) for r in rows)]
    if plotted and any(r.get("nfe") for r in rows):
        out["plot"] = str(plot_against(rows, plotted, "nfe", root / "quality_vs_nfe.png"))
    for key in ("guidance", "classifier_scale"):
        if plotted and len({r.get(key) for r in rows if r.get(key) is not None}) > 1:
            out[f"{key}_plot"] = str(plot_against(rows, plotted, key, root / f"quality_vs_{key}.png"))
    return out


def _print_summary(rows, columns, root, what: str) -> None:
    """The columns that vary across runs as a table; the settings shared by all runs (never metrics) in its title."""
    from rich.console import Console
    from rich.table import Table

    rows = swept_only(rows)
    same = [c for c in columns if c in SETTINGS and c != "run" and len(rows) > 1
            and len({json.dumps(r.get(c)) for r in rows}) == 1]
    title = f"{root} ({len(rows)} {what})\n" + "  ".join(f"{c}={fmt(rows[0].get(c))}" for c in same
                                                          if rows[0].get(c) not in (None, ""))
    table = Table(title=title)
    shown = [c for c in columns if c not in same]
    for c in shown:
        table.add_column(c, justify="left" if c in ("run", "overrides", "model", "data", "sampler", "picture")
                         else "right")
    for row in rows:
        table.add_row(*(fmt(row[c]) if row.get(c) is not None else "" for c in shown))
    Console(width=max(100, 12 * len(shown))).print(table)


def swept_only(rows) -> list[dict]:
    """The rows with only the overrides not shared by every run (the swept ones)."""
    sets = [set(r["overrides"].split()) for r in rows]
    swept = set().union(*sets) - set.intersection(*sets) if sets else set()
    return [r | {"overrides": " ".join(o for o in r["overrides"].split() if o in swept)} for r in rows]


