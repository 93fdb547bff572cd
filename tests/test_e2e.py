"""End to end through the real command: train on eight_gaussians, sample with no ckpt, count modes."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from diffcli.toys import eight_gaussians_modes
from diffcli.scoring import mode_coverage


@pytest.mark.slow
def test_train_then_sample_newest_run_covers_all_modes(tmp_path):
    r = run_cli("train", "data=eight_gaussians", "train.steps=400", "train.sample_every=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "outputs" / "train").iterdir()
    assert {"log.jsonl", "loss.png", "train.log"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "ema_400.safetensors").is_file()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [100, 200, 300, 400] and log[-1]["loss"] < log[0]["loss"]

    r = run_cli("sample", "n=2000", cwd=tmp_path)  # no ckpt: the newest training run
    assert r.returncode == 0, r.stderr
    assert "newest training run" in r.stderr + r.stdout and str(run.name) in r.stderr + r.stdout
    (sample_dir,) = (tmp_path / "outputs" / "sample").iterdir()
    out = np.load(sample_dir / "samples.npz")
    assert out["samples"].shape == (2000, 2) and int(out["nfe"]) == 1000  # ancestral: all T steps
    assert (sample_dir / "samples.png").stat().st_size > 10_000
    modes, std = eight_gaussians_modes(radius=2.0, std=0.1)
    coverage = mode_coverage(torch.from_numpy(out["samples"]), modes, std)
    assert coverage["modes_covered"] == 8, coverage


@pytest.mark.slow
def test_multirun_sweep_lands_in_outputs_multirun(tmp_path):
    r = run_cli("train", "-m", "data=moons,rings", "train.steps=5", "train.log_every=5", "train.sample_every=0",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    runs = sorted((tmp_path / "outputs" / "multirun" / "train").glob("*/*/checkpoints/ema_5.safetensors"))
    assert len(runs) == 2


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_every_ddpm_prediction_trains_and_covers_all_modes(tmp_path, prediction):
    """The same loss function serves every parameterization; DDIM samples from each cover 8 modes."""
    from conftest import compose_config
    from diffcli.sample import run_sample
    from diffcli.train import run_train

    run_train(compose_config("train", ["data=eight_gaussians", f"model.prediction={prediction}",
                                       "train.steps=600", "train.sample_every=0", "device=cpu"]), tmp_path / "run")
    out = run_sample(compose_config("sample", [f"ckpt={tmp_path / 'run'}", "sampler=ddim", "steps=50", "n=2000",
                                               "batch_size=2000", "device=cpu"]), tmp_path / "sample")
    modes, std = eight_gaussians_modes(radius=2.0, std=0.1)
    coverage = mode_coverage(out.samples, modes, std)
    assert coverage["modes_covered"] == 8, coverage
