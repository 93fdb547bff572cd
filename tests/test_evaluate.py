"""Toy metrics against closed forms, and `diffcli eval` writing metrics.json."""

import json
import math

import pytest
import torch

from conftest import compose_config
from diffcli import DiffcliError
from diffcli.data import eight_gaussians, eight_gaussians_modes
from diffcli.evaluate import mode_coverage, run_eval, sliced_wasserstein
from diffcli.train import run_train


def test_sliced_wasserstein_of_shifted_gaussians():
    """N(0, I) vs N(mu, I) in d dims: every projection is shifted by theta.mu, so SW2 = |mu| / sqrt(d)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 2, generator=g)
    mu = torch.tensor([1.2, -0.9])
    y = torch.randn(20_000, 2, generator=g) + mu
    assert sliced_wasserstein(x, y, n_proj=2000) == pytest.approx(mu.norm().item() / math.sqrt(2), rel=0.03)
    assert sliced_wasserstein(x, torch.randn(20_000, 2, generator=g)) < 0.03


def test_mode_coverage_counts_missing_and_off_mode_samples():
    g = torch.Generator().manual_seed(0)
    modes, std = eight_gaussians_modes()
    x = eight_gaussians(8000, generator=g, device="cpu")
    keep = torch.cdist(x, modes).argmin(1) != 3  # drop one mode entirely
    x = torch.cat([x[keep], torch.zeros(500, 2)])  # and add off-manifold points at the origin
    cov = mode_coverage(x, modes, std)
    assert cov["modes_covered"] == 7 and cov["mode_counts"][3] == 0
    assert cov["in_modes"] == pytest.approx(keep.sum().item() / len(x), abs=0.01)


def test_eval_writes_metrics(tmp_path):
    run_train(compose_config("train", ["data=eight_gaussians", "train.steps=20", "train.log_every=10",
                                       "device=cpu"]), tmp_path / "run")
    record = run_eval(compose_config("eval", [f"ckpt={tmp_path / 'run'}", "sampler=ddim", "steps=10", "n=400",
                                              "device=cpu"]), tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(record))
    assert saved["nfe"] == 10 and saved["step"] == 20 and saved["n"] == 400
    assert {"sliced_wasserstein", "modes_covered"} <= saved["metrics"].keys()
    assert (tmp_path / "eval" / "samples.png").is_file()


def test_eval_refuses_image_models_for_now(tmp_path):
    import numpy as np

    np.savez(tmp_path / "x.npz", images=np.zeros((8, 8, 8), dtype=np.uint8))
    run_train(compose_config("train", ["data=npz", f"data.path={tmp_path / 'x.npz'}", "net.ch=8", "net.ch_mult=[1]",
                                       "train.steps=1", "train.sample_every=0", "device=cpu"]), tmp_path / "run")
    with pytest.raises(DiffcliError, match="2D toy"):
        run_eval(compose_config("eval", [f"ckpt={tmp_path / 'run'}", "steps=2", "n=4", "device=cpu"]), tmp_path / "e")
