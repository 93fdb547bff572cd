"""`diffcli summary DIR`: one table of a sweep's runs, as summary.csv, and its pictures.

Evaluation runs (metrics.json): their metrics, quality against NFE (quality_vs_nfe.png) and against a guidance
weight or classifier scale. Training runs (log.jsonl): each job's final loss, its last eval.jsonl metric and a
contact sheet of the jobs' last sample pictures (samples_sheet.png). It reads files only: no run is loaded.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path

from . import DiffcliError
from .plots import contact_sheet, plot_against, plot_search
from .runs import atomic_file, fmt, read_jsonl

# the settings of a run (not its metrics): shared ones go into the table's title
SETTINGS = ("run", "overrides", "model", "data", "step", "sampler", "steps", "nfe", "n", "guidance",
            "classifier_scale", "picture")
TEXT_SETTINGS = ("model", "data", "sampler")

# the largest files read, in bytes: a real metrics.json is a few KB, a Hydra .yaml a few KB, a log ~100 bytes a row
METRICS_LIMIT, YAML_LIMIT, LOG_LIMIT, PICTURE_LIMIT = 10 * 2**20, 2**20, 256 * 2**20, 64 * 2**20
PICTURE_PIXELS = 50_000_000  # a sample grid is ~1 megapixel; more is not decoded (a PNG can inflate 1000x)
MAX_METRICS, MAX_TEXT = 100, 200  # per run, and the characters of a name or setting shown


class Damaged(Exception):
    """A file of one run that cannot be used; the message says why in a few words."""


def _read(file: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; a FIFO, a device or a larger file is not read."""
    try:
        if not file.is_file():
            raise Damaged("not a regular file")
        if file.stat().st_size > limit:
            raise Damaged(f"larger than {limit / 2**20:g} MB, not read")
        with open(file, "rb") as fh:
            data = fh.read(limit + 1)  # a file that grows (or lies about its size, /proc) is still bounded
    except OSError as e:
        raise Damaged(f"cannot be read ({e.strerror or e})") from None
    if len(data) > limit:
        raise Damaged(f"larger than {limit / 2**20:g} MB, not read")
    return data


def _json(file: Path):
    """A JSON file's content; a truncated, non-JSON, too deep or too large file raises Damaged."""
    try:
        return json.loads(_read(file, METRICS_LIMIT))
    except RecursionError:
        raise Damaged("nested too deeply to be a metrics record") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise Damaged("not valid JSON (cut short by a killed job?)") from None


def _yaml(file: Path):
    """A YAML file's content as plain data: nothing is resolved (no ${...} interpolation), nothing is built."""
    import yaml

    try:
        return yaml.safe_load(_read(file, YAML_LIMIT))
    except RecursionError:
        raise Damaged("nested too deeply") from None
    except (yaml.YAMLError, ValueError):
        raise Damaged("not valid YAML (cut short?)") from None


def _number(value, positive: bool = False):
    """An int or float with a finite float value (and > 0 if `positive`), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int of thousands of digits
        return None
    return value if finite and (value > 0 or not positive) else None


def _text(value):
    """A short string, else None (a nested value or a megabyte of text is not a setting)."""
    return value if isinstance(value, str) and len(value) <= MAX_TEXT else None


def _metrics(values: dict) -> dict:
    """The numbers of a run's metrics: NaN and inf kept (a diverged run), huge ints, non-numbers and names that
    would replace a setting column dropped."""
    out = {}
    for k, v in values.items():
        if k in SETTINGS or len(k) > MAX_TEXT or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) or _number(v) is not None:
            out[k] = v
    if len(out) > MAX_METRICS:
        raise Damaged(f"{len(out)} metrics, more than {MAX_METRICS}")
    return out


def _overrides_of(run: Path, root: Path, notes: list) -> str:
    """The command-line overrides of a Hydra job (its .hydra/overrides.yaml), as one string."""
    file = run / ".hydra" / "overrides.yaml"
    if not file.exists():
        return ""
    try:
        overrides = _yaml(file)
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise Damaged("not a list of overrides")
    except Damaged as e:
        notes.append(f"{_name(file, root)}: {e}; its overrides are left out")
        return ""
    return " ".join(overrides)


def _name(run: Path, root: Path) -> str:
    return str(run.relative_to(root)) if run != root else "."


def _in_job_order(files) -> list[Path]:
    """Files of a sweep's jobs in job order (0, 1, ..., 10, not 0, 1, 10)."""
    key = lambda f: (len(f.parts), [int(p) if p.isdigit() else math.inf for p in f.parts], str(f))  # noqa: E731
    return sorted(files, key=key)


