"""The GPU path, run with `pytest -m cuda` where a CUDA GPU is present (skipped elsewhere): training steps in
fp32, bf16 and fp16 with the gradient scaler, compile with channels-last against eager, sampling with an ODE
and an SDE sampler, exact resume, and no host sync inside the training step."""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config
from diffcli.checkpoint import read_metadata
from diffcli.sample import run_sample
from diffcli.train import run_train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m cuda on one)")]


@pytest.fixture
def images(tmp_path):
    """32 random 16x16 RGB images in an npz: the U-Net's code paths, not its quality."""
    file = tmp_path / "x.npz"
    np.savez(file, images=np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8))
    return ["data=npz", f"data.path={file}", "net=unet_small", "net.ch=32", "net.ch_mult=[1,2]",
            "train.batch_size=8", "train.sample_every=0", "train.eval_every=0", "train.log_every=1",
            "train.warmup=1", "device=cuda"]


def weights(run, step, kind="ema"):
    return load_file(str(run / "checkpoints" / f"{kind}_{step}.safetensors"))


def losses(run):
    return [json.loads(r)["loss"] for r in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_steps_at_each_precision(tmp_path, images, precision):
    """A few steps under autocast (fp16 with the scaler): finite losses, finite weights, the scaler's state saved."""
    run_train(compose_config("train", images + ["train.steps=6", f"train.precision={precision}",
                                                "train.compile=false"]), tmp_path)
    assert all(np.isfinite(losses(tmp_path)))
    assert all(torch.isfinite(v).all() for v in weights(tmp_path, 6).values())
    meta = read_metadata(tmp_path / "checkpoints" / "state_6.safetensors")
    assert ("scale" in json.loads(meta["scaler"])) == (precision == "fp16")


def test_compile_and_channels_last_train_like_eager(tmp_path, images):
    """torch.compile + NHWC change kernels, not the computation: the same weights as eager NCHW to float tolerance."""
    base = images + ["train.steps=3", "train.precision=fp32"]
    run_train(compose_config("train", base + ["train.compile=false", "train.channels_last=false"]), tmp_path / "eager")
    run_train(compose_config("train", base + ["train.compile=true", "train.channels_last=true"]), tmp_path / "fast")
    a, b = weights(tmp_path / "eager", 3, "state"), weights(tmp_path / "fast", 3, "state")
    for k in a:
        if k.startswith("net."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("sampler", [["sampler=heun", "steps=4"], ["sampler=euler_maruyama", "steps=8"]])
def test_sampling_on_cuda(tmp_path, images, sampler):
    """An ODE and an SDE sampler on the GPU: finite images of the right shape, the NFE the CPU counts, and the
    same images from the same seed twice."""
    run_train(compose_config("train", images + ["model=flow" if "heun" in sampler[0] else "model=vpsde",
                                                "train.steps=2", "train.compile=false"]), tmp_path / "run")
    runs = {name: run_sample(compose_config("sample", [f"ckpt={tmp_path / 'run'}", *sampler, "n=4", f"device={dev}"]),
                             tmp_path / name) for name, dev in (("a", "cuda"), ("b", "cuda"), ("cpu", "cpu"))}
    assert runs["a"].samples.shape == (4, 3, 16, 16) and torch.isfinite(runs["a"].samples).all()
    torch.testing.assert_close(runs["a"].samples, runs["b"].samples, rtol=1e-4, atol=1e-4)
    assert runs["a"].nfe == runs["cpu"].nfe


def test_sampling_speed_settings_on_cuda(tmp_path, images):
    """bf16, compiled, channels-last sampling (auto's choice on a GPU with bf16) against fp32 eager from the same
    noise: fp32 samples, the same NFE, and differences of bf16's size; a classifier-free batch too."""
    run_train(compose_config("train", images + ["model=flow", "train.steps=2", "train.compile=false"]), tmp_path / "r")
    base = [f"ckpt={tmp_path / 'r'}", "sampler=heun", "steps=6", "n=8", "device=cuda"]
    slow = run_sample(compose_config("sample", base + ["precision=fp32", "compile=false", "channels_last=false"]),
                      tmp_path / "fp32")
    fast = run_sample(compose_config("sample", base + ["precision=bf16", "compile=true", "channels_last=true"]),
                      tmp_path / "bf16")
    assert fast.samples.dtype == torch.float32 and fast.nfe == slow.nfe
    assert (fast.samples - slow.samples).abs().max() < 0.1 * slow.samples.abs().max()


def test_resume_on_cuda(tmp_path, images):
    """6 steps straight == 3 steps, stop, resume to 6 (deterministic cuDNN): the same weights."""
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    base = images + ["train.precision=bf16", "train.compile=false"]
    run_train(compose_config("train", base + ["train.steps=6", "train.ckpt_every=3"]), tmp_path / "straight")
    run_train(compose_config("train", base + ["train.steps=3"]), tmp_path / "split")
    resume = ["train.steps=6", f"train.resume={tmp_path / 'split'}"]
    run_train(compose_config("train", base + resume), tmp_path / "ignored", overrides=resume)
    a, b = weights(tmp_path / "straight", 6), weights(tmp_path / "split", 6)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "split"), rel=1e-5)


def test_no_host_sync_inside_the_training_step(tmp_path, images):
    """torch.cuda.set_sync_debug_mode warns at every synchronising call: none between log lines."""
    cfg = compose_config("train", images + ["train.steps=8", "train.log_every=8", "train.ckpt_every=8",
                                            "train.precision=bf16", "train.compile=false"])
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_train(cfg, tmp_path)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # the set-up, one log line and one checkpoint synchronise; 8 steps must not add one each
    assert len(syncs) < 8, [str(w.message) for w in syncs[:10]]
