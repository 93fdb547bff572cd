"""Tests for diffcli.nets: shapes, time conditioning, the DDPM parameter count, a tiny fit."""

import math
from importlib.resources import files

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffcli import DiffcliError
from diffcli import nets
from diffcli.nets import (MLP, GaussianFourierEmbedding, TimeEmbedding, UNet, _ChannelsLastGroupNorm, _Nearest2x,
                         sinusoidal_embedding)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def net_config(name: str):
    """The net config group entry `name`, composed through train.yaml when that exists."""
    configs = files("diffcli.configs")
    if not configs.joinpath("train.yaml").is_file():
        return OmegaConf.load(str(configs.joinpath("net", f"{name}.yaml")))
    import hydra

    with hydra.initialize_config_module(config_module="diffcli.configs", version_base=None):
        return hydra.compose("train", overrides=[f"net={name}"]).net


def test_ddpm_cifar_parameter_count_matches_diffusers_and_paper():
    from diffusers import UNet2DModel

    net = instantiate(net_config("unet_ddpm_cifar"), shape=(3, 32, 32))
    # google/ddpm-cifar10-32's config, built offline (the port of Ho et al.'s TF checkpoint).
    reference = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
    )
    assert n_params(net) == n_params(reference)
    assert round(n_params(net) / 1e6, 1) == 35.7  # "Our CIFAR10 model has 35.7 million parameters" (Ho et al. 2020, App. B)


def test_unet_cifar_layout_keeps_shape_channels_last():
    torch.manual_seed(0)
    # The DDPM CIFAR layout (4 levels, attention at 16x16) at a quarter of the width, for speed.
    net = instantiate(net_config("unet_ddpm_cifar"), shape=(3, 32, 32), ch=32).eval()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert net(x, torch.rand(2)).shape == (2, 3, 32, 32)
        assert net(x, torch.tensor(0.5)).shape == (2, 3, 32, 32)  # 0-dim t broadcasts


@pytest.mark.parametrize("kind", ["sinusoidal", "fourier"])
def test_unet_small_keeps_shape_and_uses_t(kind):
    torch.manual_seed(0)
    cfg = net_config("unet_small")
    net = instantiate(cfg, shape=(1, 28, 28), time_embedding=kind).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        y0, y1 = net(x, torch.full((3,), 0.1)), net(x, 0.9)
    assert y0.shape == x.shape
    assert (y0 - y1).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["sinusoidal", "fourier"])
def test_mlp_keeps_shape_and_uses_t(kind):
    torch.manual_seed(0)
    net = instantiate(net_config("mlp"), shape=(2,), time_embedding=kind)
    x = torch.randn(5, 2)
    y0, y1 = net(x, torch.zeros(5)), net(x, 1.0)
    assert y0.shape == (5, 2)
    assert (y0 - y1).abs().max() > 1e-4


def test_sinusoidal_embedding_closed_form():
    # dim 4: half = 2 frequencies w = 10000^(-k/(half-1)) = [1, 1e-4]; layout [sin..., cos...].
    t = torch.tensor([0.0, 1.5])
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0],
                             [math.sin(1.5), math.sin(1.5e-4), math.cos(1.5), math.cos(1.5e-4)]])
    torch.testing.assert_close(sinusoidal_embedding(t, 4), expected)
    assert sinusoidal_embedding(t, 5)[:, 4].abs().max() == 0  # odd dim: zero padding column


