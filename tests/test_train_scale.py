"""Training at scale: non-finite steps, gradient accumulation, DDP through torchrun, compile, channels-last."""

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_config
from diffcli import DiffcliError, distributed
from diffcli import fitting as train_module
from diffcli import training as training_module
from diffcli.checkpoint import load_state
from diffcli.paths import VPPath
from diffcli.train import run_train
from diffcli.training import build_optimization, train_step

TOY = ["data=moons", "train.log_every=1", "train.sample_every=0", "train.eval_every=0", "device=cpu"]


def _weights(run_dir, step, kind="state"):
    tensors = load_file(run_dir / "checkpoints" / f"{kind}_{step}.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("net.", "ema."))} if kind == "state" else tensors


def _assert_same_weights(run_a, run_b, step):
    """Weights and EMA of two runs at `step` agree to float rounding (summation order may differ)."""
    a, b = _weights(run_a, step), _weights(run_b, step)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _nan_on(steps, monkeypatch):
    """Make pair_loss non-finite on the given (0-based) optimizer steps: what a diverging run produces."""
    real, calls = training_module.pair_loss, {"step": -1}

    def step_counter(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * math.nan if calls["step"] in steps else loss

    def counting_train_step(*args, **kwargs):
        calls["step"] += 1
        return real_step(*args, **kwargs)

    real_step = train_module.train_step
    monkeypatch.setattr(training_module, "pair_loss", step_counter)
    monkeypatch.setattr(train_module, "train_step", counting_train_step)


def test_a_non_finite_step_leaves_weights_and_optimizer_untouched():
    """train_step on a NaN loss: weights, AdamW moments and step counts bitwise as before; flagged on the device."""
    cfg = compose_config("train", TOY)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))
    model = lambda x, t: net(torch.cat([x, t[:, None].float()], 1))  # noqa: E731
    model.parameters = net.parameters
    ema, opt, scaler, autocast = build_optimization(cfg, net, torch.device("cpu"), "fp32")
    path, world, g = VPPath(), distributed.World(), torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 2, generator=g)
    train_step(model, path, cfg.model, x0, g, opt, scaler, autocast, 1.0, 8, world)  # one good step: Adam state
    before = ({k: v.clone() for k, v in net.state_dict().items()},
              [{k: v.clone() for k, v in s.items()} for s in opt.state.values()])
    _, grad_norm, finite = train_step(model, path, cfg.model, x0 * math.nan, g, opt, scaler, autocast, 1.0, 8, world)
    assert not finite and not math.isfinite(grad_norm)
    assert all(torch.equal(v, before[0][k]) for k, v in net.state_dict().items())
    for state, old in zip(opt.state.values(), before[1]):
        assert all(torch.equal(state[k], old[k]) for k in old)
    _, _, finite = train_step(model, path, cfg.model, x0, g, opt, scaler, autocast, 1.0, 8, world)
    assert finite and not torch.equal(net[0].weight, before[0]["0.weight"])  # and training goes on


def test_skipped_steps_are_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    _nan_on({3, 4}, monkeypatch)
    out = run_train(compose_config("train", TOY + ["train.steps=8"]), tmp_path)
    rows = [__import__("json").loads(r) for r in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert out["skipped"] == 2 and rows[-1]["skipped"] == 2 and rows[2]["skipped"] == 0 and rows[3]["skipped"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] not in (4, 5))


def test_consecutive_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_on(set(range(5, 100)), monkeypatch)
    cfg = compose_config("train", TOY + ["train.steps=40", "train.ckpt_every=5", "train.max_nonfinite=3",
                                         "train.log_every=100"])  # found at the checkpoint of step 10, before writing it
    with pytest.raises(DiffcliError, match=r"\d+ consecutive training steps had a non-finite loss.*train.max_nonfinite=3"):
        run_train(cfg, tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ema_5.safetensors", "state_5.safetensors"]  # nothing written after the run went bad
    state = load_state(tmp_path / "checkpoints" / "state_5.safetensors")
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["net"].values())


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """grad_accum=4 over micro-batches of 16 = one batch of 64: the same draws, the same gradient (to rounding)."""
    base = TOY + ["train.steps=5", "train.batch_size=64"]
    run_train(compose_config("train", base), tmp_path / "one")
    run_train(compose_config("train", base + ["train.grad_accum=4"]), tmp_path / "four")
    _assert_same_weights(tmp_path / "one", tmp_path / "four", 5)


