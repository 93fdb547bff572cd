"""diffcli models exported as diffusers folders: DDIMPipeline / DDPMPipeline load them and sample what diffcli
samples from the same noise; export -> import -> sample is bitwise; what diffusers' schedulers cannot express is
refused in one line; the commands' errors are one line with exit 2 and leave no folder."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_config, run_cli

pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDPMPipeline  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from diffcli import DiffcliError  # noqa: E402
from diffcli.build import build_net  # noqa: E402
from diffcli.checkpoint import save_ema  # noqa: E402
from diffcli.convert import run_export, run_import  # noqa: E402
from test_diffusers_import import diffcli_run, pipeline_run  # noqa: E402

SHAPE = (1, 16, 16)
TINY = ["net=unet_small", "net.ch=8", "net.ch_mult=[1,2]", "net.groups=4", "net.attn_resolutions=[8]",
        "net.num_res_blocks=1", "net.time_scale=50", "model.path.T=50"]


def diffcli_checkpoint(tmp_path, *overrides, name="run", classes=0):
    """A diffcli run folder holding a randomly weighted model of `overrides` (every parameter drawn)."""
    cfg = compose_config("train", ["data=mnist", *overrides])
    if classes:
        cfg.model.cond, cfg.model.n_classes = "class", classes
    torch.manual_seed(0)
    net = build_net(cfg.net, SHAPE, n_classes=classes)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.15)
    file = tmp_path / name / "checkpoints" / "ema_10.safetensors"
    file.parent.mkdir(parents=True)
    save_ema(file, net.state_dict(), cfg, 10, SHAPE)
    return tmp_path / name


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_on_an_exported_unet_equals_diffcli(tmp_path, eta):
    """diffcli's own U-Net mapped layer by layer (the time offset folded into the first embedding layer):
    DDIMPipeline on the folder equals diffcli's ddim on the checkpoint, from the same noise, to 1e-5."""
    run = diffcli_checkpoint(tmp_path, "model=ddpm", *TINY)
    folder = run_export(str(run), str(tmp_path / "exported"))
    ref = pipeline_run(folder, DDIMPipeline, eta=eta, num_inference_steps=10, use_clipped_model_output=True)
    ours = diffcli_run(run, ["sampler=ddim", "steps=10", f"eta={eta}"])
    assert (ours.clamp(-1, 1) - ref).abs().max() < 1e-5


def test_ddpm_pipeline_on_an_exported_unet_equals_diffcli(tmp_path):
    """DDPMPipeline (all 50 steps) on the folder equals diffcli's ancestral to 1e-5 with the scheduler's table in
    float64 (diffusers' float32 table: test_diffusers_import)."""
    run = diffcli_checkpoint(tmp_path, "model=ddpm", *TINY)
    folder = run_export(str(run), str(tmp_path / "exported"))
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"  # model=ddpm's
    ref = pipeline_run(folder, DDPMPipeline, num_inference_steps=50, float64_table=True)
    assert (diffcli_run(run, []).clamp(-1, 1) - ref).abs().max() < 1e-5


def test_a_conditional_model_exports_with_its_null_class(tmp_path):
    """A class-conditional U-Net exports num_class_embeds = K + 1 with "no label" named; imported back it samples
    every class and classifier-free guidance as the diffcli checkpoint does (to float32 rounding)."""
    run = diffcli_checkpoint(tmp_path, "model=ddpm", *TINY, classes=3)
    folder = run_export(str(run), str(tmp_path / "exported"))
    config = json.loads((folder / "unet/config.json").read_text())
    assert config["num_class_embeds"] == 4 and config["_diffcli_null_class"] == 3
    for extra in (["labels=[0,1,2,1]"], ["label=2", "guidance=3"]):
        a = diffcli_run(run, ["sampler=ddim", "steps=10", *extra], n=4)
        b = diffcli_run(folder, ["sampler=ddim", "steps=10", "sampler.fn.use_clipped_model_output=true", *extra], n=4)
        assert (a - b).abs().max() < 1e-4, extra


