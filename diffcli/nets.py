"""Networks: time embeddings, an MLP for 2D toys and the DDPM U-Net for 28/32 px images.

Every net maps ``(x, t[, y]) -> tensor shaped like x`` with ``t`` in [0, 1] and optional class labels ``y``
(nets built with ``n_classes > 0``); what the output means
(eps, x0, v, ...) is decided by the prediction config, not here. The noise-conditional classifiers
(``MLPClassifier``, ``UNetClassifier``) map ``(x_t, t) -> (B, n_classes)`` logits of p_t(y | x_t) instead. Any rescaling of ``t`` is an
explicit constructor argument (``time_scale``), never hidden.

Speed without a second architecture: compiled on a CPU in channels-last, the U-Net's GroupNorm (+ SiLU) and its
x2 upsample run through autograd functions of their own (``_ChannelsLastGroupNorm``, ``_Nearest2x``) that compute
the same functions and gradients as torch's (tested to 1e-12 in float64) in a form inductor vectorises.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffcli import DiffcliError


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[sin(t w_k), cos(t w_k)], w_k = max_period^(-k/(half-1)) (Vaswani et al. 2017; DDPM's get_timestep_embedding)."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    w = torch.exp(-math.log(max_period) * k / max(half - 1, 1))
    args = t.float()[:, None] * w[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column, as in DDPM


class GaussianFourierEmbedding(nn.Module):
    """[sin(2 pi t W), cos(2 pi t W)] with fixed W ~ N(0, scale^2) (Tancik et al. 2020; Song et al. 2021, score-SDE)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        # A buffer, not a Parameter: the frequencies are random but fixed, and saved in checkpoints.
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = 2 * math.pi * t.float()[:, None] * self.W[None, :].float()
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class _Sinusoidal(nn.Module):
    """sinusoidal_embedding(t * time_scale) as a module, so both kinds share one interface."""

    def __init__(self, dim: int, time_scale: float):
        super().__init__()
        self.dim, self.time_scale = dim, time_scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(t * self.time_scale, self.dim)


TIME_EMBEDDINGS = {
    "sinusoidal": lambda dim, time_scale, fourier_scale: _Sinusoidal(dim, time_scale),
    "fourier": lambda dim, time_scale, fourier_scale: GaussianFourierEmbedding(dim, fourier_scale),
}


