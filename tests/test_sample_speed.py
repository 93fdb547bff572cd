"""Sampling at the hardware's speed (issue 26): what `auto` chooses, the network's precision against the sampler's,
per-batch seeds that make the samples the same for any number of processes, and samples streamed to the file."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from diffcli import hardware
from diffcli.build import build_net
from diffcli.evaluate import run_eval
from diffcli.metrics import feature_statistics
from diffcli.runs import StreamedNpz
from diffcli.sample import run_sample
from diffcli.sampling import COMPILE_WORK, FastNet, Speed, batch_seed, inference_speed

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "tests" / "fixtures" / "legacy" / "flow.safetensors"
CPU = torch.device("cpu")


def _kind(monkeypatch, kind):
    monkeypatch.setattr(hardware, "cpu_kind", lambda: kind)


@pytest.mark.parametrize("kind, bf16", [("amx", True), ("avx512_bf16", True), ("avx512", False), ("avx2", False),
                                        ("other", False)])
def test_auto_precision_follows_what_was_measured_on_each_cpu_kind(monkeypatch, kind, bf16):
    _kind(monkeypatch, kind)
    measured = hardware.BF16_SPEEDUP["sample"].get(kind)
    assert bf16 == (measured is not None and measured >= hardware.PAYS)  # the table decides, nothing else
    assert inference_speed({}, CPU, True, 10).precision == ("bf16" if bf16 else "fp32")
    assert inference_speed({}, CPU, False, 10).precision == "fp32"  # 2D points: no gain measured, fp32
    assert inference_speed({"precision": "fp16"}, CPU, True, 10).precision == "fp16"  # an explicit choice stands


def test_auto_compiles_images_when_the_work_repays_it_and_then_goes_channels_last(monkeypatch):
    _kind(monkeypatch, "avx512")
    assert inference_speed({}, CPU, True, COMPILE_WORK - 1) == Speed("fp32", False, False)
    assert inference_speed({}, CPU, True, COMPILE_WORK) == Speed("fp32", True, True)
    assert inference_speed({}, CPU, False, 10 * COMPILE_WORK) == Speed("fp32", False, False)
    assert inference_speed({"compile": True, "channels_last": False}, CPU, True, 1) == Speed("fp32", True, False)


@pytest.mark.parametrize("speed, tol", [(Speed("fp32", False, True), 1e-5), (Speed("bf16", False, False), 3e-2),
                                        (Speed("bf16", False, True), 3e-2)])
def test_a_fast_net_computes_the_net_and_hands_back_fp32(speed, tol):
    torch.manual_seed(0)
    net = build_net(OmegaConf.load(ROOT / "configs" / "net" / "unet_small.yaml"), (1, 16, 16)).eval()
    x, t = torch.randn(4, 1, 16, 16), torch.rand(4)
    with torch.inference_mode():
        want = net(x, t)
        got = FastNet(net, speed)(x, t)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert (got - want).abs().max() <= tol * want.abs().max()
    if speed.precision == "bf16":  # the network did run in bf16: not fp32's result to fp32's round-off
        assert (got - want).abs().max() > 1e-5 * want.abs().max()


def _sample(tmp_path, name, *extra):
    cfg = compose_config("sample", [f"ckpt={FLOW}", "sampler=heun", "steps=4", "n=23", "batch_size=5", "seed=3",
                                    "device=cpu", *extra])
    out = run_sample(cfg, tmp_path / name)
    return out, np.load(tmp_path / name / "samples.npz")


def test_each_batch_is_drawn_from_its_own_seed(tmp_path):
    """Batch i of a run is the run of that batch alone from batch_seed(seed, i): no batch depends on another."""
    _, whole = _sample(tmp_path, "whole")
    for i, start in enumerate(range(0, 23, 5)):
        alone = compose_config("sample", [f"ckpt={FLOW}", "sampler=heun", "steps=4", f"n={min(5, 23 - start)}",
                                          "batch_size=5", f"seed={batch_seed(3, i)}", "device=cpu"])
        run_sample(alone, tmp_path / f"alone{i}")
        assert np.array_equal(np.load(tmp_path / f"alone{i}" / "samples.npz")["samples"],
                              whole["samples"][start : start + 5])
    assert len({batch_seed(3, i) for i in range(1000)} | {batch_seed(4, i) for i in range(1000)}) == 2000


def test_compiled_sampling_equals_eager(tmp_path):
    _, eager = _sample(tmp_path, "eager", "compile=false")
    _, compiled = _sample(tmp_path, "compiled", "compile=true")
    np.testing.assert_allclose(compiled["samples"], eager["samples"], rtol=1e-4, atol=1e-5)
    assert np.array_equal(compiled["t_grid"], eager["t_grid"]) and compiled["nfe"] == eager["nfe"]


def _torchrun(args, cwd, world=2):
    """`torchrun --standalone -m diffcli ARGS` in its own process group, all of it killed if it hangs."""
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={world}", "-m", "diffcli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_two_processes_draw_the_samples_one_draws(tmp_path):
    """torchrun with 2 gloo processes on the CPU: rank 0's samples.npz equals the one-process run's, bit for bit,
    and eval's metrics are the same numbers; only rank 0 writes a folder."""
    _, one = _sample(tmp_path, "one")
    done = _torchrun(["sample", f"ckpt={FLOW}", "sampler=heun", "steps=4", "n=23", "batch_size=5", "seed=3",
                      "device=cpu", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    two = np.load(tmp_path / "two" / "samples.npz")
    assert sorted(two.files) == sorted(one.files)
    for key in one.files:
        assert np.array_equal(one[key], two[key]), key
    assert not (tmp_path / "outputs").exists()  # rank 1 wrote no run folder of its own

    args = [f"ckpt={FLOW}", "sampler=heun", "steps=4", "n=23", "batch_size=5", "device=cpu", "metric=toy"]
    solo = run_eval(compose_config("eval", args), tmp_path / "eval_one")
    done = _torchrun(["eval", *args, f"hydra.run.dir={tmp_path / 'eval_two'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    pair = json.loads((tmp_path / "eval_two" / "metrics.json").read_text())
    assert pair["metrics"] == solo["metrics"]


def test_samples_stream_into_the_file_and_a_failed_run_leaves_none(tmp_path):
    rows = np.random.default_rng(0).normal(size=(23, 3, 4, 4)).astype(np.float32)
    npz = StreamedNpz(tmp_path / "s.npz")
    npz.begin("samples", rows.shape, "float32")
    for chunk in np.array_split(rows, 5):
        npz.write(chunk)
    npz.end()
    npz.add("nfe", 7)
    npz.close()
    back = np.load(tmp_path / "s.npz")
    assert np.array_equal(back["samples"], rows) and back["nfe"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]

    broken = StreamedNpz(tmp_path / "t.npz")
    broken.begin("samples", rows.shape, "float32")
    broken.write(rows[:5])
    with pytest.raises(ValueError, match="never written"):
        broken.end()
    broken.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_a_run_stopped_mid_sampling_leaves_no_samples_file(tmp_path, monkeypatch):
    from diffcli import sampling

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = sampling._one_batch
    monkeypatch.setattr(sampling, "_one_batch", failing)
    with pytest.raises(KeyboardInterrupt):
        _sample(tmp_path, "stopped")
    assert not any((tmp_path / "stopped").glob("*.npz*")) and not any((tmp_path / "stopped").glob(".*"))


def test_feature_statistics_in_chunks_are_numpys_mean_and_covariance():
    f = torch.randn(1000, 12, generator=torch.Generator().manual_seed(0)).float() * 3 + 1
    got = feature_statistics(f, chunk=64)
    x = f.double().numpy()
    np.testing.assert_allclose(got["mu"], x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["sigma"], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("guided", [["guidance=2.5"], ["label=3", "classifier_scale=2", "classifier={legacy}/ddpm_classifier.safetensors"]])
def test_guidance_runs_with_the_network_in_bf16(tmp_path, guided):
    """Classifier-free guidance's doubled batch and the classifier's gradient, with the networks in bf16: fp32
    samples within bf16's error of the fp32 run from the same noise."""
    legacy = ROOT / "tests" / "fixtures" / "legacy"
    base = [f"ckpt={legacy / 'ddpm_cond.safetensors'}", "sampler=ddim", "steps=6", "n=12", "batch_size=5",
            "device=cpu", *(o.format(legacy=legacy) for o in guided)]
    fp32 = run_sample(compose_config("sample", base + ["precision=fp32"]), tmp_path / "fp32")
    bf16 = run_sample(compose_config("sample", base + ["precision=bf16"]), tmp_path / "bf16")
    assert bf16.samples.dtype == torch.float32 and bf16.nfe == fp32.nfe
    gap = (bf16.samples - fp32.samples).abs().max()
    assert 0 < gap < 0.05 * fp32.samples.abs().max()