def test_export_import_sample_is_bitwise(tmp_path):
    """export -> import -> sample equals sampling the exported folder bit for bit, and exporting the import again
    writes the same tensors."""
    run = diffcli_checkpoint(tmp_path, "model=ddpm", *TINY, "model.prediction=v")
    folder = run_export(str(run), str(tmp_path / "exported"))
    imported = run_import(str(folder), str(tmp_path / "imported"))
    assert torch.equal(diffcli_run(imported, ["sampler=ddim", "steps=10"]),
                       diffcli_run(folder, ["sampler=ddim", "steps=10"]))
    again = run_export(str(imported), str(tmp_path / "again"))
    a, b = (load_file(str(f / "unet/diffusion_pytorch_model.safetensors")) for f in (folder, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scheduler = json.loads((again / "scheduler/scheduler_config.json").read_text())
    assert scheduler == json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


@pytest.mark.parametrize("overrides,fragment", [
    (["model=flow", "net=unet_small", "net.ch=8", "net.ch_mult=[1,2]", "net.groups=4"], "path FlowPath"),
    (["model=vpsde", "net=unet_small", "net.ch=8", "net.ch_mult=[1,2]", "net.groups=4"], "path VPPath"),
    (["model=ddpm", "model.path.T=50", "net=unet_small", "net.ch=8", "net.ch_mult=[1,2]", "net.groups=4"], "time_scale"),
])
def test_what_diffusers_cannot_express_is_refused_in_one_line(tmp_path, overrides, fragment):
    run = diffcli_checkpoint(tmp_path, *overrides)
    with pytest.raises(DiffcliError, match=fragment) as e:
        run_export(str(run), str(tmp_path / "exported"))
    assert "\n" not in str(e.value) and not (tmp_path / "exported").exists()


@pytest.mark.slow
def test_the_commands_from_the_shell(tmp_path):
    """`diffcli export`, `diffcli import` and `diffcli sample ckpt=<diffusers folder>` run; bad input is one line,
    exit 2, and leaves no folder."""
    run = diffcli_checkpoint(tmp_path, "model=ddpm", *TINY)
    done = run_cli("export", str(run), "exported", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "exported/unet/config.json").is_file(), done.stderr
    done = run_cli("import", "exported", "out=imported", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "imported/checkpoints/ema_0.safetensors").is_file(), done.stderr
    done = run_cli("sample", "ckpt=exported", "n=4", "steps=5", "hydra.run.dir=sampled", cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "sampled/samples.npz").is_file(), done.stderr
    (tmp_path / "exported/unet/diffusion_pytorch_model.safetensors").rename(
        tmp_path / "exported/unet/diffusion_pytorch_model.bin")
    for args in (["import", "exported", "out=bad"], ["sample", "ckpt=exported", "hydra.run.dir=bad"],
                 ["export", str(run), "exported"], ["import", "exported", "colour=red"]):
        done = run_cli(*args, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, (args, done.stderr)
        assert not (tmp_path / "bad").exists()


def test_net_diffusers_unet2d_trains_here_and_exports(tmp_path):
    """`diffcli train net=diffusers_unet2d` with class labels: finite steps, a checkpoint that samples with
    classifier-free guidance (its null class is the last embedding), exported as it is (the same tensors)."""
    import numpy as np

    from diffcli.train import run_train

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", images=rng.integers(0, 256, (16, 16, 16), dtype=np.uint8),
             labels=np.arange(16) % 3)
    run_train(compose_config("train", [
        "data=npz", f"data.path={tmp_path / 'x.npz'}", "model=ddpm", "model.path.T=50", "model.cond=class",
        "net=diffusers_unet2d", "net.T=50", "net.block_out_channels=[8,16]", "net.norm_num_groups=4",
        "net.down_block_types=[DownBlock2D,AttnDownBlock2D]", "net.up_block_types=[AttnUpBlock2D,UpBlock2D]",
        "train.steps=3", "train.batch_size=4", "train.sample_every=0", "train.eval_every=0", "train.warmup=1",
        "train.compile=false", "device=cpu"]), tmp_path / "run")
    x = diffcli_run(tmp_path / "run", ["sampler=ddim", "steps=5", "label=1", "guidance=2"])
    assert torch.isfinite(x).all()
    folder = run_export(str(tmp_path / "run"), str(tmp_path / "exported"))
    config = json.loads((folder / "unet/config.json").read_text())
    assert config["num_class_embeds"] == 4 and config["_diffcli_null_class"] == 3
    ours = load_file(str(tmp_path / "run/checkpoints/ema_3.safetensors"))
    theirs = load_file(str(folder / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(ours[f"unet.{k}"], v) for k, v in theirs.items()) and len(ours) == len(theirs)