class TimeEmbedding(nn.Module):
    """t -> Linear(dim, 4 dim) -> SiLU -> Linear(4 dim, 4 dim) of a fixed embedding of t (Ho et al. 2020)."""

    def __init__(self, dim: int, kind: str = "sinusoidal", time_scale: float = 1000.0,
                 fourier_scale: float = 16.0):
        super().__init__()
        if kind not in TIME_EMBEDDINGS:
            raise DiffcliError(f"unknown time_embedding={kind!r}; valid: {', '.join(TIME_EMBEDDINGS)}")
        self.embed = TIME_EMBEDDINGS[kind](dim, time_scale, fourier_scale)
        self.out_dim = 4 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(t).to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module):
    """y -> a learned vector added to the time embedding; class n_classes is "no label", the unconditional model
    that classifier-free guidance needs (Ho & Salimans 2022, sec. 3.2). y=None means "no label" for every sample."""

    def __init__(self, n_classes: int, dim: int):
        super().__init__()
        if n_classes < 0:
            raise DiffcliError(f"n_classes={n_classes} must be >= 0 (0: an unconditional net)")
        self.n_classes = n_classes
        self.embed = nn.Embedding(n_classes + 1, dim)

    def forward(self, temb: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            y = torch.full((temb.shape[0],), self.n_classes, device=temb.device)
        return temb + self.embed(y.to(temb.device).long()).to(temb.dtype)


def _conditioned(net: nn.Module, temb: torch.Tensor, y) -> torch.Tensor:
    """The time embedding plus the label's, for a net built with classes; an unconditional net refuses labels."""
    if net.label_embed is not None:
        return net.label_embed(temb, y)
    if y is not None:
        raise DiffcliError("this network was built without classes (n_classes=0) and cannot take labels; "
                           "train a conditional model (model.cond=class)")
    return temb


def _batch_times(t, x: torch.Tensor) -> torch.Tensor:
    """t as a (B,) tensor on x's device: a scalar or 0-dim t is broadcast over the batch."""
    t = torch.as_tensor(t, device=x.device)
    return t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(x.shape[0])


# ----------------------------------------------------------------------------- MLP (2D toys)


class ResidualMLPBlock(nn.Module):
    """h + W2 silu(W1 silu(h) + P silu(temb)): a residual block conditioned on the time embedding."""

    def __init__(self, hidden: int, temb_dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.temb_proj = nn.Linear(temb_dim, hidden)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        a = self.fc1(F.silu(h)) + self.temb_proj(F.silu(temb))
        return h + self.fc2(F.silu(a))


class MLP(nn.Module):
    """A residual MLP on flattened x, each block adding a projection of the time embedding."""

    def __init__(self, shape, hidden: int = 256, depth: int = 3, emb_dim: int = 128,
                 time_embedding: str = "sinusoidal", time_scale: float = 1000.0,
                 fourier_scale: float = 16.0, n_classes: int = 0):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        d = math.prod(self.shape)
        self.time_embed = TimeEmbedding(emb_dim, time_embedding, time_scale, fourier_scale)
        self.n_classes = int(n_classes)
        self.label_embed = LabelEmbedding(n_classes, self.time_embed.out_dim) if n_classes else None
        self.fc_in = nn.Linear(d, hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden, self.time_embed.out_dim) for _ in range(depth))
        self.fc_out = nn.Linear(hidden, d)

    def _hidden(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The residual blocks' output on flattened x, before the head."""
        h = self.fc_in(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, temb)
        return F.silu(h)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        temb = _conditioned(self, self.time_embed(_batch_times(t, x)), y)
        return self.fc_out(self._hidden(x, temb)).reshape(x.shape)


class MLPClassifier(MLP):
    """The MLP's body with a head of n_classes logits: a noise-conditional classifier p_t(y | x_t) for 2D toys."""

    def __init__(self, shape, n_classes: int, hidden: int = 128, depth: int = 3, emb_dim: int = 32,
                 time_embedding: str = "sinusoidal", time_scale: float = 1000.0, fourier_scale: float = 16.0):
        super().__init__(shape, hidden, depth, emb_dim, time_embedding, time_scale, fourier_scale)
        self.n_classes = _check_classes(n_classes)
        self.fc_out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.fc_out(self._hidden(x, self.time_embed(_batch_times(t, x))))


def _check_classes(n_classes: int) -> int:
    """A classifier needs two classes or more (set from the data's labels by `diffcli train`)."""
    if n_classes < 2:
        raise DiffcliError(f"a classifier needs at least 2 classes, got n_classes={n_classes}: train it on labelled data")
    return int(n_classes)


# ----------------------------------------------------------------------------- U-Net (images)


def _group_mean(v: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C) -> (B, C): each channel's value replaced by the mean over its group's C/G channels."""
    C = v.shape[1]
    group = torch.arange(C, device=v.device) // (C // groups)
    # A masked sum rather than a matmul: autocast leaves it in fp32, and inductor keeps the result a (B, C) buffer
    # read without an integer division (which would keep the big loops that read it from vectorising).
    to_group = (group[:, None] == group[None, :]).to(v.dtype) / (C // groups)
    return (v[:, None, :] * to_group).sum(-1)


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """F.group_norm (Wu & He 2018, eq. 1) of (B, C, H, W), then SiLU if asked, from per-channel sums over pixels."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float, silu: bool):
        ctx.groups = groups
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        var_c, mean_c = torch.var_mean(xf, dim=(2, 3), correction=0)  # per channel, in one (Welford) pass
        mean = _group_mean(mean_c, groups)
        var = _group_mean(var_c + (mean_c - mean) ** 2, groups)  # the law of total variance over equal-sized channels
        rstd = torch.rsqrt(var + eps)
        y = _normalized(xf, weight, bias, mean, rstd)
        out = (F.silu(y) if silu else y).to(x.dtype)  # as F.group_norm: its input's dtype (under autocast too)
        ctx.save_for_backward(x, weight, bias, mean, rstd, *([out] if silu else []))  # the next conv saves out too
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # mean and rstd were saved without their graph
    def backward(ctx, g):
        x, weight, bias, mean, rstd, *out = ctx.saved_tensors
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if out:  # d silu(y) / dy = s + silu(y) (1 - s), s = sigmoid(y): one use of s, so inductor fuses it
            s = torch.sigmoid(_normalized(xf, weight, bias, mean, rstd))
            # kept in x's dtype as between eager ops: inductor stores this once (it is read three times below)
            g = (g * (out[0] + s * (1 - out[0]))).to(x.dtype)
        # dL/dx = rstd (g w - <g w> - x_hat <g w x_hat>), <.> the mean over the group's channels and pixels and
        # x_hat = (x - mean) rstd; written with per-channel sums of g and g x only, so that every big loop reads
        # x and g alone. Every product with an fp32 tensor promotes g, and the sums accumulate in fp32.
        sum_g, sum_g_x = g.sum((2, 3), dtype=xf.dtype), (g * xf).sum((2, 3))  # (B, C)
        sum_g_x_hat = rstd * (sum_g_x - mean * sum_g)
        hw = x.shape[2] * x.shape[3]
        mean_gw = _group_mean(sum_g * weight, ctx.groups) / hw
        mean_gw_x_hat = _group_mean(sum_g_x_hat * weight, ctx.groups) / hw
        dx = _per_channel(g, rstd * weight) + _per_channel(xf, -rstd * rstd * mean_gw_x_hat,
                                                          rstd * (rstd * mean * mean_gw_x_hat - mean_gw))
        return dx.to(x.dtype), sum_g_x_hat.sum(0), sum_g.sum(0), None, None, None


def _per_channel(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """x * scale + shift for (B, C, H, W) x and (B, C) scale and shift."""
    y = x * scale[:, :, None, None]
    return y if shift is None else y + shift[:, :, None, None]


def _normalized(x, weight, bias, mean, rstd) -> torch.Tensor:
    """(x - mean) rstd weight + bias, as one per-channel scale and shift (two reads per pixel)."""
    return _per_channel(x, rstd * weight, bias - mean * rstd * weight)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose compiled channels-last form reduces per channel first (the same function, faster code)."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        """GroupNorm(x), or SiLU(GroupNorm(x)) in one step (one pass less over x) when `silu`."""
        # Inductor's C++ backend reduces each (sample, group) of a channels-last tensor pixel by pixel with a vector
        # load of only C/G channels (1-3 of 16 lanes in unet_small); per-channel sums are contiguous along C and
        # vectorise fully. Measured on CPUs only (scripts/bench_train.py), so GPUs keep inductor's own lowering.
        if (torch.compiler.is_compiling() and x.device.type == "cpu" and x.dim() == 4 and self.affine
                and x.is_contiguous(memory_format=torch.channels_last)):
            return _ChannelsLastGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.eps, silu)
        y = super().forward(x)
        return F.silu(y) if silu else y


def _group_norm(channels: int, groups: int) -> GroupNorm:
    """GroupNorm with min(groups, channels) groups, eps 1e-6 as in the DDPM code."""
    g = min(groups, channels)
    if channels % g:
        raise DiffcliError(f"net=unet: groups={groups} does not divide {channels} channels; pick ch a multiple of groups")
    return GroupNorm(g, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """DDPM residual block: norm-SiLU-conv, + temb projection, norm-SiLU-dropout-conv, 1x1 shortcut (Ho et al. 2020)."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, c_out)
        self.norm2, self.dropout = _group_norm(c_out, groups), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x, silu=True))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h, silu=True)))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """x + proj(softmax(q k^T / sqrt(C)) v): single-head self-attention over pixels (Ho et al. 2020)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W tokens, C); reshape (not view) is safe for channels-last.
        q, k, v = (f(h).reshape(B, 1, C, H * W).transpose(-1, -2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(a.transpose(-1, -2).reshape(B, C, H, W))


class ResAttnBlock(nn.Module):
    """A ResnetBlock, followed by an AttnBlock at the resolutions that ask for one."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, dropout: float, groups: int, attn: bool):
        super().__init__()
        self.res = ResnetBlock(c_in, c_out, temb_dim, dropout, groups)
        self.attn = AttnBlock(c_out, groups) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, temb))


