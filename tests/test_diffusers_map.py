"""diffcli.diffusers_map: diffcli's DDPM U-Net as diffusers' own UNet2DModel, checked output for output."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from diffusers.models import embeddings  # noqa: E402

from diffcli import DiffcliError, nets  # noqa: E402
from diffcli.diffusers_map import unet2d_config, unet2d_state  # noqa: E402
from diffcli.nets import MLP, UNet  # noqa: E402

T = 1000
STEPS = torch.tensor([0, 1, 17, 500, 998, 999])  # diffusers' integer timesteps i, one per sample

ARCHS = {  # tiny versions of the shipped U-Nets; groups set so every GroupNorm has the same count
    "unet_small_28px": dict(shape=(1, 28, 28), ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=()),
    "attn16_32px": dict(shape=(3, 32, 32), ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,)),
    "classes3_16px": dict(shape=(1, 16, 16), ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                          n_classes=3),
    "odd_ch9": dict(shape=(2, 16, 16), ch=9, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), groups=3),
}


def random_unet(seed=0, **kwargs) -> UNet:
    """A UNet with every parameter ~ N(0, 0.1^2), so a zero-initialised layer cannot hide a wrong mapping."""
    args = dict(dropout=0.0, time_scale=float(T), groups=4) | kwargs
    net = UNet(**args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1, generator=g)
    return net


def as_diffusers(net: UNet, state=None) -> UNet2DModel:
    """diffusers' UNet2DModel from the mapped config, loaded strictly, in the net's dtype."""
    unet = UNet2DModel(**unet2d_config(net, T)).eval()
    unet = unet.double() if next(net.parameters()).dtype == torch.float64 else unet
    unet.load_state_dict(unet2d_state(net, T) if state is None else state, strict=True)
    return unet


def both(net: UNet, unet: UNet2DModel, dtype):
    """(diffcli's net at t = (i + 1) / T, diffusers' at timestep i), labels cycling through all classes and null."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(STEPS), *net.shape, generator=g, dtype=dtype)
    y = None if net.label_embed is None else torch.arange(len(STEPS)) % (net.n_classes + 1)  # class 3: no label
    with torch.no_grad():
        return net(x, (STEPS.to(dtype) + 1) / T, y), unet(x, STEPS, class_labels=y).sample


def sinusoidal64(t, dim, max_period=10000.0):
    """diffcli.nets.sinusoidal_embedding's formula in float64 (the shipped one computes in float32)."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    args = t.double()[:, None] * w[None, :]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=1), (0, dim % 2))


def timestep_embedding64(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                         max_period=10000):
    """diffusers' get_timestep_embedding's formula in float64 (the shipped one computes in float32)."""
    half = embedding_dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift))
    args = scale * timesteps.double()[:, None] * w[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb
    return F.pad(emb, (0, embedding_dim % 2))


@pytest.fixture
def float64_embeddings(monkeypatch):
    """Both libraries' sinusoidal embeddings in float64: their float32 sin/cos would otherwise differ by ~1e-8."""
    monkeypatch.setattr(nets, "sinusoidal_embedding", sinusoidal64)
    monkeypatch.setattr(embeddings, "get_timestep_embedding", timestep_embedding64)


@pytest.mark.parametrize("arch", ARCHS)
def test_float64_outputs_equal_unet2dmodel(arch, float64_embeddings):
    net = random_unet(**ARCHS[arch]).double()
    ours, theirs = both(net, as_diffusers(net), torch.float64)
    assert ours.abs().max() > 0.05  # a live output, not a near-zero one
    # measured: <= 2e-16 on all four (the mapping and the step-offset folding are exact)
    assert (ours - theirs).abs().max() < 1e-10


@pytest.mark.parametrize("arch", ARCHS)
def test_shipped_embeddings_agree(arch):
    """Unpatched, each library's float32 embedding (sin((i+1)w) for diffcli, sin(iw) for diffusers) is the only gap."""
    net = random_unet(**ARCHS[arch])
    ours, theirs = both(net, as_diffusers(net), torch.float32)
    # measured: relative (Frobenius) difference <= 1.3e-7 in float32 (max abs 4.5e-8 on outputs ~0.3)
    assert (ours - theirs).norm() / ours.norm() < 1e-5
    net = net.double()
    ours, theirs = both(net, as_diffusers(net), torch.float64)
    # measured: <= 8e-9 in float64 (the embeddings' float32 arguments and sin/cos, rounded differently)
    assert (ours - theirs).abs().max() < 1e-7


def test_time_folding_is_not_a_no_op(float64_embeddings):
    net = random_unet(**ARCHS["unet_small_28px"]).double()
    state = unet2d_state(net, T)
    assert not torch.equal(state["time_embedding.linear_1.weight"], net.time_embed.mlp[0].weight)
    state["time_embedding.linear_1.weight"] = net.time_embed.mlp[0].weight.detach().clone()
    ours, theirs = both(net, as_diffusers(net, state), torch.float64)
    # measured: 4.6e-3, 1.3e-2 relative (the embedding of step i instead of i + 1)
    assert (ours - theirs).abs().max() > 1e-3


def test_unet_small_config():
    """configs/net/unet_small.yaml at 28 px: the config names every block and the parameter counts agree."""
    net = UNet((1, 28, 28), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
               groups=32, time_scale=float(T))
    config = unet2d_config(net, T)
    assert config | dict(block_out_channels=list(config["block_out_channels"])) == dict(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=[32, 64, 64], layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, attention_head_dim=None,
        norm_num_groups=32, norm_eps=1e-6, downsample_padding=1, flip_sin_to_cos=False, freq_shift=1,
        time_embedding_type="positional", dropout=0.0, act_fn="silu", num_train_timesteps=T)
    unet = UNet2DModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in net.parameters())


def non_square() -> UNet:
    net = random_unet(**ARCHS["classes3_16px"])
    net.shape = (1, 16, 32)  # the constructor refuses H != W; a net whose shape was changed afterwards
    return net


REFUSED = {
    "mlp": (lambda: MLP((2,)), "diffcli.nets.MLP"),
    "fourier": (lambda: random_unet(**ARCHS["classes3_16px"], time_embedding="fourier"), "time_embedding=fourier"),
    "time_scale": (lambda: random_unet(**ARCHS["classes3_16px"] | dict(time_scale=1.0)), "time_scale=1.0"),
    "ch_mult0": (lambda: random_unet(shape=(1, 16, 16), ch=8, ch_mult=(2, 2)), "ch_mult[0] != 1"),
    "no_res_blocks": (lambda: random_unet(shape=(1, 16, 16), ch=8, ch_mult=(1, 2), num_res_blocks=0),
                      "num_res_blocks=0"),
    "tiny_ch": (lambda: random_unet(shape=(1, 16, 16), ch=3, ch_mult=(1, 2), groups=1), "ch=3"),
    "groups": (lambda: random_unet(shape=(1, 16, 16), ch=8, ch_mult=(1, 1), groups=16), "GroupNorms of [8, 16]"),
    "non_square": (non_square, "non-square"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals(case):
    make, what = REFUSED[case]
    net = make()
    for fn in (unet2d_config, unet2d_state):
        with pytest.raises(DiffcliError, match="^diffusers' UNet2DModel cannot express ") as err:
            fn(net, T)
        assert what in str(err.value) and "\n" not in str(err.value)
