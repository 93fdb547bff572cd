"""DDPM ancestral and DDIM steps against diffusers' schedulers (the reference implementation)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UniPCMultistepScheduler

from diffcli import DiffcliError
from diffcli.paths import DDPMPath
from diffcli.prediction import Denoiser
from diffcli.samplers import ancestral, ddim, ddim_grid, ddim_timesteps, unipc

T = 1000
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear",
             "sigmoid": "sigmoid"}


class FakeEpsNet(torch.nn.Module):
    """A fixed, nonlinear 'network' so both implementations see the same model outputs."""

    def forward(self, x, t):
        return torch.tanh(x) * (0.5 + t.reshape(-1, 1, 1, 1)) + 0.1 * torch.sin(3 * x)


def model_output(x, timestep):
    """The FakeEpsNet output at diffusers' integer timestep (our t = (timestep + 1) / T)."""
    return FakeEpsNet()(x, torch.full((x.shape[0],), (timestep + 1) / T, dtype=x.dtype))


def reference(cls, path, **kwargs):
    """A diffusers scheduler for `path`, running on our float64 alpha_bar table.

    The tables themselves agree to float32 precision (test_path_matches_diffusers_alphas_cumprod);
    sharing the float64 one isolates the stepping math, which is what these tests compare.
    """
    ref = cls(num_train_timesteps=T, beta_schedule=SCHEDULES[path.schedule], **kwargs)
    ref.alphas_cumprod = torch.exp(path.log_alpha_bar[1:])
    if not getattr(ref.config, "set_alpha_to_one", True):  # DDIM's final alpha_bar_0, from the same table
        ref.final_alpha_cumprod = ref.alphas_cumprod[0]
    return ref


def x_start(seed=0):
    """float64 states: unclipped x0 reaches ~1e4 near t = 1 on the cosine schedule, where float32
    rounding alone would exceed the 1e-5 tolerance in both implementations."""
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 37])
def test_timesteps_match_diffusers(spacing, steps):
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    assert ddim_timesteps(T, steps, spacing).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("schedule, start, end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                  ("sigmoid", 1e-4, 0.02), ("cosine", 1e-4, 0.02)])
def test_betas_equal_diffusers(schedule, start, end):
    """Each beta schedule against diffusers' DDPMScheduler(beta_schedule=...).betas (float32 there), with latent
    diffusion's range for scaled_linear."""
    path = DDPMPath(T=T, schedule=schedule, beta_start=start, beta_end=end)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[schedule], beta_start=start,
                        beta_end=end).betas.double()
    torch.testing.assert_close(path.betas, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear", "sigmoid"])
def test_path_matches_diffusers_alphas_cumprod(schedule):
    path = DDPMPath(T=T, schedule=schedule)
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[schedule]).alphas_cumprod.double()
    t = path.timestep_to_t(torch.arange(T))
    torch.testing.assert_close(path.alpha(t) ** 2, ref, rtol=2e-6, atol=5e-7)  # diffusers accumulates in float32
    torch.testing.assert_close(path.sigma(t) ** 2, 1 - ref, rtol=2e-6, atol=5e-7)  # diffusers accumulates in float32


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("clip", [False, True])
def test_ancestral_matches_ddpm_scheduler(schedule, spacing, clip):
    """Whole trajectories on a strided grid, noise drawn from the same generator stream."""
    steps = 20
    path = DDPMPath(T=T, schedule=schedule)
    ref = reference(DDPMScheduler, path, clip_sample=clip)
    ref.set_timesteps(timesteps=ddim_timesteps(T, steps, spacing).tolist())
    x = x_start()
    g = torch.Generator().manual_seed(1)
    for timestep in ref.timesteps:
        x = ref.step(model_output(x, int(timestep)), timestep, x, generator=g).prev_sample
    ours = ancestral(Denoiser(FakeEpsNet(), path, "eps"), path, x_start(), ddim_grid(path, steps, spacing),
                     generator=torch.Generator().manual_seed(1), clip_x0=clip)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_ancestral_full_chain_matches_ddpm_scheduler():
    """All T = 1000 steps: Ho et al.'s Algorithm 2 exactly as diffusers runs it."""
    path = DDPMPath(T=T)
    ref = reference(DDPMScheduler, path, clip_sample=False)
    ref.set_timesteps(T)
    x, g = x_start(), torch.Generator().manual_seed(2)
    for timestep in ref.timesteps:
        x = ref.step(model_output(x, int(timestep)), timestep, x, generator=g).prev_sample
    ours = ancestral(Denoiser(FakeEpsNet(), path, "eps"), path, x_start(), ddim_grid(path, T, "leading"),
                     generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_steps_match_ddim_scheduler(schedule, spacing, eta, clip):
    """Every step of the grid, one at a time from the same state and noise.

    diffusers' DDIM always steps to `timestep - T // num_inference_steps`, which is not the next
    grid point for the linspace spacing; so each step is checked with `num_inference_steps` set
    such that diffusers steps exactly to our next grid point.
    """
    steps = 50
    path = DDPMPath(T=T, schedule=schedule)
    ref = reference(DDIMScheduler, path, clip_sample=clip)
    ref.set_timesteps(steps)
    denoiser = Denoiser(FakeEpsNet(), path, "eps")
    grid, timesteps = ddim_grid(path, steps, spacing), ddim_timesteps(T, steps, spacing).tolist() + [-1]
    for k, (timestep, prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        gap = timestep - prev if prev >= 0 else timestep + 1
        ref.num_inference_steps = T // gap
        assert T // ref.num_inference_steps == gap  # the reference now steps onto our grid point
        x = x_start(seed=k)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + k), dtype=x.dtype)
        expected = ref.step(model_output(x, timestep), timestep, x, eta=eta, use_clipped_model_output=True,
                            variance_noise=noise).prev_sample
        ours = ddim(denoiser, path, x, grid[k:k + 2], eta=eta, clip_x0=clip,
                    generator=torch.Generator().manual_seed(100 + k))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# clip_x0 settings and diffusers' equivalents; dynamic with sample_max_value 2.5, so that s moves inside [1, 2.5]
