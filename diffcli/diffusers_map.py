"""diffcli's DDPM U-Net as diffusers' UNet2DModel: the config that builds the same architecture and the weights.

`UNet2DModel(**unet2d_config(net, T)).load_state_dict(unet2d_state(net, T), strict=True)` gives a model whose
output at diffusers' integer `timestep` i equals diffcli's net at path time t = (i + 1) / T (DDPMPath's step i;
Ho et al. 2020): the shift of one step in the sinusoidal embedding is folded exactly into the first time Linear.
What UNet2DModel cannot express (another net, a Fourier time embedding, ...) is refused with a DiffcliError; an
odd ch is not refused: diffusers' get_timestep_embedding ends in the same zero column as diffcli's.

The blocks match one to one: ResnetBlock -> ResnetBlock2D (norm1, conv1, time_emb_proj, norm2, conv2,
conv_shortcut), AttnBlock -> Attention with one head of all channels (group_norm, to_q/k/v, to_out.0: the 1x1
convs as Linear weights), Downsample -> Downsample2D, Upsample -> Upsample2D, the middle
resnet-attention-resnet -> UNetMidBlock2D, LabelEmbedding -> class_embedding (class n_classes: "no label").
"""

import math
from typing import NoReturn

import torch
from torch import nn

from . import DiffcliError
from .nets import AttnBlock, Downsample, GaussianFourierEmbedding, ResAttnBlock, UNet, Upsample

_RESNET = {"temb_proj": "time_emb_proj", "shortcut": "conv_shortcut"}  # ResnetBlock -> ResnetBlock2D
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj": "to_out.0"}  # -> Attention


def _refuse(what: str) -> NoReturn:
    raise DiffcliError(f"diffusers' UNet2DModel cannot express {what}")


def _levels(net: UNet) -> list[list[ResAttnBlock]]:
    """The down path's blocks per resolution level (split at each Downsample)."""
    levels = [[]]
    for block in net.down:
        if isinstance(block, Downsample):
            levels.append([])
        else:
            levels[-1].append(block)
    return levels


def _check(net, T: int) -> None:
    """Refuse, in one line, what UNet2DModel cannot express (its layout: diffusers' unet_2d.py)."""
    if not isinstance(net, UNet):
        _refuse(f"{type(net).__module__}.{type(net).__qualname__}: only diffcli.nets.UNet (net=unet) maps onto it")
    embed = net.time_embed.embed
    if isinstance(embed, GaussianFourierEmbedding):
        _refuse("time_embedding=fourier: its fourier embedding is score-SDE's (of log sigma, the output divided "
                "by sigma); use time_embedding=sinusoidal")
    if float(embed.time_scale) != T:
        _refuse(f"time_scale={embed.time_scale} with T={T}: diffusers embeds the step i itself, which equals "
                f"diffcli's t * time_scale - 1 only for time_scale = T")
    ch = net.conv_in.out_channels
    if ch < 4:
        _refuse(f"ch={ch}: its sinusoidal embedding divides by ch // 2 - 1 = 0 (diffcli by 1); use ch >= 4")
    levels = _levels(net)
    if not levels[0]:
        _refuse("num_res_blocks=0: its down blocks change channels in their resnets, and there are none")
    if levels[0][0].res.conv1.out_channels != ch:
        _refuse("ch_mult[0] != 1: its conv_in and time embedding have ch * ch_mult[0] channels, diffcli's ch")
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) > 1:
        _refuse(f"GroupNorms of {sorted(groups)} groups (diffcli: min(groups, channels)): it has one "
                f"norm_num_groups; pick groups <= ch")
    if net.shape[1] != net.shape[2]:
        _refuse(f"a non-square image shape {net.shape}: diffcli's U-Net is built for H == W")


def unet2d_config(net, T: int) -> dict:
    """UNet2DModel's keyword arguments for the same architecture (diffusers' UNet2DModel; Ho et al. 2020, App. B)."""
    _check(net, T)
    levels = _levels(net)
    attn = [isinstance(level[0].attn, AttnBlock) for level in levels]
    dropout = next(m.p for m in net.modules() if isinstance(m, nn.Dropout))
    config = dict(
        sample_size=net.shape[1], in_channels=net.shape[0], out_channels=net.conv_out.out_channels,
        block_out_channels=tuple(level[0].res.conv1.out_channels for level in levels),
        layers_per_block=len(levels[0]),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=None,  # None: head dim = the block's channels, so one head, as AttnBlock
        norm_num_groups=net.norm_out.num_groups, norm_eps=net.norm_out.eps, downsample_padding=1,
        flip_sin_to_cos=False, freq_shift=1,  # [sin, cos], w_k = 10000^(-k / (half - 1))
        time_embedding_type="positional", dropout=dropout, act_fn="silu", num_train_timesteps=T,
    )
    if net.label_embed is not None:
        config["num_class_embeds"] = net.label_embed.n_classes + 1  # class n_classes is "no label"
    return config


