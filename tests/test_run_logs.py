"""Logs that say what ran: the sampler, its grid and NFE; one-line warnings for a schedule the run cannot honour."""

import numpy as np
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from diffcli.training import schedule_warnings

TINY = ["train.batch_size=64", "train.log_every=2", "train.sample_every=0", "train.eval_every=0"]


def test_sample_log_names_the_sampler_its_grid_and_nfe(tmp_path):
    """NCSN's annealed Langevin: L = 10 levels of n_steps = 100 and one denoising step, 1001 evaluations."""
    r = run_cli("train", "model=ncsn", "data=moons", "train.steps=2", *TINY, "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("sample", "ckpt=run", "n=4", "hydra.run.dir=s", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = compose_config("train", ["model=ncsn"]).model
    langevin = compose_config("sample", ["sampler=langevin"]).sampler.fn
    nfe = model.path.L * langevin.n_steps + 1
    assert int(np.load(tmp_path / "s" / "samples.npz")["nfe"]) == nfe
    log = (tmp_path / "s" / "sample.log").read_text()
    assert f"langevin on the levels grid of {model.path.L} times" in log
    assert f"{nfe} network evaluations (NFE) per sample" in log and "with 9 steps" not in log


def _train_cfg(preset, **changes):
    tc = compose_config("train", [f"train={preset}"]).train
    return OmegaConf.merge(tc, changes)


def test_schedule_warnings_against_hand_computed_cases():
    assert schedule_warnings(_train_cfg("toy")) == []  # 5000 steps, warm-up 100, EMA 0.999 with its warm-up
    assert schedule_warnings(_train_cfg("quick")) == []  # the short-run preset: none of the image preset's traps
    (line,) = schedule_warnings(_train_cfg("default", steps=300))  # the image preset on a short run
    assert "train.steps=300 is smaller than train.warmup=5000" in line and "1.2e-05" in line  # 2e-4 * 300 / 5000
    # no EMA warm-up: a constant decay 0.999 keeps 0.999^500 = 61% of the initial weights after 500 steps, 37% after 1000
    (line,) = schedule_warnings(_train_cfg("toy", steps=500, warmup=0, ema={"warmup": 0}))
    assert "EMA's half-life is longer than the run" in line and "61%" in line
    assert schedule_warnings(_train_cfg("toy", steps=1000, warmup=0, ema={"warmup": 0})) == []


def test_a_run_shorter_than_its_warmup_warns_in_one_line_at_the_start(tmp_path):
    r = run_cli("train", "data=moons", "train=default", "train.steps=2", "train.ema.warmup=0", *TINY,
                "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    warnings = [line for line in lines if "[WARNING]" in line]
    assert len(warnings) == 2 and "train.warmup=5000" in warnings[0] and "holds 100%" in warnings[1]
    assert lines.index(warnings[1]) < next(i for i, line in enumerate(lines) if "step 2 " in line)