CLIPPING = {
    "static-1.7": ({"clip_x0": "static", "clip_sample_range": 1.7}, {"clip_sample": True, "clip_sample_range": 1.7}),
    "dynamic": ({"clip_x0": "dynamic", "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5},
                {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5}),
}


class FarNet(FakeEpsNet):
    """FakeEpsNet times 4: read as x0 or v it puts x0_hat far outside [-1, 1] (|x0_hat| up to ~6), as eps near
    t = 1 it does anyway."""

    def forward(self, x, t):
        return 4 * super().forward(x, t)


def far_output(x, timestep):
    return FarNet()(x, torch.full((x.shape[0],), (timestep + 1) / T, dtype=x.dtype))


@pytest.mark.parametrize("clipping", list(CLIPPING))
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPES))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_clipping_matches_ddim_scheduler(clipping, prediction, spacing, eta):
    """Static clipping to a chosen range and Imagen's dynamic thresholding, step by step (as above), for every
    prediction type, on model outputs whose x0_hat lies far outside [-1, 1]."""
    ours_clip, theirs = CLIPPING[clipping]
    path, steps = DDPMPath(T=T), 50  # 50: every linspace gap g has T // (T // g) == g (see above)
    ref = reference(DDIMScheduler, path, prediction_type=PREDICTION_TYPES[prediction], **theirs)
    ref.set_timesteps(steps)
    denoiser = Denoiser(FarNet(), path, prediction)
    grid, timesteps = ddim_grid(path, steps, spacing), ddim_timesteps(T, steps, spacing).tolist() + [-1]
    clipped = 0
    for k, (timestep, prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        gap = timestep - prev if prev >= 0 else timestep + 1
        ref.num_inference_steps = T // gap
        assert T // ref.num_inference_steps == gap
        x = x_start(seed=k)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + k), dtype=x.dtype)
        out = ref.step(far_output(x, timestep), timestep, x, eta=eta, use_clipped_model_output=True,
                       variance_noise=noise)
        ours = ddim(denoiser, path, x, grid[k:k + 2], eta=eta, generator=torch.Generator().manual_seed(100 + k),
                    **ours_clip)
        torch.testing.assert_close(ours, out.prev_sample, rtol=1e-5, atol=1e-5)
        clipped += bool((denoiser(x, grid[k]).abs() > 1.7).any())
    assert clipped >= steps // 2  # the clipping was exercised, not a no-op


