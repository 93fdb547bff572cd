"""diffusers folders opened as diffcli models: the network is diffusers' own UNet2DModel (bitwise), the scheduler
config maps onto diffcli's path, prediction and sampling options, and diffusers' own DDIMPipeline / DDPMPipeline
on a folder equal diffcli's ddim / ancestral on the same folder from the same noise. Folders are built with
save_pretrained from small random models: nothing is downloaded."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import compose_config

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: E402
                       UNet2DModel)

from diffcli import DiffcliError  # noqa: E402
from diffcli.guidance import condition  # noqa: E402
from diffcli.loading import load_model  # noqa: E402
from diffcli.sampling import plan  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")
SMALL = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             norm_num_groups=4, attention_head_dim=None, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False)
# diffusers' train_unconditional example's U-Net, small: multi-head attention (head width 8), freq_shift 0,
# [cos, sin] embedding, downsample_padding 0
EXAMPLE = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=8, attention_head_dim=8, downsample_padding=0)


def random_unet(seed: int = 0, **config) -> UNet2DModel:
    """A UNet2DModel with every parameter drawn (so that no zero-initialised layer hides a wrong input)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**{**SMALL, **config})
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.15)
    return unet.eval()


def save_folder(tmp_path, unet, scheduler, name="pipe", pipeline=DDIMPipeline):
    folder = tmp_path / name
    pipeline(unet, scheduler).save_pretrained(folder)
    return folder


def sample_cfg(folder, *overrides):
    return compose_config("sample", [f"ckpt={folder}", "device=cpu", "precision=fp32", "compile=false",
                                     "channels_last=false", *overrides])


def diffcli_run(folder, overrides, noise_seed=0, n=2):
    """diffcli's sampler on the folder under the command line's conditions (labels, guidance, guide), started
    from the first draw of a seeded generator and drawing its noise from the same stream, as diffusers'
    pipelines do."""
    model = load_model(str(folder), CPU)
    run = plan(sample_cfg(folder, *overrides, f"n={n}"), model, CPU)
    g = torch.Generator().manual_seed(noise_seed)
    x = torch.randn((n, *model.shape), generator=g)
    with torch.no_grad():
        return run.sampler(condition(run.denoiser, run.labels, **run.conditions), model.denoiser.path, x, run.grid,
                           generator=g)


def pipeline_run(folder, pipeline, noise_seed=0, n=2, float64_table=False, **kwargs):
    """diffusers' pipeline on the folder (its output in [0, 1] mapped back to [-1, 1]); `float64_table`: its
    scheduler's alphas_cumprod computed in float64 from the same linear betas (diffusers computes it in float32)."""
    pipe = pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if float64_table:
        c = pipe.scheduler.config
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float64)
        pipe.scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
    out = pipe(batch_size=n, generator=torch.Generator().manual_seed(noise_seed), output_type="np", **kwargs).images
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


@pytest.mark.parametrize("labels", [None, [0, 2, 3, 1]])
def test_the_network_is_unet2dmodel_bitwise(tmp_path, labels):
    """DiffusersUNet2D at t = (i + 1) / T is UNet2DModel at timestep i, bit for bit (float32, class labels too;
    diffcli's "no label" is the embedding row the folder names as null)."""
    classes = dict(num_class_embeds=4) if labels else {}
    unet = random_unet(**classes)
    folder = save_folder(tmp_path, unet, DDIMScheduler(num_train_timesteps=50))
    if labels:  # diffcli's export names the null row; a third party's folder gets it on import
        config = json.loads((folder / "unet/config.json").read_text())
        (folder / "unet/config.json").write_text(json.dumps({**config, "_diffcli_null_class": 1}))
    model = load_model(str(folder), CPU)
    x, i = torch.randn(4, 1, 8, 8), torch.tensor([0, 7, 31, 49])
    y = None if labels is None else torch.tensor(labels)  # diffcli's classes 0, 1, 2 and 3 = "no label"
    rows = None if labels is None else torch.tensor([0, 3, 1, 2])  # null row 1: 0 -> 0, 2 -> 3, 3 -> 1, 1 -> 2
    with torch.no_grad():
        ours = model.denoiser.net(x, model.denoiser.path.timestep_to_t(i).float(), y)
        ref = unet(x, i, class_labels=rows).sample
    assert torch.equal(ours, ref)
    assert model.n_classes == (3 if labels else 0)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2", "scaled_linear", "sigmoid", "trained",
                                      "zero_snr"])
