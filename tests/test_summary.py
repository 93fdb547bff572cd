"""`diffcli summary`: training sweeps (final loss, last metric, a contact sheet), readable titles and ticks."""

import csv
import itertools
import json

import numpy as np

from conftest import run_cli
from diffcli.plots import quality_figure
from diffcli.runs import read_jsonl
from diffcli.summary import summarize


def test_a_training_sweep_ends_with_pictures_and_summarizes(tmp_path):
    """The newcomer's first sweep: every job draws its samples at its last step, and summary compares the jobs."""
    r = run_cli("train", "-m", "model=ddpm,flow", "data=moons", "train.steps=12", "train.sample_every=5",
                "train.n_samples=200", "train.eval_every=6", "train.eval_n=200", "train.log_every=6",
                "train.batch_size=64", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for job in ("0", "1"):
        assert sorted(p.name for p in (tmp_path / "sweep" / job).glob("samples_*.png")) == [
            f"samples_{s:07d}.png" for s in (5, 10, 12)]
    out = run_cli("summary", "sweep", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "2 training runs" in out.stdout and "samples_sheet.png" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [(r["run"], r["model"], r["data"], r["step"]) for r in rows] == [("0", "ddpm", "moons", "12"),
                                                                            ("1", "flow", "moons", "12")]
    for row in rows:  # the values of the job's own logs
        log, evals = (read_jsonl(tmp_path / "sweep" / row["run"] / f) for f in ("log.jsonl", "eval.jsonl"))
        assert float(row["loss"]) == log[-1]["loss"]
        assert float(row["sliced_wasserstein (step 12)"]) == evals[-1]["sliced_wasserstein"]
        assert row["picture"] == "samples_0000012.png" and row["overrides"].startswith(f"model={row['model']} data=")
    assert (tmp_path / "sweep" / "samples_sheet.png").stat().st_size > 20_000
    # sampling a 2D model without n= gives a readable scatter of 2000 points, not 64
    r = run_cli("sample", "ckpt=sweep/1", "sampler=euler", "steps=5", "hydra.run.dir=s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (2000, 2)


def _metrics_json(folder, nfe, metrics):
    folder.mkdir(parents=True)
    record = {"ckpt": "run", "step": 10, "data": "moons", "model": "ddpm", "sampler": "ddim", "steps": nfe,
              "nfe": nfe, "n": 100, "seed": 0, "metrics": metrics}
    (folder / "metrics.json").write_text(json.dumps(record))


def test_summary_title_lists_shared_settings_not_metrics(tmp_path, capsys):
    _metrics_json(tmp_path / "0", 2, {"sliced_wasserstein": 0.3, "modes_covered": 8})
    _metrics_json(tmp_path / "1", 20, {"sliced_wasserstein": 0.1, "modes_covered": 8})
    summarize(tmp_path)
    title, table = capsys.readouterr().out.split("┏", 1)
    assert "model=ddpm" in title and "sampler=ddim" in title and "data=moons" in title
    assert "modes_covered" not in title and "modes_covered" in table  # a metric stays a column, even when equal


def _overlaps(fig):
    """Pairs of visible, non-empty x tick labels whose boxes overlap, per panel."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    pairs = []
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
        for a, b in itertools.combinations(labels, 2):
            if a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer)):
                pairs.append((a.get_text(), b.get_text()))
    return pairs


def test_quality_vs_nfe_tick_labels_do_not_overlap():
    """Matplotlib's own log ticks label 2x10^0, 3x10^0, 4x10^0, ... on top of each other over one decade; the
    NFE measured are the ticks instead, and one of two neighbours (1000 and 1001: langevin) is left blank."""
    for nfes in ([2, 5, 10, 20], [2, 3, 5, 10, 20, 35], [10, 20, 50, 100, 1000, 1001]):
        rows = [{"model": "ddpm", "sampler": "ddim", "nfe": k, "sliced_wasserstein": 1 / k, "mmd": 2 / k}
                for k in nfes]
        fig = quality_figure(rows, ["sliced_wasserstein", "mmd"], "nfe")
        assert _overlaps(fig) == []
        shown = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
        assert shown[0] == str(nfes[0]) and len(shown) >= min(len(nfes), 4), shown
