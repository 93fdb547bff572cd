"""`diffcli train -m hydra/sweeper=optuna`: a real Optuna study over real toy runs; the value each job returns to
Hydra is its metrics.json objective, and `diffcli summary` reads the sweep."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from diffcli.summary import summarize

SHORT = ["data=moons", "model=flow", "train.steps=30", "train.batch_size=64", "train.log_every=10",
         "train.sample_every=0", "train.eval_every=0", "train.eval_n=300", "train.ckpt_every=30",
         "sampler=euler", "sampler.steps=8", "device=cpu"]


@pytest.mark.slow
def test_a_three_trial_optuna_sweep_returns_each_jobs_metrics_json_and_summary_marks_the_best(tmp_path):
    sweep = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=1",
                "train.lr=interval(1e-4,3e-3)", "train.ema.decay=choice(0.9,0.99)", "logger=mlflow",
                f"logger.mlflow.tracking_uri={uri}", "objective.metric=sliced_wasserstein", f"hydra.sweep.dir={sweep}",
                *SHORT, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    records = {p.name: json.loads((p / "metrics.json").read_text()) for p in jobs}
    assert len(records) == 3
    values = {name: rec["objective"]["value"] for name, rec in records.items()}
    assert all(rec["objective"]["direction"] == "minimize" for rec in records.values())
    assert all(rec["objective"]["value"] == rec["metrics"]["sliced_wasserstein"] for rec in records.values())
    assert result["best_value"] == min(values.values())  # Hydra got exactly each job's metrics.json value
    best = min(values, key=values.get)
    overrides = yaml.safe_load((sweep / best / ".hydra" / "overrides.yaml").read_text())
    assert f"train.lr={result['best_params']['train.lr']}" in overrides

    from mlflow.tracking import MlflowClient  # the sweep is one MLflow experiment, a run per job

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(str(sweep)).experiment_id])
    assert sorted(Path(r.data.tags["diffcli.run_dir"]).name for r in runs) == [p.name for p in jobs]
    assert {Path(r.data.tags["diffcli.run_dir"]).name: r.data.metrics["final/sliced_wasserstein"] for r in runs} == values
    for r in runs:  # a job is named by its number and the values it tries
        job = Path(r.data.tags["diffcli.run_dir"]).name
        tried = [o for o in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
                 if o.startswith(("train.lr=", "train.ema.decay="))]
        assert r.info.run_name == " ".join([f"{job}:", *tried])

    out = summarize(sweep)
    assert out["search"]["best_run"] == best and out["search"]["best_value"] == values[best]
    assert [r["best"] for r in out["rows"]] == ["best" if p.name == best else "" for p in jobs]
    assert [r["objective"] for r in out["rows"]] == [values[p.name] for p in jobs]
    assert (sweep / "search.png").exists()


@pytest.mark.slow
def test_a_metric_to_maximize_turns_the_study_around(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "data=eight_gaussians",
                "train.lr=interval(1e-4,3e-3)", "objective.metric=in_modes", f"hydra.sweep.dir={sweep}",
                *SHORT[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    values = [json.loads((p / "metrics.json").read_text())["objective"]["value"] for p in sweep.iterdir() if p.is_dir()]
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"] == max(values)


def test_an_optuna_sweep_without_an_objective_or_against_its_direction_is_one_line(tmp_path):
    r = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", *SHORT, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "set objective.metric" in r.stderr
    r = run_cli("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=1", "hydra.sweeper.direction=maximize",
                "objective.metric=sliced_wasserstein", *SHORT, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is to minimize" in r.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("log.jsonl"))


def test_a_missing_sweeper_or_tracker_names_the_pip_install(tmp_path):
    """A package blocked in sys.modules is what Python reports as not installed."""
    def without(module, *args):
        code = (f"import sys; sys.modules[{module!r}] = None; from diffcli.cli import main; "
                f"main({list(args)!r})")
        import subprocess

        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    r = without("optuna", "train", "-m", "hydra/sweeper=optuna", "objective.metric=sliced_wasserstein")
    assert r.returncode == 2 and r.stderr.strip() == ("diffcli: error: hydra/sweeper=optuna needs Hydra's optuna "
                                                      "sweeper, which is not installed: pip install 'diffcli[optuna]'")
    r = without("mlflow", "train", "logger=mlflow")
    assert r.returncode == 2 and r.stderr.strip() == ("diffcli: error: logger=mlflow needs the mlflow package, which "
                                                      "is not installed: pip install 'diffcli[mlflow]'")
    assert not (tmp_path / "outputs").exists()


def test_an_unknown_logger_is_one_line_listing_the_loggers(tmp_path):
    r = run_cli("train", "logger=neptune", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "logger/neptune" in r.stderr and "csv, mlflow, none, tensorboard, wandb" in r.stderr


def test_an_objective_the_data_cannot_give_is_refused_before_training(tmp_path):
    from conftest import compose_config
    from diffcli import DiffcliError
    from diffcli.train import run_train

    cfg = compose_config("train", ["data=moons", "objective.metric=modes_covered", "device=cpu"])
    with pytest.raises(DiffcliError) as e:
        run_train(cfg, tmp_path / "run")
    assert str(e.value) == ("objective.metric=modes_covered needs 2D mixture data; for this data choose one of "
                            "sliced_wasserstein, mmd, energy_distance")
    assert not (tmp_path / "run" / "log.jsonl").exists()