def test_the_scheduler_config_is_the_same_path(tmp_path, schedule):
    """alpha(t)^2 of the imported path at t = (i + 1) / T equals the scheduler's alphas_cumprod (float32 there)."""
    extra = {"trained": dict(trained_betas=torch.linspace(1e-3, 0.2, 40).tolist()),
             "zero_snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction")}.get(
        schedule, dict(beta_schedule=schedule))
    scheduler = DDPMScheduler(num_train_timesteps=40, beta_start=1e-3, beta_end=0.2, **extra)
    folder = save_folder(tmp_path, random_unet(), scheduler, pipeline=DDPMPipeline)
    path = load_model(str(folder), CPU).denoiser.path
    alpha_bar = path.alpha(path.timestep_to_t(torch.arange(40))) ** 2
    assert torch.allclose(alpha_bar, scheduler.alphas_cumprod.double(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_pipeline_equals_diffcli_ddim(tmp_path, eta, spacing):
    """DDIMPipeline (its defaults: x0 clipped to [-1, 1], the network's own eps) equals `diffcli sample
    sampler=ddim` on the same folder, from the same noise, to 1e-5."""
    folder = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50, timestep_spacing=spacing))
    ref = pipeline_run(folder, DDIMPipeline, eta=eta, num_inference_steps=10)
    ours = diffcli_run(folder, ["sampler=ddim", "steps=10", f"eta={eta}"])
    assert (ours.clamp(-1, 1) - ref).abs().max() < 1e-5


def test_ddim_pipeline_with_clipped_eps_equals_diffcli_default(tmp_path):
    """use_clipped_model_output=True in the pipeline is diffcli's own ddim (eps of the clipped x0); the two
    differ on this random model, so the option matters."""
    folder = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50))
    ref = pipeline_run(folder, DDIMPipeline, eta=0.0, num_inference_steps=10, use_clipped_model_output=True)
    ours = diffcli_run(folder, ["sampler=ddim", "steps=10", "sampler.fn.use_clipped_model_output=true"])
    other = diffcli_run(folder, ["sampler=ddim", "steps=10"])
    assert (ours.clamp(-1, 1) - ref).abs().max() < 1e-5 < (other.clamp(-1, 1) - ref).abs().max()


@pytest.mark.parametrize("steps,bound", [(50, 3e-5), (10, 1e-5)])
def test_ddpm_pipeline_equals_diffcli_ancestral(tmp_path, steps, bound):
    """DDPMPipeline (all T steps, and 10 leading ones) equals diffcli's ancestral from the same noise: to 1e-6 with
    the scheduler's table in float64; with diffusers' own float32 table all 50 steps differ by 1.5e-5 (measured),
    its 1 - alpha_bar_t / alpha_bar_s losing digits where the betas are 1e-4."""
    folder = save_folder(tmp_path, random_unet(), DDPMScheduler(num_train_timesteps=50), pipeline=DDPMPipeline)
    ours = diffcli_run(folder, [f"steps={steps}"]).clamp(-1, 1)  # DDPMScheduler -> ancestral, the folder's default
    exact = pipeline_run(folder, DDPMPipeline, num_inference_steps=steps, float64_table=True)
    assert (ours - exact).abs().max() < 1e-6
    assert (ours - pipeline_run(folder, DDPMPipeline, num_inference_steps=steps)).abs().max() < bound


def test_a_train_unconditional_style_model_samples_as_its_pipeline(tmp_path):
    """diffusers' train_unconditional shape (multi-head attention, freq_shift 0, downsample_padding 0) with
    v-prediction, trailing spacing and zero terminal SNR: DDIMPipeline equals diffcli's ddim to 1e-5."""
    scheduler = DDIMScheduler(num_train_timesteps=50, prediction_type="v_prediction", timestep_spacing="trailing",
                              rescale_betas_zero_snr=True)
    folder = save_folder(tmp_path, random_unet(**EXAMPLE), scheduler)
    ref = pipeline_run(folder, DDIMPipeline, eta=0.0, num_inference_steps=10)
    ours = diffcli_run(folder, ["steps=10"])  # DDIMScheduler -> ddim, the folder's own options
    assert (ours.clamp(-1, 1) - ref).abs().max() < 1e-5


