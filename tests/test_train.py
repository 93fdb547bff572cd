"""The training loop: exact resume, mixed-precision paths on CPU, logs, pictures, sampling images."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config
from diffcli.checkpoint import read_metadata
from diffcli.sample import run_sample
from diffcli.train import run_train

BASE = ["data=moons", "train.batch_size=64", "train.log_every=5", "train.warmup=3", "device=cpu"]
TOY = BASE + ["train.sample_every=0"]  # the last-step picture (2,000 points of 1,000-step DDPM) costs ~17 s


def weights(run_dir, step, kind="ema"):
    return load_file(str(run_dir / "checkpoints" / f"{kind}_{step}.safetensors"))


def test_resume_is_bitwise_exact(tmp_path):
    """20 steps straight == 10 steps, stop, resume to 20: same weights, EMA and logged losses."""
    run_train(compose_config("train", TOY + ["train.steps=20", "train.ckpt_every=10"]), tmp_path / "straight")
    run_train(compose_config("train", TOY + ["train.steps=10"]), tmp_path / "split")
    resumed = compose_config("train", TOY + ["train.steps=20", f"train.resume={tmp_path / 'split'}"])
    run_train(resumed, tmp_path / "ignored", overrides=["train.steps=20", f"train.resume={tmp_path / 'split'}"])
    for kind in ("ema", "state"):
        a, b = weights(tmp_path / "straight", 20, kind), weights(tmp_path / "split", 20, kind)
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("rng"):
                assert torch.equal(a[k], b[k]), k
    loss = lambda d: [json.loads(r)["loss"] for r in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss(tmp_path / "straight") == loss(tmp_path / "split")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tmp_path, precision):
    """autocast (and for fp16 the gradient scaler) on the CPU: the same code path CUDA takes."""
    cfg = compose_config("train", TOY + ["train.steps=10", f"train.precision={precision}"])
    run_train(cfg, tmp_path)
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    scaler = json.loads(read_metadata(tmp_path / "checkpoints" / "state_10.safetensors")["scaler"])
    assert ("scale" in scaler) == (precision == "fp16")  # the scaler's state is saved to resume with


def test_logs_pictures_and_checkpoint_pruning(tmp_path):
    cfg = compose_config("train", BASE + ["train.steps=30", "train.sample_every=10", "train.n_samples=50",
                                         "train.ckpt_every=10", "train.keep_last=2"])
    run_train(cfg, tmp_path)
    rows = [json.loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert {"loss", "lr", "grad_norm", "it_per_s", "samples_per_s"} <= rows[0].keys()
    assert rows[0]["lr"] == pytest.approx(1e-3)  # past the 3-step warm-up
    assert sorted(p.name for p in tmp_path.glob("samples_*.png")) == [f"samples_{s:07d}.png" for s in (10, 20, 30)]
    assert (tmp_path / "loss.png").is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ema_20.safetensors", "ema_30.safetensors", "state_20.safetensors", "state_30.safetensors"]


def test_warmup_is_linear(tmp_path):
    cfg = compose_config("train", TOY + ["train.steps=4", "train.warmup=8", "train.log_every=1"])
    run_train(cfg, tmp_path)
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3 * k / 8 for k in (2, 3, 4, 5)])  # LR of the next step after step k


def test_cosine_schedule_follows_sgdr_after_the_warm_up(tmp_path):
    """train.lr_schedule=cosine: eta_t = 0.5 eta_max (1 + cos(pi T_cur / T)) after the warm-up (SGDR, eq. 5)."""
    cfg = compose_config("train", TOY + ["train.steps=10", "train.warmup=2", "train.log_every=1",
                                         "train.lr_schedule=cosine"])
    run_train(cfg, tmp_path)
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    t_cur = [k - 2 for k in range(1, 11)]  # the step after step k is 0-based step k; the warm-up is steps 0, 1
    expected = [1e-3 if t < 0 else 0.5e-3 * (1 + math.cos(math.pi * t / 8)) for t in t_cur]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[1] == pytest.approx(1e-3)


def test_lr_factor_matches_torch_warmup_then_cosine_annealing():
    """lr_factor against torch's own schedulers: LinearLR over the warm-up, then CosineAnnealingLR to 0."""
    from omegaconf import OmegaConf

    from diffcli.training import lr_factor

    steps, warmup = 300, 40
    tc = OmegaConf.create({"steps": steps, "warmup": warmup, "lr_schedule": "cosine"})
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    reference = []
    for _ in range(warmup):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        warm.step()
    opt.param_groups[0]["lr"] = 1.0
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=0.0)
    for _ in range(steps - warmup):
        reference.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert [lr_factor(s, tc) for s in range(steps)] == pytest.approx(reference, abs=1e-9)


def test_sample_images_from_an_npz_dataset(tmp_path):
    """A U-Net on the user's own npz images: training, then sampling rebuilt from the checkpoint alone."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    cfg = compose_config("train", ["data=npz", f"data.path={tmp_path / 'mine.npz'}", "net=unet_small",
                                   "net.ch=8", "net.ch_mult=[1,2]", "train.steps=3", "train.batch_size=8",
                                   "train.log_every=1", "train.sample_every=0", "device=cpu"])
    run_train(cfg, tmp_path / "run")
    out = run_sample(compose_config("sample", [f"ckpt={tmp_path / 'run'}", "sampler=ddim", "steps=4", "n=6",
                                               "batch_size=4", "device=cpu"]), tmp_path / "sample")
    saved = np.load(tmp_path / "sample" / "samples.npz")
    assert saved["samples"].shape == (6, 3, 16, 16) and int(saved["nfe"]) == 4 == out.nfe
    assert (tmp_path / "sample" / "samples.png").stat().st_size > 0


@pytest.mark.slow
def test_sigterm_checkpoints_and_resumes(tmp_path):
    """SIGTERM to a running `diffcli train`: it saves the step it finished, exits, and resumes from there."""
    import signal

    from conftest import run_cli, start_training
    from diffcli.checkpoint import list_checkpoints

    proc = start_training("data=moons", "train.steps=1000000", "train.log_every=20", "train.ckpt_every=1000000",
                          "train.sample_every=0", cwd=tmp_path, lines=2)
    log = tmp_path / "run" / "log.jsonl"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    (state,) = list_checkpoints(tmp_path / "run" / "checkpoints", "state")
    step = int(state.stem.split("_")[1])
    assert step >= 40 and "train.resume=" in stdout + stderr

    r = run_cli("train", "train.resume=run", f"train.steps={step + 30}", "train.log_every=10",
                "train.sample_every=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoints" / f"ema_{step + 30}.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == step + 30  # no step logged twice


def test_every_run_ends_with_a_titled_picture_of_its_samples(tmp_path):
    """Pictures at multiples of train.sample_every and at the last step, titled with step, formulation and sampler."""
    from unittest import mock

    from diffcli import fitting as train

    cfg = compose_config("train", BASE + ["train.steps=7", "train.sample_every=5", "train.n_samples=50",
                                         "sampler=ddim", "steps=4"])
    with mock.patch.object(train, "save_picture", wraps=train.save_picture) as drawn:
        run_train(cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("samples_*.png")) == ["samples_0000005.png", "samples_0000007.png"]
    title = drawn.call_args_list[-1].args[-1]
    assert title.startswith("ddpm (eps) on moons: EMA at step 7\nddim on the ddim grid of 5 times")
    assert title.endswith("NFE 4")  # DDIM: one evaluation per step