class Downsample(nn.Module):
    """Strided 3x3 conv, H -> ceil(H/2) (so 28 -> 14 -> 7)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class _Nearest2x(torch.autograd.Function):
    """F.interpolate(x, scale_factor=2, mode="nearest"), its gradient written as a 2x2 sum pool."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        # Each input pixel feeds a 2x2 block, so its gradient is the block's sum. Inductor compiles the built-in
        # backward (an index_put with accumulate) to a scalar loop of atomic adds; a pool is a vector loop.
        return 4 * F.avg_pool2d(g, 2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_Nearest2x.apply(x))


def _check_image_shape(shape: tuple, levels: int) -> None:
    """Refuse shapes the U-Net cannot halve levels-1 times, with a one-line hint."""
    div = 2 ** (levels - 1)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] % div:
        raise DiffcliError(f"net=unet needs image data of shape (C, H, W) with H == W divisible by {div}; "
                           f"got {shape}: use net=mlp for 2D data, or fewer ch_mult levels")


def _down_path(res: int, ch: int, ch_mult, num_res_blocks: int, attn_resolutions, block: dict):
    """The U-Net's down path: (blocks, the channels of every skip, channels and resolution at the bottom)."""
    c, skips, down = ch, [ch], nn.ModuleList()
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            down.append(ResAttnBlock(c, ch * mult, attn=res in attn_resolutions, **block))
            c = ch * mult
            skips.append(c)
        if level != len(ch_mult) - 1:
            down.append(Downsample(c))
            skips.append(c)
            res //= 2
    return down, skips, c, res


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020, Appendix B; the architecture of PixelCNN++ / Wide ResNet)."""

    def __init__(self, shape, ch: int = 128, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1,
                 time_embedding: str = "sinusoidal", time_scale: float = 1000.0,
                 fourier_scale: float = 16.0, groups: int = 32, n_classes: int = 0):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        ch_mult, attn_resolutions = [int(m) for m in ch_mult], {int(r) for r in attn_resolutions}
        _check_image_shape(self.shape, len(ch_mult))
        self.time_embed = TimeEmbedding(ch, time_embedding, time_scale, fourier_scale)
        self.n_classes = int(n_classes)
        self.label_embed = LabelEmbedding(n_classes, self.time_embed.out_dim) if n_classes else None
        block = dict(temb_dim=self.time_embed.out_dim, dropout=dropout, groups=groups)
        self.conv_in = nn.Conv2d(self.shape[0], ch, 3, padding=1)
        self.down, skips, c, res = _down_path(self.shape[1], ch, ch_mult, num_res_blocks, attn_resolutions, block)
        self.mid = nn.ModuleList([ResAttnBlock(c, c, attn=True, **block), ResAttnBlock(c, c, attn=False, **block)])

        # Up path: num_res_blocks + 1 blocks per level, each consuming one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResAttnBlock(c + skips.pop(), ch * mult, attn=res in attn_resolutions, **block))
                c = ch * mult
            if level != 0:
                self.up.append(Upsample(c))
                res *= 2

        self.norm_out = _group_norm(c, groups)
        self.conv_out = nn.Conv2d(c, self.shape[0], 3, padding=1)  # default init (DDPM zero-inits it)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        temb = _conditioned(self, self.time_embed(_batch_times(t, x)), y)
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(block(hs[-1], temb))
        h = hs[-1]
        for block in self.mid:
            h = block(h, temb)
        for block in self.up:
            h = block(h) if isinstance(block, Upsample) else block(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(self.norm_out(h, silu=True))


class UNetClassifier(nn.Module):
    """The U-Net's down path and middle block, average-pooled to n_classes logits: the noise-conditional classifier
    p_t(y | x_t) of classifier guidance (Dhariwal & Nichol 2021, sec. 4, "the downsampling trunk of the UNet
    model with an attention pool"; here a mean pool)."""

    def __init__(self, shape, n_classes: int, ch: int = 32, ch_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 1, attn_resolutions: Sequence[int] = (), dropout: float = 0.0,
                 time_embedding: str = "sinusoidal", time_scale: float = 1000.0, fourier_scale: float = 16.0,
                 groups: int = 32):
        super().__init__()
        self.shape, self.n_classes = tuple(int(s) for s in shape), _check_classes(n_classes)
        ch_mult, attn_resolutions = [int(m) for m in ch_mult], {int(r) for r in attn_resolutions}
        _check_image_shape(self.shape, len(ch_mult))
        self.time_embed = TimeEmbedding(ch, time_embedding, time_scale, fourier_scale)
        block = dict(temb_dim=self.time_embed.out_dim, dropout=dropout, groups=groups)
        self.conv_in = nn.Conv2d(self.shape[0], ch, 3, padding=1)
        self.down, _, c, _ = _down_path(self.shape[1], ch, ch_mult, num_res_blocks, attn_resolutions, block)
        self.mid = ResAttnBlock(c, c, attn=True, **block)
        self.norm_out, self.head = _group_norm(c, groups), nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        temb = self.time_embed(_batch_times(t, x))
        h = self.conv_in(x)
        for block in self.down:
            h = block(h, temb)
        h = F.silu(self.norm_out(self.mid(h, temb)))
        return self.head(h.mean(dim=(2, 3)))
