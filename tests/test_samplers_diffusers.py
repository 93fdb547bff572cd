"""DDPM ancestral and DDIM steps against diffusers' schedulers (the reference implementation)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UniPCMultistepScheduler

from diffcli import DiffcliError
from diffcli.paths import DDPMPath
from diffcli.prediction import Denoiser
from diffcli.samplers import ancestral, ddim, ddim_grid, ddim_timesteps, unipc

T = 1000
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


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


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
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
