"""`diffcli summary`: training sweeps (final loss, last metric, a contact sheet), readable titles and ticks."""

import csv
import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from diffcli import summary
from diffcli.cli import main
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


# --- a received or damaged sweep folder: nothing outside it is written, damaged runs are skipped with a note ---


def _summary_cli(capsys, *args):
    """`diffcli summary ARGS` in process: (exit code, stdout, the non-empty stderr lines)."""
    with pytest.raises(SystemExit) as exit_:
        main(["summary", *map(str, args)])
    out, err = capsys.readouterr()
    return exit_.value.code, out, [line for line in err.splitlines() if line.strip()]


def _one_line_error(capsys, *args) -> str:
    code, out, err = _summary_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("diffcli: error: "), (code, err)
    return err[0]


def _sweep(root, *nfes):
    for job, nfe in enumerate(nfes):
        _metrics_json(root / str(job), nfe, {"sliced_wasserstein": 1 / nfe})


def test_symlinks_in_a_received_sweep_are_replaced_never_followed(tmp_path):
    """A summary.csv (or plot) link pointing elsewhere is replaced by summary's own file; its target is untouched."""
    _sweep(tmp_path / "sweep", 2, 20)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("summary.csv", "quality_vs_nfe.png"):
        (tmp_path / "sweep" / name).symlink_to(victim)
    out = summarize(tmp_path / "sweep")
    assert victim.read_text() == "precious"
    for name in ("summary.csv", "quality_vs_nfe.png"):
        assert (tmp_path / "sweep" / name).is_file() and not (tmp_path / "sweep" / name).is_symlink()
    assert [r["run"] for r in csv.DictReader(open(out["csv"]))] == ["0", "1"]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "1", "quality_vs_nfe.png", "summary.csv"]


def _sparse(file, size):
    with open(file, "wb") as fh:
        fh.truncate(size)  # a hole: no disk used, and summary must not read it