@pytest.mark.parametrize("clipping", list(CLIPPING))
@pytest.mark.parametrize("prediction", list(PREDICTION_TYPES))
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ancestral_clipping_matches_ddpm_scheduler(clipping, prediction, spacing):
    """Whole ancestral trajectories under static clipping to a range and dynamic thresholding."""
    ours_clip, theirs = CLIPPING[clipping]
    path, steps = DDPMPath(T=T), 20
    ref = reference(DDPMScheduler, path, prediction_type=PREDICTION_TYPES[prediction], **theirs)
    ref.set_timesteps(timesteps=ddim_timesteps(T, steps, spacing).tolist())
    x, g = x_start(), torch.Generator().manual_seed(1)
    for timestep in ref.timesteps:
        x = ref.step(far_output(x, int(timestep)), timestep, x, generator=g).prev_sample
    ours = ancestral(Denoiser(FarNet(), path, prediction), path, x_start(), ddim_grid(path, steps, spacing),
                     generator=torch.Generator().manual_seed(1), **ours_clip)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", list(PREDICTION_TYPES))
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing,steps_offset", [("leading", 0), ("leading", 1), ("leading", 7), ("trailing", 0)])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_offset_and_final_alpha_match_ddim_scheduler(prediction, eta, spacing, steps_offset, set_alpha_to_one):
    """Whole DDIM trajectories with diffusers' steps_offset and set_alpha_to_one, noise from one generator stream:
    a DDPM model trained with diffusers samples identically in diffcli."""
    path, steps = DDPMPath(T=T), 20
    ref = reference(DDIMScheduler, path, prediction_type=PREDICTION_TYPES[prediction], clip_sample=False,
                    timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one)
    ref.set_timesteps(steps)
    x, g = x_start(), torch.Generator().manual_seed(3)
    for timestep in ref.timesteps:
        x = ref.step(model_output(x, int(timestep)), timestep, x, eta=eta, generator=g).prev_sample
    grid = ddim_grid(path, steps, spacing, steps_offset=steps_offset, set_alpha_to_one=set_alpha_to_one)
    ours = ddim(Denoiser(FakeEpsNet(), path, prediction), path, x_start(), grid, eta=eta,
                generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert (grid[-1] == 0) == set_alpha_to_one and ddim_timesteps(T, steps, spacing, steps_offset).tolist() == \
        ref.timesteps.tolist()


def test_steps_offset_out_of_range_is_one_line():
    with pytest.raises(DiffcliError, match="steps_offset=50 must lie in"):
        ddim_grid(DDPMPath(T=T), 20, "leading", steps_offset=50)


def test_dynamic_threshold_is_imagens_rule():
    """Per sample: s = the quantile of |x0| in [1, max]; samples already inside [-1, 1] are untouched."""
    from diffcli.samplers.core import dynamic_threshold

    x0 = torch.stack([torch.linspace(-0.5, 0.5, 100), torch.linspace(-8, 8, 100), torch.linspace(-3, 3, 100)])
    out = dynamic_threshold(x0[:, None], 0.9, 4.0)[:, 0]
    torch.testing.assert_close(out[0], x0[0])  # s clamps to 1, nothing exceeds it
    s1, s2 = torch.quantile(x0[1].abs(), 0.9).clamp(1, 4), torch.quantile(x0[2].abs(), 0.9)
    assert s1 == 4 and 1 < s2 < 3
    torch.testing.assert_close(out[1], x0[1].clamp(-4, 4) / 4)
    torch.testing.assert_close(out[2], x0[2].clamp(-s2, s2) / s2)
    assert out.abs().max() <= 1


def test_bad_clipping_settings_are_one_line():
    from diffcli.build import build_sampler_fn

    for options, message in (({"clip_x0": "sometimes"}, "clip_x0=sometimes is unknown"),
                             ({"clip_x0": "static", "clip_sample_range": 0.0}, "clip_sample_range=0.0"),
                             ({"clip_x0": "dynamic", "dynamic_thresholding_ratio": 1.5}, "lie in"),
                             ({"clip_x0": "dynamic", "sample_max_value": 0.5}, "sample_max_value=0.5")):
        with pytest.raises(DiffcliError, match=message):
            build_sampler_fn({"_target_": "diffcli.samplers.ddim", **options}, is_image=True)


def test_ddim_rejects_negative_eta():
    path = DDPMPath(T=T)
    with pytest.raises(DiffcliError, match="eta"):
        ddim(Denoiser(FakeEpsNet(), path, "eps"), path, x_start(), ddim_grid(path, 5), eta=-0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [10, 25])
def test_unipc_matches_unipc_multistep_scheduler(schedule, spacing, order, steps):
    """Whole trajectories of UniPC (B(h) = e^h - 1, data prediction) against diffusers' UniPCMultistepScheduler
    configured alike (solver_type='bh2', predict_x0, lower_order_final, final_sigmas_type='zero'), its timesteps
    mapped to our t = (i + 1) / T, then t = 0. diffusers keeps its sigmas in float32; they are replaced by the
    path's float64 ones, which isolates the stepping math, as `reference` does for the other schedulers."""
    path = DDPMPath(T=T, schedule=schedule)
    ref = UniPCMultistepScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[schedule], solver_order=order,
                                  solver_type="bh2", predict_x0=True, lower_order_final=True,
                                  final_sigmas_type="zero", timestep_spacing=spacing)
    ref.set_timesteps(steps)
    t_grid = torch.cat([path.timestep_to_t(ref.timesteps), torch.zeros(1, dtype=torch.float64)])
    ref.sigmas = torch.cat([(path.sigma(t_grid) / path.alpha(t_grid))[:-1], torch.zeros(1, dtype=torch.float64)])
    x, trajectory = x_start(), [x_start()]
    for timestep in ref.timesteps:  # prev_sample: the predictor's x_{i+1}, which the next step first corrects
        x = ref.step(model_output(x, int(timestep)), timestep, x).prev_sample
        trajectory.append(x)
    ours_trajectory = []
    unipc(Denoiser(FakeEpsNet(), path, "eps"), path, x_start(), t_grid, order=order, trajectory=ours_trajectory)
    error = max((a - b).abs().max().item() for a, b in zip(ours_trajectory, trajectory, strict=True))
    print(f"unipc {schedule} {spacing} order={order} steps={steps}: max |diffcli - diffusers| = {error:.2e}")
    assert error < 1e-6


