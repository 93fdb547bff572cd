"""What `diffcli edit` starts from: the input images or points, and the mask of what is to be filled in.

Inputs are data, read as arrays only: image files (PNG, JPEG, ...) or a folder of them, an .npz with `images`
(uint8, as data=npz reads), `samples` (what `diffcli sample` writes), `results` (what `diffcli edit` writes) or
`noise` (what task=encode writes), or an .npy array. Images keep their size: one of another size or channel count
than the model's is refused, never resized behind the user's back. Everything comes back as float in [-1, 1] (NCHW).
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from . import DiffcliError, short
from .data import IMAGE_SUFFIXES, check_npz_members, one_line, read_image, shape_kind, to_float, to_nchw

NPZ_KEYS = ("images", "samples", "results", "noise")  # the first one present is read (task=decode: noise first)
HALVES = ("bottom", "top", "left", "right")


def read_inputs(path: str | None, shape: tuple, n: int | None, task: str) -> torch.Tensor:
    """The first n inputs at `path` as float (N, *shape); a gray image stands for three equal channels where the
    model is RGB and the task is colorize. Points may hold NaN (unknown coordinates)."""
    if not path:
        raise DiffcliError("give the input to edit: input=<image file, folder of images, .npz or .npy>")
    file = Path(path).expanduser()
    if not file.exists():
        raise DiffcliError(f"input={path} does not exist; give an image file, a folder of images, an .npz or .npy")
    if file.is_dir() or file.suffix.lower() in IMAGE_SUFFIXES:
        x = _read_images(file, shape, n)
    elif file.suffix.lower() in (".npz", ".npy"):
        x = _read_array(file, task, n)
    else:
        raise DiffcliError(f"input={path}: unknown kind of file; give an image ({', '.join(sorted(IMAGE_SUFFIXES))}), "
                           "a folder of images, an .npz or an .npy")
    return _fit(x, shape, path, task)


def _read_images(file: Path, shape: tuple, n: int | None) -> torch.Tensor:
    """Image files as float NCHW in [-1, 1], in the model's channels (gray, or RGB)."""
    if shape_kind(shape) != "images":
        raise DiffcliError(f"input={file} holds images and this model draws {shape[0]}D points: give an .npz or .npy "
                           "of points (NaN where a coordinate is unknown)")
    files = sorted(p for p in file.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if file.is_dir() else [file]
    if not files:
        raise DiffcliError(f"input={file} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    images = [read_image(f, "L" if shape[0] == 1 else "RGB", "give a PNG or JPEG file") for f in files[:n]]
    sizes = {a.shape[:2] for a in images}
    if len(sizes) > 1:
        raise DiffcliError(f"input={file}: its images have different sizes {sorted(sizes)[:3]}; give images of the "
                           f"model's size {shape[1]}x{shape[2]}")
    return to_float(to_nchw(np.stack(images), file))


def _read_array(file: Path, task: str, n: int | None) -> torch.Tensor:
    """The first n rows of an .npy, or of the first of NPZ_KEYS in an .npz (noise first for task=decode); uint8
    images become floats in [-1, 1]."""
    keys = ("noise", *NPZ_KEYS) if task == "decode" else NPZ_KEYS
    try:
        if file.suffix.lower() == ".npy":
            array, key = np.load(file, mmap_mode="r", allow_pickle=False), "its array"
        else:
            with np.load(file, allow_pickle=False) as z:
                key = next((k for k in keys if k in z.files), None)
                if key is None:
                    raise DiffcliError(f"input={file} holds no {', '.join(keys)} array (found: "
                                       f"{short(', '.join(z.files) or 'none')}); save one with np.savez")
                check_npz_members(file, (key,))
                array = z[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DiffcliError(f"cannot read input={file} ({one_line(e)}); save it with np.savez(path, images=...) "
                           "or np.save") from None
    array = array[:n]
    if array.dtype == np.uint8 and array.ndim not in (3, 4):
        raise DiffcliError(f"input={file}: {key} is uint8 of shape {short(array.shape)}; uint8 means images, "
                           "(N, H, W) or (N, H, W, C): give points as floats")
    if array.dtype == np.uint8:
        return to_float(to_nchw(array, file))
    if array.dtype.kind != "f":
        raise DiffcliError(f"input={file}: {key} is {array.dtype}; give uint8 images or floats (in [-1, 1])")
    return torch.from_numpy(np.array(array, dtype=np.float32))


def _fit(x: torch.Tensor, shape: tuple, path: str, task: str) -> torch.Tensor:
    """x checked against the model's shape: a gray input is accepted by colorize on an RGB model."""
    if len(x) == 0:
        raise DiffcliError(f"input={path} holds nothing to edit")
    gray_ok = task == "colorize" and x.dim() == 4 and x.shape[1] == 1 and shape[0] == 3
    if tuple(x.shape[1:]) != tuple(shape) and not (gray_ok and tuple(x.shape[2:]) == tuple(shape[1:])):
        what = "images of" if len(shape) == 3 else "points of"
        raise DiffcliError(f"input={path} holds {short(tuple(x.shape[1:]))} arrays and the model {what} shape "
                           f"{tuple(shape)} (channels, height, width): give inputs of the model's size and channels")
    if torch.isinf(x).any() or (len(shape) == 3 and torch.isnan(x).any()):
        raise DiffcliError(f"input={path} holds infinite (or, for images, NaN) values; give finite inputs")
    return x.expand(-1, 3, -1, -1).contiguous() if gray_ok else x


def image_mask(spec, shape: tuple) -> torch.Tensor:
    """The pixels to fill in, (C, H, W) bool: a half (bottom, top, left, right), [x0, y0, x1, y1] (a rectangle,
    columns x0..x1-1 and rows y0..y1-1), `all`, `none`, or an image file whose white pixels are filled (as diffusers'
    inpainting masks)."""
    c, h, w = shape
    hidden = torch.zeros(h, w, dtype=torch.bool)
    if isinstance(spec, (list, tuple)):
        if len(spec) != 4 or not all(isinstance(v, int) for v in spec) or not (0 <= spec[0] < spec[2] <= w and
                                                                               0 <= spec[1] < spec[3] <= h):
            raise DiffcliError(f"mask={short(list(spec))} must be [x0, y0, x1, y1], whole pixels with "
                               f"0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} (the rectangle to fill)")
        hidden[spec[1]:spec[3], spec[0]:spec[2]] = True
    elif spec in HALVES:
        rows, cols = {"bottom": (slice(h // 2, h), slice(None)), "top": (slice(0, h // 2), slice(None)),
                      "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, w))}[spec]
        hidden[rows, cols] = True
    elif spec in ("all", "none"):
        hidden[:] = spec == "all"
    elif isinstance(spec, str) and Path(spec).expanduser().suffix.lower() in IMAGE_SUFFIXES:
        hidden = _mask_file(Path(spec).expanduser(), h, w)
    else:
        raise DiffcliError(f"mask={short(spec)} is not a mask: give {', '.join(HALVES)}, all, none, [x0,y0,x1,y1] or "
                           "an image file (white: fill in)")
    return hidden.expand(c, h, w).clone()


def _mask_file(file: Path, h: int, w: int) -> torch.Tensor:
    gray = read_image(file, "L", "give a mask PNG of the images' size (white: fill in)")
    if gray.shape != (h, w):
        raise DiffcliError(f"mask={file} is {gray.shape[1]}x{gray.shape[0]} pixels and the model's images "
                           f"{w}x{h}: give a mask of the images' size (white: fill in)")
    return torch.from_numpy(gray > 127)