def test_other_samplers_run_on_an_imported_model(tmp_path):
    """Heun and DPM-Solver++ evaluate between the training steps (interpolated or quantized) and give finite
    samples near DDIM's at many steps."""
    folder = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50))
    ddim = diffcli_run(folder, ["sampler=ddim", "steps=50"])
    for overrides in (["sampler=heun", "steps=25"], ["sampler=dpmpp_2m", "steps=25"],
                      ["sampler=heun", "steps=25", "+net.timestep=quantize"]):
        out = diffcli_run(folder, overrides)
        assert torch.isfinite(out).all() and out.shape == ddim.shape


def _refusal(folder) -> str:
    with pytest.raises(DiffcliError) as e:
        load_model(str(folder), CPU)
    assert "\n" not in str(e.value)
    return str(e.value)


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_refusals_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "nor a diffusers pipeline" in _refusal(tmp_path / "empty")
    folder = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k != "unet"}))
    assert "names no unet" in _refusal(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    weights = folder / "unet/diffusion_pytorch_model.safetensors"
    weights.rename(folder / "unet/diffusion_pytorch_model.bin")
    assert "is a pickle, which diffcli never opens" in _refusal(folder)
    (folder / "unet/diffusion_pytorch_model.bin").unlink()
    assert "holds no diffusion_pytorch_model.safetensors" in _refusal(folder)

    cases = [("scheduler/scheduler_config.json", dict(variance_type="learned_range"), "variance_type=learned_range"),
             ("scheduler/scheduler_config.json", dict(use_karras_sigmas=True), "use_karras_sigmas has no counterpart"),
             ("scheduler/scheduler_config.json", dict(prediction_type="flow"), "prediction_type=flow"),
             ("scheduler/scheduler_config.json", dict(_class_name="PNDMScheduler"), "PNDMScheduler has no"),
             ("unet/config.json", dict(time_embedding_type="fourier"), "time_embedding_type=fourier"),
             ("unet/config.json", dict(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"]),
              "CrossAttnDownBlock2D is not one diffcli builds"),
             ("unet/config.json", dict(block_out_channels=[8, 16, 16]), "UNet2DModel refuses this config"),
             ("unet/config.json", dict(num_class_embeds="ten"), "num_class_embeds=ten must be an integer")]
    for file, change, fragment in cases:
        good = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50), name="case")
        _edit_json(good / file, **change)
        assert fragment in _refusal(good), fragment
        import shutil

        shutil.rmtree(good)


def test_a_config_is_data(tmp_path):
    """A `_target_` or an interpolation written into a folder's config is refused, never followed."""
    folder = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50))
    _edit_json(folder / "unet/config.json", dropout="${oc.env:HOME}")
    assert "interpolation" in _refusal(folder)
    _edit_json(folder / "unet/config.json", dropout={"_target_": "os.system"})
    assert "_target_" in _refusal(folder)


def test_steps_between_the_training_steps_against_k_diffusion():
    """diffcli feeds DDPM's step i at t = (i + 1) / T exactly, as k-diffusion's DiscreteSchedule.sigma_to_t does at
    the same noise levels. Between the steps diffcli interpolates linearly in log alpha_bar (its path's own time),
    k-diffusion in log sigma: measured on DDPM's linear schedule, the two differ by at most 0.098 of a step
    between steps 0 and 1 (log sigma is far from linear in log alpha_bar there), 0.061 up to step 10, 0.017 up to
    100 and 0.0022 beyond; the quantized steps (nearest in t here, in log sigma there) agree at 99.9% of times."""
    import importlib

    from conftest import k_diffusion_sampling
    from diffcli.diffusers_net import DiffusersUNet2D
    from diffcli.paths import DDPMPath

    k_diffusion_sampling()  # the package without its __init__
    external = importlib.import_module("k_diffusion.external")
    path = DDPMPath(T=1000)
    alpha_bar = torch.exp(path.log_alpha_bar[1:])
    schedule = external.DiscreteSchedule(((1 - alpha_bar) / alpha_bar).sqrt(), quantize=False)
    net = {mode: DiffusersUNet2D((1, 8, 8), T=1000, timestep=mode, block_out_channels=[8, 16], norm_num_groups=4,
                                 down_block_types=["DownBlock2D"] * 2, up_block_types=["UpBlock2D"] * 2)
           for mode in ("interpolate", "quantize")}
    on_steps = path.timestep_to_t(torch.arange(1000))
    s = lambda t: path.sigma(t) / path.alpha(t)  # noqa: E731
    assert torch.allclose(schedule.sigma_to_t(s(on_steps)), torch.arange(1000).double(), atol=1e-6)
    assert torch.equal(net["interpolate"].steps(on_steps), torch.arange(1000).double())
    between = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.998 + 0.001
    u = net["interpolate"].steps(between)
    gap = (u - schedule.sigma_to_t(s(between))).abs()
    for first, last, bound in [(0, 1, 0.1), (1, 10, 0.065), (10, 100, 0.018), (100, 1000, 0.0025)]:
        assert gap[(u >= first) & (u < last)].max() < bound
    agree = net["quantize"].steps(between) == schedule.sigma_to_t(s(between), quantize=True).double()
    assert agree.double().mean() > 0.998