def _metrics_record(f: Path) -> dict:
    """A metrics.json (of diffcli eval, or of a training run's end); a damaged file raises Damaged."""
    record = _json(f)
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise Damaged("not a metrics record (no 'metrics' object)")
    return record


def _eval_row(f: Path, root: Path, notes: list) -> dict:
    """One evaluation's row from its metrics.json; a damaged file raises Damaged."""
    record = _metrics_record(f)
    settings = {k: _text(record.get(k)) if k in TEXT_SETTINGS else _number(record.get(k), positive=k == "nfe")
                for k in SETTINGS[2:-1]}
    return {"run": _name(f.parent, root), "overrides": _overrides_of(f.parent, root, notes), **settings,
            **_metrics(record["metrics"])}


def collect(root, notes: list | None = None) -> list[dict]:
    """Every metrics.json under root (a sweep or any folder of eval runs), oldest job first; a damaged one is
    skipped, with a line saying why added to `notes`."""
    root, rows, notes = Path(root), [], [] if notes is None else notes
    for f in _in_job_order(root.rglob("metrics.json")):
        if (f.parent / "log.jsonl").exists():  # a training run's final evaluation (objective.metric): its row's
            continue
        try:
            rows.append(_eval_row(f, root, notes))
        except Damaged as e:
            notes.append(f"skipped {_name(f, root)}: {e}")
    return rows


def _log(file: Path) -> list[dict]:
    """The rows of a run's .jsonl log (none if there is none); a damaged or huge one raises Damaged."""
    if not file.exists():
        return []
    if not file.is_file():  # a FIFO or a device is never opened
        raise Damaged("not a regular file")
    if file.stat().st_size > LOG_LIMIT:
        raise Damaged(f"larger than {LOG_LIMIT / 2**20:g} MB, not read")
    try:
        rows = read_jsonl(file)  # skips lines that are cut short, not text or nested past the parser
    except OSError as e:
        raise Damaged(f"cannot be read ({e.strerror or e})") from None
    if not rows and file.stat().st_size:
        raise Damaged("holds no readable row (not text, or damaged)")
    return rows


def _config_name(cfg, group: str):
    """`<group>.name` of a run's stored config (plain data: an interpolation stays the text it is)."""
    node = cfg.get(group) if isinstance(cfg, dict) else None
    return _text(node.get("name")) if isinstance(node, dict) else None


def _training_row(f: Path, root: Path, notes: list) -> dict:
    """One training run's row from its log.jsonl, eval.jsonl, .hydra/ and pictures; a damaged log raises Damaged."""
    run, config = f.parent, f.parent / ".hydra" / "config.yaml"
    logged = [r for r in _log(f) if r.get("loss") is not None]
    evals = _log(run / "eval.jsonl")
    cfg = None
    if config.exists():
        try:
            cfg = _yaml(config)
        except Damaged as e:
            notes.append(f"{_name(config, root)}: {e}; its model and data are left out")
    pictures = sorted(run.glob("samples_*.png"))
    last = evals[-1] if evals else {}
    return {"run": _name(run, root), "overrides": _overrides_of(run, root, notes),
            "model": _config_name(cfg, "model"), "data": _config_name(cfg, "data"),
            "step": logged[-1]["step"] if logged else None,
            "loss": _number(logged[-1]["loss"]) if logged else None,
            **{f"{k} (step {last['step']})": v for k, v in _metrics(last).items() if isinstance(v, float)},
            **_final_metrics(run, root, notes),
            "picture": pictures[-1].name if pictures else None}


def _final_metrics(run: Path, root: Path, notes: list) -> dict:
    """The metrics of a training run's final evaluation (its metrics.json, written with an objective.metric)."""
    file = run / "metrics.json"
    if not file.exists():
        return {}
    try:
        record = _metrics_record(file)
        objective = record.get("objective")
        value = _number(objective.get("value")) if isinstance(objective, dict) else None
        return _metrics(record["metrics"]) | ({"objective": float(value)} if value is not None else {})
    except Damaged as e:
        notes.append(f"{_name(file, root)}: {e}; its final metrics are left out")
        return {}