def _places(net: UNet):
    """(diffusers' prefix, renaming, diffcli module) for every block of the down, middle and up paths."""
    yield from _side(net.down, "down", Downsample, "downsamplers")
    yield "mid_block.resnets.0", _RESNET, net.mid[0].res
    yield "mid_block.attentions.0", _ATTENTION, net.mid[0].attn
    yield "mid_block.resnets.1", _RESNET, net.mid[1].res
    yield from _side(net.up, "up", Upsample, "upsamplers")


def _side(blocks, side: str, resample: type, resamplers: str):
    """The places of one path's blocks: level by level, a resampling block closing each level but the last."""
    level, j = 0, 0
    for block in blocks:
        if isinstance(block, resample):
            yield f"{side}_blocks.{level}.{resamplers}.0", {}, block
            level, j = level + 1, 0
        else:
            yield from _res_attn(f"{side}_blocks.{level}", j, block)
            j += 1


def _res_attn(prefix: str, j: int, block: ResAttnBlock):
    """A ResAttnBlock's places: resnets.j, and attentions.j when it has an AttnBlock."""
    yield f"{prefix}.resnets.{j}", _RESNET, block.res
    if isinstance(block.attn, AttnBlock):
        yield f"{prefix}.attentions.{j}", _ATTENTION, block.attn


def _renamed(prefix: str, names: dict, module: nn.Module) -> dict:
    """module's state dict under prefix, each submodule's name renamed; 1x1 attention convs as Linear weights."""
    out = {}
    for key, value in module.state_dict().items():
        head, _, tail = key.rpartition(".")
        if names is _ATTENTION and value.dim() == 4:
            value = value.flatten(1)  # (C, C, 1, 1) conv -> (C, C) Linear
        out[f"{prefix}.{names.get(head, head)}.{tail}"] = value
    return out


def _shift_one_step(weight: torch.Tensor) -> torch.Tensor:
    """W' with W' e(i) = W e(i + 1), e(u) = [sin(u w), cos(u w)] (+ a zero column for odd dims): per frequency, a
    rotation by w, computed in float64 (Ho et al. 2020's embedding; diffusers' get_timestep_embedding)."""
    half = weight.shape[1] // 2
    w = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / (half - 1))
    W = weight.detach().double().clone()
    s, c = W[:, :half].clone(), W[:, half:2 * half].clone()
    W[:, :half] = s * torch.cos(w) - c * torch.sin(w)  # sin((i+1)w) = sin(iw) cos w + cos(iw) sin w
    W[:, half:2 * half] = s * torch.sin(w) + c * torch.cos(w)  # cos((i+1)w) = cos(iw) cos w - sin(iw) sin w
    return W.to(weight.dtype)


def unet2d_state(net, T: int) -> dict[str, torch.Tensor]:
    """The net's weights under UNet2DModel's parameter names, the step offset folded in (diffusers' UNet2DModel)."""
    _check(net, T)
    mlp = net.time_embed.mlp
    state = {"conv_in.weight": net.conv_in.weight, "conv_in.bias": net.conv_in.bias,
             "time_embedding.linear_1.weight": _shift_one_step(mlp[0].weight),
             "time_embedding.linear_1.bias": mlp[0].bias,
             "time_embedding.linear_2.weight": mlp[2].weight, "time_embedding.linear_2.bias": mlp[2].bias,
             "conv_norm_out.weight": net.norm_out.weight, "conv_norm_out.bias": net.norm_out.bias,
             "conv_out.weight": net.conv_out.weight, "conv_out.bias": net.conv_out.bias}
    if net.label_embed is not None:
        state["class_embedding.weight"] = net.label_embed.embed.weight
    for prefix, names, module in _places(net):
        state.update(_renamed(prefix, names, module))
    return {k: v.detach().clone() for k, v in state.items()}
