"""`diffcli summary DIR`: one table of a sweep's runs, as summary.csv, and its pictures.

Evaluation runs (metrics.json): their metrics, quality against NFE (quality_vs_nfe.png) and against a guidance
weight or classifier scale. Training runs (log.jsonl): each job's final loss, its last eval.jsonl metric and a
contact sheet of the jobs' last sample pictures (samples_sheet.png). It reads files only: no run is loaded.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path as FsPath

from omegaconf import OmegaConf

from . import DiffcliError

# the settings of a run (not its metrics): shared ones go into the table's title
SETTINGS = ("run", "overrides", "model", "data", "step", "sampler", "steps", "nfe", "n", "guidance",
            "classifier_scale", "picture")
_SKIP_PLOT = ("_sem", "_std", "_nfe", "_total", "_covered")


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_jsonl(file: FsPath) -> list[dict]:
    """The rows of a .jsonl log; a line cut short by a crash (or any unreadable line) is skipped."""
    rows = []
    for line in file.read_text().splitlines() if file.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _overrides_of(run: FsPath) -> str:
    """The command-line overrides of a Hydra job (its .hydra/overrides.yaml), as one string."""
    file = run / ".hydra" / "overrides.yaml"
    return " ".join(OmegaConf.load(file)) if file.is_file() else ""


def _name(run: FsPath, root: FsPath) -> str:
    return str(run.relative_to(root)) if run != root else "."


def _in_job_order(files) -> list[FsPath]:
    """Files of a sweep's jobs in job order (0, 1, ..., 10, not 0, 1, 10)."""
    key = lambda f: (len(f.parts), [int(p) if p.isdigit() else math.inf for p in f.parts], str(f))  # noqa: E731
    return sorted(files, key=key)


def collect(root) -> list[dict]:
    """Every metrics.json under root (a sweep or any folder of eval runs), oldest job first."""
    root, rows = FsPath(root), []
    for f in _in_job_order(root.rglob("metrics.json")):
        record = json.loads(f.read_text())
        scalars = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append({"run": _name(f.parent, root), "overrides": _overrides_of(f.parent),
                     **{k: record.get(k) for k in SETTINGS[2:-1]}, **scalars})
    return rows


def collect_training(root) -> list[dict]:
    """Every training run under root (a folder with log.jsonl): its final loss, its last eval.jsonl metrics and
    its last picture of samples."""
    root, rows = FsPath(root), []
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
    root = FsPath(root)
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
            out["plot"] = str(_contact_sheet(rows, root, root / "samples_sheet.png"))
        return out
    plotted = [k for k in columns if k not in SETTINGS and any(isinstance(r.get(k), float) for r in rows)]
    if plotted and any(r.get("nfe") for r in rows):
        out["plot"] = str(_plot_against(rows, plotted, "nfe", root / "quality_vs_nfe.png"))
    for key in ("guidance", "classifier_scale"):
        if plotted and len({r.get(key) for r in rows if r.get(key) is not None}) > 1:
            out[f"{key}_plot"] = str(_plot_against(rows, plotted, key, root / f"quality_vs_{key}.png"))
    return out


def _print_summary(rows, columns, root, what: str) -> None:
    """The columns that vary across runs as a table; the settings shared by all runs (never metrics) in its title."""
    from rich.console import Console
    from rich.table import Table

    rows = _swept_only(rows)
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


def _swept_only(rows) -> list[dict]:
    """The rows with only the overrides not shared by every run (the swept ones)."""
    sets = [set(r["overrides"].split()) for r in rows]
    swept = set().union(*sets) - set.intersection(*sets) if sets else set()
    return [r | {"overrides": " ".join(o for o in r["overrides"].split() if o in swept)} for r in rows]


def _contact_sheet(rows, root: FsPath, file: FsPath) -> FsPath:
    """The jobs' last sample pictures side by side in one PNG, each titled with its job and swept overrides."""
    from .sample import pyplot

    plt = pyplot()
    shown = [r for r in _swept_only(rows) if r["picture"]]
    cols = min(4, len(shown))
    n_rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.5 * cols, 4.8 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        ax.imshow(plt.imread(root / r["run"] / r["picture"]))
        ax.set_title(f"{r['run']}: {r['overrides'] or r['model']}\n{r['picture']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return file


_AXES = {"nfe": ("NFE per sample", "log", "NFE"), "guidance": ("guidance weight w", "linear", "w"),
         "classifier_scale": ("classifier scale s", "linear", "s")}


def _plot_against(rows, metrics, key: str, file: FsPath) -> FsPath:
    """quality_figure, saved to `file`."""
    from .sample import pyplot

    fig = quality_figure(rows, metrics, key)
    fig.savefig(file, dpi=120)
    pyplot().close(fig)
    return file


def quality_figure(rows, metrics, key: str):
    """One panel per metric: value against `key` (NFE on a log scale, the guidance weight or scale), one line per
    (model, sampler) and, against NFE, per guidance weight."""
    from .sample import pyplot

    plt = pyplot()
    label_x, scale, short = _AXES[key]
    metrics = [m for m in metrics if not m.endswith(_SKIP_PLOT)][:6]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    groups = {}
    for r in rows:
        if r.get(key) is not None:
            w = f", w = {r['guidance']:g}" if key != "guidance" and r.get("guidance") is not None else ""
            groups.setdefault(f"{r['model']} / {r['sampler']}{w}", []).append(r)
    xs = sorted({r[key] for r in rows if r.get(key) is not None})
    for ax, metric in zip(axes[0], metrics):
        for label, group in groups.items():
            pts = sorted((r[key], r[metric]) for r in group if isinstance(r.get(metric), (int, float)))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale=scale, xlabel=label_x, ylabel=metric, title=f"{metric} vs {short}")
        ax.grid(alpha=0.3)
        if scale == "log":  # ticks at the values measured, as plain numbers (log axes label 2x10^0, 3x10^0, ...)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    if scale == "log":
        _thin_ticks(fig, xs)
    return fig


def _thin_ticks(fig, xs) -> None:
    """Blank each tick label that would overlap the last one kept, left to right (1000 and 1001 NFE side by side)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        kept, labels = None, []
        for x, label in zip(xs, ax.get_xticklabels()):
            box = label.get_window_extent(renderer)
            if kept is not None and box.x0 < kept.x1 + 4:  # 4 pixels of air between labels
                labels.append("")
            else:
                kept = box
                labels.append(f"{x:g}")
        ax.set_xticks(xs, labels)