def test_batch_must_split_evenly():
    with pytest.raises(DiffcliError, match="must split evenly.*multiple of 3"):
        distributed.micro_batch(distributed.World(), 64, 3)


def test_channels_last_gives_the_same_training_on_cpu(tmp_path):
    """NHWC is a memory layout, not a different computation: the same weights after a few U-Net steps."""
    import numpy as np

    np.savez(tmp_path / "x.npz", images=np.random.default_rng(0).integers(0, 255, (32, 8, 8, 3), dtype=np.uint8))
    base = ["data=npz", f"data.path={tmp_path / 'x.npz'}", "net.ch=8", "net.ch_mult=[1,2]", "train.steps=3",
            "train.batch_size=8", "train.sample_every=0", "train.log_every=1", "device=cpu"]
    run_train(compose_config("train", base + ["train.channels_last=false"]), tmp_path / "nchw")
    run_train(compose_config("train", base + ["train.channels_last=true"]), tmp_path / "nhwc")
    _assert_same_weights(tmp_path / "nchw", tmp_path / "nhwc", 3)


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    """train.compile=true (torch.compile, inductor on CPU): the same losses as eager to float tolerance."""
    base = TOY + ["train.steps=4"]
    run_train(compose_config("train", base), tmp_path / "eager")
    run_train(compose_config("train", base + ["train.compile=true"]), tmp_path / "compiled")
    _assert_same_weights(tmp_path / "eager", tmp_path / "compiled", 4)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """torchrun --nproc_per_node=2 (DDP, gloo on CPU) vs a single process: the same weights after k steps."""
    common = ["train", "data=moons", "train.steps=6", "train.batch_size=64", "train.log_every=3",
              "train.sample_every=0", "train.eval_every=0", "device=cpu"]
    single = subprocess.run([sys.executable, "-m", "diffcli", *common, f"hydra.run.dir={tmp_path / 'one'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "diffcli", *common], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1, runs  # one run folder for both ranks
    assert not (tmp_path / "train.log").exists()  # rank 1 writes nothing of its own
    _assert_same_weights(tmp_path / "one", runs[0], 6)
    log = (runs[0] / "log.jsonl").read_text().splitlines()
    assert len(log) == 2  # rank 0 alone logs


def test_auto_precision_and_compile_follow_the_hardware(monkeypatch):
    """precision/compile/channels_last=auto: bf16 for image nets where bf16 has units of its own (AMX on a CPU),
    compiled and NHWC on runs that repay the compile; fp32 eager NCHW for 2D points and CPUs without AMX;
    explicit values stand."""
    from omegaconf import OmegaConf

    from diffcli.training import COMPILE_STEPS, speed_settings

    cpu = torch.device("cpu")
    tc = OmegaConf.create({"precision": "auto", "compile": "auto", "channels_last": "auto", "steps": COMPILE_STEPS})
    short = OmegaConf.merge(tc, {"steps": COMPILE_STEPS - 1})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert speed_settings(tc, cpu, is_image=True) == ("bf16", True, True)
    assert speed_settings(tc, cpu, is_image=False) == ("fp32", False, False)
    assert speed_settings(short, cpu, is_image=True) == ("bf16", False, False)  # eager NHWC bf16 is slower (torch's GroupNorm)
    assert speed_settings(OmegaConf.merge(short, {"compile": True}), cpu, is_image=True) == ("bf16", True, True)
    assert speed_settings(OmegaConf.merge(tc, {"channels_last": False}), cpu, is_image=True) == ("bf16", True, False)
    fp16 = OmegaConf.merge(tc, {"precision": "fp16", "compile": False})
    assert speed_settings(fp16, cpu, True) == ("fp16", False, False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert speed_settings(tc, cpu, is_image=True) == ("fp32", False, False)


def test_the_run_log_names_the_precision_and_compile_it_chose(tmp_path, caplog):
    """What auto chose is in train.log's first line (here: a CPU run of 2D points, fp32 eager)."""
    import logging

    with caplog.at_level(logging.INFO, logger="diffcli"):
        run_train(compose_config("train", TOY + ["train.steps=2"]), tmp_path)
    first = next(r.getMessage() for r in caplog.records if "parameters" in r.getMessage())
    assert first.endswith("fp32"), first