def test_import_names_a_null_class_for_guidance(tmp_path):
    """A class-conditional folder from elsewhere: without a null class every sample needs a label and guidance is
    refused; `diffcli import ... null_class=K` makes embedding K "no label", and classifier-free guidance runs."""
    from diffcli.convert import run_import

    folder = save_folder(tmp_path, random_unet(num_class_embeds=4), DDIMScheduler(num_train_timesteps=50))
    assert load_model(str(folder), CPU).n_classes == 4
    with pytest.raises(DiffcliError, match="names no null class"):
        diffcli_run(folder, ["steps=3", "label=1", "guidance=2"])
    imported = run_import(str(folder), str(tmp_path / "imported"), null_class=0).parents[1]
    assert load_model(str(imported), CPU).n_classes == 3
    assert torch.isfinite(diffcli_run(imported, ["steps=3", "label=1", "guidance=2"])).all()


def test_a_folder_serves_edit_and_autoguidance(tmp_path):
    """ckpt=<folder> in `diffcli edit` (inpainting keeps the known pixels) and guide=<folder> (autoguidance with a
    weaker diffusers model of the same path) run like any checkpoint."""
    import numpy as np

    from diffcli.edit import run_edit

    folder = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50))
    weaker = save_folder(tmp_path, random_unet(seed=1), DDIMScheduler(num_train_timesteps=50), name="weaker")
    digits = np.random.default_rng(0).uniform(-1, 1, (2, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "digits.npz", images=digits)
    out = run_edit(compose_config("edit", [f"ckpt={folder}", f"input={tmp_path / 'digits.npz'}", "task=inpaint",
                                           "mask=bottom", "steps=5", "device=cpu"]), tmp_path / "edited")
    assert torch.allclose(torch.as_tensor(out["results"])[..., :4, :], torch.from_numpy(digits)[..., :4, :])
    guided = diffcli_run(folder, ["steps=5", f"guide={weaker}", "guidance=2"])
    assert torch.isfinite(guided).all() and not torch.equal(guided, diffcli_run(folder, ["steps=5"]))


def test_a_folder_teaches_a_reflow_student(tmp_path):
    """diffcli distill with a diffusers folder as teacher: its DDIM ODE draws the pairs (its net, its scheduler's
    path), and the student, a flow on the same UNet2DModel started from its weights, samples."""
    from diffcli.distill import run_distill
    from diffcli.pairs import read_pairs

    folder = save_folder(tmp_path, random_unet(), DDIMScheduler(num_train_timesteps=50))
    args = [f"teacher={folder}", "sampler=ddim", "steps=4", "reflow.n=8", "reflow.part_size=4", "train.steps=2",
            "train.batch_size=4", "train.warmup=0", "train.sample_every=0", "train.ckpt_every=2", "device=cpu"]
    out = run_distill(compose_config("distill", args), tmp_path / "student")
    student = load_model(out["out_dir"], CPU)
    x0, x1, _, settings = read_pairs(student.config.distill.pairs, 8)
    teacher = load_model(str(folder), CPU)
    run = plan(sample_cfg(folder, "sampler=ddim", "steps=4", "n=4"), teacher, CPU)
    with torch.no_grad():
        expected = run.sampler(teacher.denoiser, teacher.denoiser.path, x1[:4] * teacher.denoiser.path.sigma(
            run.grid[0]).float(), run.grid)
        samples = student.denoiser(torch.randn(2, 1, 8, 8), torch.tensor(1.0))
    assert torch.allclose(x0[:4], expected, atol=1e-5) and settings["nfe"] == 4
    assert student.config.net._target_ == "diffcli.diffusers_net.DiffusersUNet2D"
    assert student.config.model.name == "flow" and torch.isfinite(samples).all()