def _values(overrides: str) -> dict:
    """A job's overrides as {key: value}, each value read as YAML (1e-3 -> 0.001; text that is not YAML stays text)."""
    import yaml

    out = {}
    for o in overrides.split():
        key, _, text = o.partition("=")
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            out[key] = text
    return out


def search_result(root: Path, rows: list, notes: list) -> dict | None:
    """An Optuna sweep's optimization_results.yaml (written by Hydra's Optuna sweeper): its best value and
    parameters, and the job that reached it (its overrides hold every best parameter); each row gets a `best` mark."""
    file = root / "optimization_results.yaml"
    if not file.exists():
        return None
    try:
        result = _yaml(file)
        if not isinstance(result, dict) or not isinstance(result.get("best_params"), dict):
            raise Damaged("no best_params")
    except Damaged as e:
        notes.append(f"{_name(file, root)}: {e}; the search's best trial is not marked")
        return None
    value, params = _number(result.get("best_value")), result["best_params"]
    tried = [_values(r["overrides"]) for r in rows]
    best = next((r["run"] for r, t in zip(rows, tried) if all(t.get(k) == v for k, v in params.items())), None)
    for r in rows:
        r["best"] = "best" if r["run"] == best else ""
    return {"best_value": value, "best_params": params, "best_run": best,
            "tried": {k: [t.get(k) for t in tried] for k in params}}


def collect_training(root, notes: list | None = None) -> list[dict]:
    """Every training run under root (a folder with log.jsonl): its final loss, its last eval.jsonl metrics and
    its last picture of samples; a run with a damaged log is skipped, with a line saying why added to `notes`."""
    root, rows, notes = Path(root), [], [] if notes is None else notes
    for f in _in_job_order(root.rglob("log.jsonl")):
        try:
            rows.append(_training_row(f, root, notes))
        except Damaged as e:
            notes.append(f"skipped {_name(f.parent, root)}: {_name(f, root)} {e}")
    return rows