# ---------------------------------------------------------------------------------------------
# Zero terminal SNR (Lin et al. 2024): alpha_bar_T = 0, so sampling starts from pure noise


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_path_matches_diffusers_rescaled_betas(schedule):
    path = DDPMPath(T=T, schedule=schedule, zero_terminal_snr=True)
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule=SCHEDULES[schedule], rescale_betas_zero_snr=True)
    t = path.timestep_to_t(torch.arange(T))
    torch.testing.assert_close(path.alpha(t) ** 2, ref.alphas_cumprod.double(), rtol=2e-6, atol=5e-7)
    assert path.alpha(torch.tensor(1.0, dtype=torch.float64)) == 0 and path.sigma(torch.tensor(1.0)) == 1
    # between and on grid points alpha^2 + sigma^2 = 1, the derivatives are those of alpha and sigma, and
    # t_from_s inverts s = sigma / alpha, the last segment (linear in alpha) included
    u = torch.cat([torch.linspace(0.9, 1, 2001, dtype=torch.float64), t])
    a, s = path.alpha(u), path.sigma(u)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(u))
    v, h = torch.tensor([0.9973, 0.9995, 0.99999], dtype=torch.float64), 1e-7
    torch.testing.assert_close(path.d_alpha(v), (path.alpha(v + h) - path.alpha(v - h)) / (2 * h), rtol=1e-5, atol=0)
    torch.testing.assert_close(path.d_sigma(v), (path.sigma(v + h) - path.sigma(v - h)) / (2 * h), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(path.t_from_s(path.sigma(v) / path.alpha(v)), v)


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_terminal_snr_ddim_matches_ddim_scheduler(prediction, spacing, eta):
    """Whole trajectories from pure noise: the first step has alpha = 0, where x0_hat = -v (or the net's x0)."""
    path, steps = DDPMPath(T=T, zero_terminal_snr=True), 20
    ref = reference(DDIMScheduler, path, prediction_type=PREDICTION_TYPES[prediction], clip_sample=False,
                    timestep_spacing=spacing, rescale_betas_zero_snr=True)
    ref.set_timesteps(steps)
    x, g = x_start(), torch.Generator().manual_seed(4)
    for timestep in ref.timesteps:
        x = ref.step(model_output(x, int(timestep)), timestep, x, eta=eta, generator=g).prev_sample
    grid = ddim_grid(path, steps, spacing)
    ours = ddim(Denoiser(FakeEpsNet(), path, prediction), path, x_start(), grid, eta=eta,
                generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert (path.alpha(grid[0]) == 0) == (spacing == "trailing")
    assert ddim_grid(path, steps, "auto")[0] == 1  # auto spacing: trailing, from alpha = 0


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_zero_terminal_snr_ancestral_matches_ddpm_scheduler(prediction):
    path, steps = DDPMPath(T=T, zero_terminal_snr=True), 20
    ref = reference(DDPMScheduler, path, prediction_type=PREDICTION_TYPES[prediction], clip_sample=False,
                    rescale_betas_zero_snr=True)
    ref.set_timesteps(timesteps=ddim_timesteps(T, steps, "trailing").tolist())
    x, g = x_start(), torch.Generator().manual_seed(5)
    for timestep in ref.timesteps:
        x = ref.step(model_output(x, int(timestep)), timestep, x, generator=g).prev_sample
    ours = ancestral(Denoiser(FakeEpsNet(), path, prediction), path, x_start(), ddim_grid(path, steps, "trailing"),
                     generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_zero_terminal_snr_refuses_eps_and_sde_samplers():
    from diffcli.samplers import check_sampler

    path = DDPMPath(T=T, zero_terminal_snr=True)
    for prediction in ("eps", "score"):
        with pytest.raises(DiffcliError, match="alpha > 0 at t = 1"):
            Denoiser(FakeEpsNet(), path, prediction)
    with pytest.raises(DiffcliError, match="alpha\\(1\\) = 0"):
        check_sampler("euler_maruyama", path)
    assert DDPMPath(T=T).alpha(torch.tensor(1.0)) > 0  # the default path is unchanged


@pytest.mark.parametrize("name", ["ddim", "ancestral", "heun", "dpmpp_2m", "unipc", "dpmpp_2m_sde"])
def test_zero_terminal_snr_samplers_reach_the_data_from_pure_noise(name):
    """The exact v-predicting oracle of eight_gaussians on the zero-terminal-SNR path: every sampler that allows
    alpha(1) = 0 starts from pure noise at t = 1 and lands on the modes."""
    from diffcli.toys import eight_gaussians_modes
    from diffcli.scoring import mode_coverage
    from diffcli.oracle import Oracle
    from diffcli.samplers import SAMPLERS, karras_grid

    path = DDPMPath(T=T, zero_terminal_snr=True)
    denoiser = Denoiser(Oracle((2,), {"kind": "toy", "name": "eight_gaussians"}, path, "v"), path, "v")
    grid = ddim_grid(path, 50, "auto") if name in ("ddim", "ancestral") else karras_grid(path, 25)
    assert grid[0] == 1 and path.alpha(grid[0]) == 0
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2000, 2, generator=g, dtype=torch.float64)
    samples = SAMPLERS[name](denoiser, path, x, grid, generator=g)
    modes, std = eight_gaussians_modes()
    coverage = mode_coverage(samples.float(), modes, std)
    assert coverage["modes_covered"] == 8 and coverage["in_modes"] > 0.9, coverage
