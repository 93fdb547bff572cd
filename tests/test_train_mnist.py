"""Real data: a short U-Net run on the MNIST test split in ../shared/data lowers the loss."""

import json

import pytest

from conftest import SHARED_DATA, compose_config, needs_shared_data
from diffcli.train import run_train


@needs_shared_data
@pytest.mark.slow
def test_unet_on_real_mnist_lowers_the_loss(tmp_path):
    cfg = compose_config("train", [
        "data=mnist", f"data.root={SHARED_DATA}", "data.split=test", "data.download=false",
        "train.steps=120", "train.batch_size=32", "train.warmup=10", "train.lr=1e-3", "train.log_every=20",
        "train.sample_every=0", "train.n_samples=16", "device=cpu"])
    assert cfg.net._target_ == "diffcli.nets.UNet"
    run_train(cfg, tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    # eps-MSE starts near 1 (an untrained net predicts ~0) and must fall well below it
    assert losses[-1] < 0.5 * losses[0], losses
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "checkpoints" / "ema_120.safetensors").is_file()