DAMAGED = {
    "truncated": (lambda f: f.write_text('{"ckpt": "run", "metrics": {"sliced_wa'), "not valid JSON"),
    "binary": (lambda f: f.write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "a list": (lambda f: f.write_text("[1, 2]"), "not a metrics record"),
    "no metrics": (lambda f: f.write_text('{"nfe": 5}'), "not a metrics record"),
    "metrics a list": (lambda f: f.write_text('{"nfe": 5, "metrics": [0.1]}'), "not a metrics record"),
    "deeply nested": (lambda f: f.write_text('{"metrics": ' + "[" * 200_000 + "]" * 200_000 + "}"),
                      "nested too deeply"),
    "huge": (lambda f: _sparse(f, 11 * 2**20), "larger than 10 MB"),
    "a fifo": (os.mkfifo, "not a regular file"),
    "a folder": (os.mkdir, "not a regular file"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_metrics_json_is_skipped_with_a_note(tmp_path, capsys, damage):
    """A killed job's truncated metrics.json (or worse) costs its row, named on stdout, not the whole summary."""
    _sweep(tmp_path, 2, 20)
    (tmp_path / "2").mkdir()
    write, why = DAMAGED[damage]
    write(tmp_path / "2" / "metrics.json")
    code, out, err = _summary_cli(capsys, tmp_path)
    assert code == 0 and err == []
    assert f"note: skipped 2/metrics.json: {why}" in out
    assert [r["run"] for r in csv.DictReader(open(tmp_path / "summary.csv"))] == ["0", "1"]


def test_a_sweep_of_damaged_metrics_only_is_one_line(tmp_path, capsys):
    for job in ("0", "1"):
        (tmp_path / job).mkdir()
        (tmp_path / job / "metrics.json").write_text("{")
    line = _one_line_error(capsys, tmp_path)
    assert "nothing under" in line and "0/metrics.json: not valid JSON" in line and "(and 1 more)" in line


def test_hostile_values_in_a_metrics_json_are_dropped_not_drawn(tmp_path, capsys):
    """Nested, huge or non-numeric settings are left empty; a metric named like a setting cannot replace it; rich
    markup in a name is printed as text."""
    _sweep(tmp_path, 2, 20)
    record = {"model": "[/bold]", "sampler": "x" * 10_000, "nfe": "five", "guidance": [[1]], "steps": 10**4000,
              "metrics": {"sliced_wasserstein": 0.2, "overrides": 3.0, "run": 1.0, "big": 10**4000, "ok": True}}
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "metrics.json").write_text(json.dumps(record))
    code, out, err = _summary_cli(capsys, tmp_path)
    assert code == 0 and err == [] and "[/bold]" in out
    row = summary.collect(tmp_path)[2]
    assert row == {"run": "2", "overrides": "", "model": "[/bold]", "data": None, "step": None, "sampler": None,
                   "steps": None, "nfe": None, "n": None, "guidance": None, "classifier_scale": None,
                   "sliced_wasserstein": 0.2}
    assert (tmp_path / "quality_vs_nfe.png").stat().st_size > 1000


def _png(file, size=(24, 24)):
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(file)


def _training_run(run, overrides="- model=ddpm\n- data=moons\n", config="model: {name: ddpm}\ndata: {name: moons}\n"):
    """A training job's files as diffcli train leaves them: log, Hydra's .hydra/ and a picture of samples."""
    (run / ".hydra").mkdir(parents=True)
    (run / "log.jsonl").write_text(json.dumps({"step": 10, "loss": 0.5}) + "\n")
    (run / ".hydra" / "overrides.yaml").write_text(overrides)
    (run / ".hydra" / "config.yaml").write_text(config)
    _png(run / "samples_0000010.png")


def test_damaged_hydra_files_keep_the_run_and_are_never_resolved(tmp_path, capsys):
    """A cut .hydra/*.yaml leaves its columns empty, with a note; a ${...} in one is text, never resolved."""
    _training_run(tmp_path / "0")
    _training_run(tmp_path / "1", overrides="- model=flow\n- 'data=mo", config="model: {name: flo")
    _training_run(tmp_path / "2", overrides="- model=${oc.env:HOME}\n- data=moons\n",
                  config="model: {name: '${oc.env:HOME}'}\ndata: {name: '${oc.decode:x}'}\n")
    code, out, err = _summary_cli(capsys, tmp_path)
    assert code == 0 and err == []
    assert "note: 1/.hydra/overrides.yaml: not valid YAML" in out and "note: 1/.hydra/config.yaml: not valid YAML" in out
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [(r["overrides"], r["model"], r["data"]) for r in rows] == [
        ("model=ddpm data=moons", "ddpm", "moons"), ("", "", ""),
        ("model=${oc.env:HOME} data=moons", "${oc.env:HOME}", "${oc.decode:x}")]
    assert os.environ["HOME"] not in out.replace(str(tmp_path), "")


def test_a_damaged_picture_or_log_is_left_out_of_the_contact_sheet(tmp_path, capsys, monkeypatch):
    """A corrupt PNG, a picture too large to decode and a log that is not text: the other runs are still drawn."""
    for job in "0123":
        _training_run(tmp_path / job)
    good = (tmp_path / "1" / "samples_0000010.png").read_bytes()
    (tmp_path / "1" / "samples_0000010.png").write_bytes(good[: len(good) // 2])
    _png(tmp_path / "2" / "samples_0000010.png", size=(100, 100))
    (tmp_path / "3" / "log.jsonl").write_bytes(b"\xff\xfe not utf-8")
    monkeypatch.setattr(summary, "PICTURE_PIXELS", 50 * 50)
    code, out, err = _summary_cli(capsys, tmp_path)
    assert code == 0 and err == [], err
    assert "note: left 1/samples_0000010.png out of samples_sheet.png: not a readable PNG" in out
    assert "note: left 2/samples_0000010.png out of samples_sheet.png: 100x100 pixels, too large to draw" in out
    assert "note: skipped 3: 3/log.jsonl holds no readable row (not text, or damaged)" in out
    assert [r["run"] for r in csv.DictReader(open(tmp_path / "summary.csv"))] == ["0", "1", "2"]
    assert (tmp_path / "samples_sheet.png").stat().st_size > 1000


def test_an_unwritable_output_is_one_line(tmp_path, capsys):
    """summary.csv a folder (as root can test): one line naming the file and what to do."""
    _sweep(tmp_path, 2, 20)
    (tmp_path / "summary.csv").mkdir()
    line = _one_line_error(capsys, tmp_path)
    assert f"cannot write {tmp_path / 'summary.csv'}" in line and "make it writable" in line
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    _sweep(tmp_path / "sweep", 2, 20)
    (tmp_path / "sweep").chmod(0o555)
    try:
        line = _one_line_error(capsys, tmp_path / "sweep")
    finally:
        (tmp_path / "sweep").chmod(0o755)
    assert "cannot write" in line and "Permission denied" in line and "chmod u+w" in line


def test_summary_arguments_are_one_line_and_help_is_usage(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "got no folder; usage: diffcli summary DIR" in _one_line_error(capsys)
    assert "got 2 arguments" in _one_line_error(capsys, tmp_path, tmp_path)
    assert "got '--bogus'" in _one_line_error(capsys, "--bogus")
    assert "does not exist" in _one_line_error(capsys, tmp_path / "nope")
    assert "is a file, not a folder" in _one_line_error(capsys, tmp_path / "file")
    code, out, err = _summary_cli(capsys, "--help")
    assert code == 0 and out.startswith("usage: diffcli summary DIR") and err == []


def test_summary_without_a_folder_through_the_real_command(tmp_path):
    r = run_cli("summary", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.startswith("diffcli: error: diffcli summary takes one folder") and r.stderr.count("\n") == 1