def _picture(file: Path):
    """A PNG as an array; a damaged, non-PNG or huge picture raises Damaged."""
    import warnings

    import numpy as np
    from PIL import Image

    data = _read(file, PICTURE_LIMIT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # an error here, not a stderr line
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                if image.width * image.height > PICTURE_PIXELS:
                    raise Damaged(f"{image.width}x{image.height} pixels, too large to draw")
                return np.asarray(image.convert("RGBA"))
    except Damaged:
        raise
    except Exception:  # decoding untrusted bytes fails in many ways (OSError, SyntaxError, zlib.error, ...)
        raise Damaged("not a readable PNG") from None


def _sheet_panels(rows, root: Path, notes: list) -> list:
    """(title, image) for each run's last picture that can be read; the others get a note."""
    panels = []
    for r in swept_only(rows):
        if r["picture"]:
            file = root / r["run"] / r["picture"]
            try:
                panels.append((f"{r['run']}: {r['overrides'] or r['model']}\n{r['picture']}", _picture(file)))
            except Damaged as e:
                notes.append(f"left {_name(file, root)} out of samples_sheet.png: {e}")
    return panels


def _folder(root) -> Path:
    """The folder to summarize; a missing, unreadable one or a file is one line."""
    root = Path(root)
    if not root.exists():
        raise DiffcliError(f"{root} does not exist; give diffcli summary an eval or training run or sweep folder "
                           f"(e.g. outputs/multirun/eval/<date>_<time>)")
    if not root.is_dir():
        raise DiffcliError(f"{root} is a file, not a folder; give diffcli summary the run or sweep folder that "
                           f"holds it")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DiffcliError(f"cannot read {root} (permission denied); make it readable (chmod u+rx {root})")
    return root


@contextlib.contextmanager
def _writing(file: Path):
    """An output of summary that cannot be written (a read-only folder, a full disk) is one line."""
    try:
        yield
    except OSError as e:
        raise DiffcliError(f"cannot write {file} ({e.strerror or e}); diffcli summary writes its table and plots "
                           f"into the folder it reads: make it writable (chmod u+w {file.parent}) or summarize a "
                           f"copy") from None


def _write_csv(rows, columns, file: Path) -> None:
    """summary.csv, through a temporary renamed over it (a symlink there is replaced, its target untouched)."""
    with _writing(file), atomic_file(file) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def summarize(root) -> dict:
    """The table of a sweep (printed, summary.csv) and its pictures: for evaluations quality against NFE
    (quality_vs_nfe.png) and, for a sweep over guidance= or classifier_scale=, against that
    (quality_vs_guidance.png, quality_vs_classifier_scale.png); for training runs a contact sheet of their last
    samples (samples_sheet.png). Damaged runs are skipped with a note on stdout (also in the result's "notes")."""
    root, notes = _folder(root), []
    rows = collect(root, notes)
    training = not rows
    rows = collect_training(root, notes) if training else rows
    if not rows and notes:
        more = f" (and {len(notes) - 1} more)" if len(notes) > 1 else ""
        raise DiffcliError(f"nothing under {root} could be summarized: {notes[0]}{more}")
    if not rows:
        raise DiffcliError(f"no metrics.json or log.jsonl under {root}; point diffcli summary at an eval or training "
                           f"run or sweep folder (e.g. outputs/multirun/eval/<date>_<time>)")
    search = search_result(root, rows, notes) if training else None
    columns = list(dict.fromkeys(k for row in rows for k in row))
    _write_csv(rows, columns, root / "summary.csv")
    _print_summary(rows, columns, root, "training runs" if training else "evaluations")
    out = {"rows": rows, "csv": str(root / "summary.csv"), "notes": notes}
    if search is not None:
        out["search"] = search
        print(f"optuna: best value {fmt(search['best_value'])} in run {search['best_run']} with "
              + " ".join(f"{k}={fmt(v)}" for k, v in search["best_params"].items()))
        if any(isinstance(r.get("objective"), float) for r in rows):
            with _writing(root / "search.png"):
                out["search_plot"] = str(plot_search(rows, search["best_value"], search["tried"],
                                                     root / "search.png"))
    if training:
        panels = _sheet_panels(rows, root, notes)
        if panels:
            with _writing(root / "samples_sheet.png"):
                out["plot"] = str(contact_sheet(panels, root / "samples_sheet.png"))
    else:
        _eval_plots(rows, columns, root, out)
    for note in notes:
        print(f"note: {note}")
    return out


def _eval_plots(rows, columns, root: Path, out: dict) -> None:
    """Quality against NFE, and against guidance= or classifier_scale= when the sweep varies it."""
    plotted = [k for k in columns if k not in SETTINGS and any(isinstance(r.get(k), float) for r in rows)]
    if plotted and any(r.get("nfe") for r in rows):
        with _writing(root / "quality_vs_nfe.png"):
            out["plot"] = str(plot_against(rows, plotted, "nfe", root / "quality_vs_nfe.png"))
    for key in ("guidance", "classifier_scale"):
        if plotted and len({r.get(key) for r in rows if r.get(key) is not None}) > 1:
            with _writing(root / f"quality_vs_{key}.png"):
                out[f"{key}_plot"] = str(plot_against(rows, plotted, key, root / f"quality_vs_{key}.png"))


def _print_summary(rows, columns, root, what: str) -> None:
    """The columns that vary across runs as a table; the settings shared by all runs (never metrics) in its title."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text  # plain text: a name like '[/x]' from a received folder is not rich markup

    rows = swept_only(rows)
    same = [c for c in columns if c in SETTINGS and c != "run" and len(rows) > 1
            and len({json.dumps(r.get(c)) for r in rows}) == 1]
    title = f"{root} ({len(rows)} {what})\n" + "  ".join(f"{c}={fmt(rows[0].get(c))}" for c in same
                                                          if rows[0].get(c) not in (None, ""))
    table = Table(title=Text(title))
    shown = [c for c in columns if c not in same]
    for c in shown:
        table.add_column(Text(c), justify="left" if c in ("run", "overrides", "model", "data", "sampler", "picture")
                         else "right")
    for row in rows:
        table.add_row(*(Text(fmt(row[c]) if row.get(c) is not None else "") for c in shown))
    Console(width=max(100, 12 * len(shown))).print(table)


def swept_only(rows) -> list[dict]:
    """The rows with only the overrides not shared by every run (the swept ones)."""
    sets = [set(r["overrides"].split()) for r in rows]
    swept = set().union(*sets) - set.intersection(*sets) if sets else set()
    return [r | {"overrides": " ".join(o for o in r["overrides"].split() if o in swept)} for r in rows]