def test_sinusoidal_embedding_matches_diffusers_ddpm():
    from diffusers.models.embeddings import get_timestep_embedding

    steps = torch.tensor([0.0, 17.0, 999.0])
    expected = get_timestep_embedding(steps, 128, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(sinusoidal_embedding(steps, 128), expected)


def test_time_embedding_scales_t_explicitly():
    emb = TimeEmbedding(16, "sinusoidal", time_scale=1000.0)
    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(emb.embed(t), sinusoidal_embedding(t * 1000.0, 16))
    assert emb(t).shape == (2, 64)


def test_fourier_frequencies_are_a_fixed_buffer():
    torch.manual_seed(0)
    emb = GaussianFourierEmbedding(256, scale=16.0)
    assert "W" in dict(emb.named_buffers()) and "W" in emb.state_dict()
    assert list(emb.parameters()) == []
    assert 10.0 < emb.W.std().item() < 22.0  # W ~ N(0, 16^2)
    t = torch.tensor([0.3])
    args = 2 * math.pi * 0.3 * emb.W
    torch.testing.assert_close(emb(t)[0], torch.cat([torch.sin(args), torch.cos(args)]))
    net = TimeEmbedding(32, "fourier")
    assert not any(p is net.embed.W for p in net.parameters())


def test_unknown_time_embedding_names_valid_kinds():
    with pytest.raises(DiffcliError, match="sinusoidal, fourier"):
        MLP((2,), time_embedding="learned")


@pytest.mark.parametrize("shape", [(2,), (1, 30, 30), (1, 28, 28), (3, 32, 16)])
def test_unet_refuses_bad_shapes_in_one_line(shape):
    with pytest.raises(DiffcliError) as err:
        UNet(shape, ch=32, ch_mult=(1, 2, 2, 2))  # 4 levels: H must be divisible by 8
    message = str(err.value)
    assert "\n" not in message and "(C, H, W)" in message and str(shape) in message


def test_unet_refuses_groups_that_do_not_divide():
    with pytest.raises(DiffcliError, match="groups"):
        UNet((1, 28, 28), ch=24, ch_mult=(1, 2), groups=16)


def test_mlp_fits_a_time_conditioned_2d_target():
    """Regress f(x, t) = R(pi t) x (rotation by pi t) on 32 points x 8 times: only a net that uses t can."""
    torch.manual_seed(0)
    x, t = torch.randn(32, 2).repeat(8, 1), torch.linspace(0, 1, 8).repeat_interleave(32)
    c, s = torch.cos(math.pi * t), torch.sin(math.pi * t)
    target = torch.stack([c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]], dim=1)
    # The best predictor that ignores t outputs the mean of the target over the 8 times.
    t_free_floor = (target - target.reshape(8, 32, 2).mean(0).repeat(8, 1)).pow(2).mean().item()
    net = MLP((2,), hidden=64, depth=2, emb_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):
        loss = (net(x, t) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    assert losses[-1] < t_free_floor / 10


@pytest.mark.parametrize("channels,groups", [(96, 32), (64, 32), (32, 32), (12, 4), (6, 1)])
@pytest.mark.parametrize("silu", [False, True])
def test_channels_last_group_norm_equals_torch_group_norm(channels, groups, silu):
    """The per-channel-sums GroupNorm (+ SiLU) that compiled channels-last U-Nets use: torch's F.group_norm (then
    F.silu), value and all three gradients, to 1e-12 in float64."""
    torch.manual_seed(0)
    x = (3 * torch.randn(4, channels, 6, 5, dtype=torch.float64) + 1).requires_grad_()  # a mean far from 0
    w, b = (torch.randn(channels, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = torch.randn(4, channels, 6, 5, dtype=torch.float64)
    ours = _ChannelsLastGroupNorm.apply(x, w, b, groups, 1e-6, silu)
    ref = F.group_norm(x, groups, w, b, 1e-6)
    ref = F.silu(ref) if silu else ref
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    for a, r in zip(torch.autograd.grad(ours, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-12)


def test_channels_last_group_norm_passes_gradcheck():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    for silu in (False, True):
        assert torch.autograd.gradcheck(lambda x, w, b: _ChannelsLastGroupNorm.apply(x, w, b, 3, 1e-6, silu), (x, w, b))


def test_nearest_upsample_gradient_is_torch_interpolate_gradient():
    """Upsample's x2 nearest neighbour with a sum-pool gradient: F.interpolate's value and gradient exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 10, 14, dtype=torch.float64)
    ours, ref = _Nearest2x.apply(x), F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert torch.equal(ours, ref)
    assert torch.equal(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.slow
def test_compiled_channels_last_unet_matches_eager():
    """torch.compile on a channels-last U-Net runs every GroupNorm and Upsample through diffcli's autograd functions
    and gives eager NCHW's loss and parameter gradients to float32 tolerance."""
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def inductor_keeping_the_graph(gm, inputs):
        graphs.append(gm)
        return compile_fx(gm, inputs)

    torch.manual_seed(0)
    # 8 and 16 channels in 4 groups (2 and 4 per group), skips concatenated to 24 and 32, attention at 4x4
    net = UNet((3, 8, 8), ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, groups=4)
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)

    def loss_and_grads(model, x):
        net.zero_grad(set_to_none=True)
        loss = model(x, t).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(net, x)
    net = net.to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=inductor_keeping_the_graph)
    loss, grads = loss_and_grads(compiled, x.contiguous(memory_format=torch.channels_last))
    functions = sum(n.target.__name__ == "autograd_function_apply" for g in graphs for n in g.graph.nodes
                    if n.op == "call_function")
    assert functions == sum(isinstance(m, (nets.GroupNorm, nets.Upsample)) for m in net.modules())
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)
