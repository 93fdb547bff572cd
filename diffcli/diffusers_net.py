"""diffusers' own `UNet2DModel` as a diffcli network (`net=diffusers_unet2d`), so that a model imported from a
diffusers folder computes exactly what diffusers computes, and so that one can be trained here too.

diffcli's time is t in [0, 1] with DDPM's integer step i at t = (i + 1) / T (paths.DDPMPath); diffusers feeds the
integer i itself. Off the training steps (Heun, DPM-Solver, UniPC evaluate there) the step is either interpolated
(`timestep: interpolate`, the fractional step t T - 1, which on DDPMPath lies where log alpha_bar is interpolated
linearly) or quantized (`timestep: quantize`, the nearest training step, as k-diffusion's
`DiscreteSchedule(quantize=True)`, which takes the nearest in log sigma). diffusers is imported only when one is
built (`pip install 'diffcli[diffusers]'`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import DiffcliError
from .nets import _batch_times

TIMESTEPS = ("interpolate", "quantize")
# the blocks diffcli accepts: those of DDPM's U-Net and diffusers' train_unconditional example (one table, so a
# config file names nothing else of diffusers)
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
SNAP = 1e-3  # of a step: a time whose step is this near an integer is that integer (float32 t is off by ~1e-4)


def unet2d_class():
    """diffusers.UNet2DModel, or one line naming the extra to install."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise DiffcliError("net=diffusers_unet2d and diffusers folders need the diffusers package: "
                           "pip install 'diffcli[diffusers]'") from None
    return UNet2DModel


def _check(timestep: str, down: Sequence[str], up: Sequence[str], shape: tuple, out_channels) -> None:
    if timestep not in TIMESTEPS:
        raise DiffcliError(f"net.timestep={timestep} is unknown; choose one of {', '.join(TIMESTEPS)}")
    bad = next((b for b in down if b not in DOWN_BLOCKS), None) or next((b for b in up if b not in UP_BLOCKS), None)
    if bad is not None:
        raise DiffcliError(f"net: the block type {bad} is not one diffcli builds; it builds {', '.join(DOWN_BLOCKS)} "
                           f"and {', '.join(UP_BLOCKS)} (DDPM's U-Net and diffusers' train_unconditional)")
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DiffcliError(f"net=diffusers_unet2d needs square images (C, H, W); got the data shape {shape}")
    if out_channels not in (None, shape[0]):
        raise DiffcliError(f"net: out_channels={out_channels} differs from the {shape[0]} input channels; diffcli's "
                           "networks predict one value per pixel (a learned variance's extra channels are not used)")


def _built(**config) -> nn.Module:
    """UNet2DModel(**config), its own refusals (block counts that do not match, ...) as one line."""
    try:
        return unet2d_class()(**config)
    except (ValueError, TypeError, AttributeError) as e:
        raise DiffcliError(f"net: diffusers' UNet2DModel refuses this config ({' '.join(str(e).split())[:300]})") from None


class DiffusersUNet2D(nn.Module):
    """(x, t[, y]) -> UNet2DModel(x, i, class_labels).sample with DDPM's step i = t T - 1 (Ho et al. 2020)."""

    def __init__(self, shape, T: int = 1000, timestep: str = "interpolate",
                 block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
                 down_block_types: Sequence[str] = ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
                 up_block_types: Sequence[str] = ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
                 attention_head_dim: int | None = None, norm_num_groups: int = 32, norm_eps: float = 1e-5,
                 freq_shift: int = 0, flip_sin_to_cos: bool = True, downsample_padding: int = 1,
                 dropout: float = 0.0, mid_block_scale_factor: float = 1.0, add_attention: bool = True,
                 out_channels: int | None = None, n_classes: int = 0, null_class: int | None = -1):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        _check(timestep, down_block_types, up_block_types, self.shape, out_channels)
        self.T, self.timestep, self.n_classes = int(T), timestep, int(n_classes)
        # diffcli's classes are 0..n_classes-1 and n_classes, "no label" (classifier-free guidance's unconditional
        # model); the embedding's rows are those classes with the null row at null_class (-1: last, as diffcli's
        # own nets and its export; None: a diffusers model trained without one)
        self.null_class = None if null_class is None else self.n_classes if null_class == -1 else int(null_class)
        embeds = self.n_classes + (self.null_class is not None) if self.n_classes else None
        if self.null_class is not None and not 0 <= self.null_class <= self.n_classes:
            raise DiffcliError(f"net.null_class={null_class} must lie in [0, {self.n_classes}] (one of the "
                               f"{self.n_classes + 1} class embeddings)")
        self.unet = _built(
            sample_size=self.shape[1], in_channels=self.shape[0], out_channels=self.shape[0],
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, norm_eps=norm_eps,
            freq_shift=freq_shift, flip_sin_to_cos=flip_sin_to_cos, downsample_padding=downsample_padding,
            dropout=dropout, mid_block_scale_factor=mid_block_scale_factor, add_attention=add_attention,
            num_class_embeds=embeds, num_train_timesteps=self.T)

    def steps(self, t: torch.Tensor) -> torch.Tensor:
        """DDPM's step i = t T - 1 of path time t: fractional (interpolate) or the nearest integer (quantize)."""
        u = t.double() * self.T - 1
        nearest = u.round()
        if self.timestep == "quantize":
            return nearest.clamp(0, self.T - 1)
        return torch.where((u - nearest).abs() < SNAP, nearest, u)

    def labels(self, y: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """diffcli's classes as the embedding's rows; "no label" (None or class n_classes) as the null row."""
        if not self.n_classes:
            return None
        y = torch.full((batch,), self.n_classes, device=device) if y is None else y.to(device)
        y = y.long()
        if self.null_class is None:
            if bool((y >= self.n_classes).any()):
                raise DiffcliError("this diffusers model names no null class, so it cannot sample without a label "
                                   "nor be guided: give label= or labels=, or import it with null_class=<index>")
            return y
        return torch.where(y == self.n_classes, self.null_class, y + (y >= self.null_class).long())

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        i = self.steps(_batch_times(t, x))
        return self.unet(x, i.float(), class_labels=self.labels(y, x.shape[0], x.device)).sample
