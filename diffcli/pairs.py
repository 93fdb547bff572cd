"""Reflow's training pairs (Liu et al. 2023, sec. 2.2, "reflow"): unit noise x1 and the teacher's ODE endpoint x0
from it, drawn in parts into a pair folder that a killed run continues and later runs reuse; PairData serves them
to the training loop as a data set of couplings.

A part is a safetensors file (x0, x1 and the labels of a conditional teacher) whose metadata says what drew it:
the teacher's file and step, the sampler and its NFE, the guidance weight and the seed. Parts of another setting
are refused, never mixed in.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from . import DiffcliError, short
from .checkpoint import FORMAT, read_metadata, read_tensors, save_atomic
from .data import EpochOrder, shape_kind, to_uint8
from .runs import progress
from .sampling import batch_seed, generate

log = logging.getLogger("diffcli")
PART = "part_{:05d}.safetensors"
PART_GLOB = "part_*.safetensors"
# what must agree between parts of one folder (the NFE is recorded, but follows from the sampler)
SAME = ("teacher", "teacher_step", "sampler", "guidance", "seed", "shape", "n_classes", "part_size")


def draw_pairs(folder: Path, teacher, sampler, grid, n: int, shape, *, part_size: int, seed: int, device,
               settings: dict, n_classes: int = 0, guidance: float = 1.0) -> dict:
    """Parts of `part_size` pairs until the folder holds n (those already there, of the same `settings`, are kept:
    a killed draw continues where it stopped); returns the settings with the NFE."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**settings, "seed": seed, "shape": list(shape), "n_classes": n_classes, "guidance": guidance,
                "part_size": part_size}
    have = _existing(folder, settings)
    n_parts = math.ceil(n / part_size)
    if have >= n_parts:
        log.info("reusing %d pairs in %s", have * part_size, folder)
        return _read_settings(folder / PART.format(0))
    log.info("drawing %d pairs from the teacher into %s (%d there already) with %s", n_parts * part_size, folder,
             have * part_size, settings["sampler"])
    with progress(n_parts * part_size, "teacher pairs") as bar:
        bar(have * part_size)
        for i in range(have, n_parts):
            labels = torch.arange(i * part_size, (i + 1) * part_size) % n_classes if n_classes else None
            out = generate(teacher, sampler, grid, part_size, shape, batch_size=part_size, seed=batch_seed(seed, i),
                           device=device, labels=labels, guidance=guidance)
            if not torch.isfinite(out.samples).all():
                raise DiffcliError(f"the teacher's samples of pair part {i} are not finite (NaN or inf): its weights "
                                   "diverged or its sampler is unstable; give another sampler= or teacher=")
            tensors = {"x0": out.samples.float().contiguous(), "x1": out.noise.float().contiguous()}
            if labels is not None:
                tensors["y"] = labels
            settings["nfe"] = out.nfe
            meta = {"format": FORMAT, "kind": "pairs", "index": str(i), "pairs": json.dumps(settings)}
            save_atomic(tensors, meta, folder / PART.format(i))
            bar(part_size)
    return settings


def _existing(folder: Path, settings: dict) -> int:
    """How many parts (0, 1, ... in order) the folder holds of these settings; one of another setting is refused."""
    have = 0
    for i, file in enumerate(sorted(folder.glob(PART_GLOB))):
        if file.name != PART.format(i):
            raise DiffcliError(f"{folder} lacks {PART.format(i)} but holds {file.name}: a pair folder is written in "
                               "order; give a new distill.reflow.pairs folder")
        stored = _read_settings(file)
        differs = [k for k in SAME if stored.get(k) != settings.get(k)]
        if differs:
            k = differs[0]
            raise DiffcliError(f"the pairs in {folder} were drawn with {k}={short(str(stored.get(k)), 80)}, this run "
                               f"asks {k}={short(str(settings.get(k)), 80)}: give a new distill.reflow.pairs folder "
                               "(or the teacher and sampler that drew them)")
        have += 1
    return have


def _read_settings(file: Path) -> dict:
    """The settings a part was drawn with (its `pairs` metadata), or a one-line refusal."""
    meta = read_metadata(file)
    try:
        settings = json.loads(meta["pairs"]) if meta.get("kind") == "pairs" else None
    except (KeyError, ValueError):
        settings = None
    if not isinstance(settings, dict):
        raise DiffcliError(f"{file} is a diffcli file but not a part of reflow pairs; give a pair folder that "
                           "diffcli distill method=reflow wrote")
    return settings


def read_pairs(folder, n: int, shape=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """The first n pairs of a folder (x0, x1, labels or None) and their settings; a folder with fewer, or of
    another shape, is refused in one line."""
    folder = Path(folder)
    files = sorted(folder.glob(PART_GLOB)) if folder.is_dir() else []
    if not files:
        raise DiffcliError(f"distill.reflow.pairs={folder} holds no pairs ({PART.format(0)}, ...); give the folder "
                           "that diffcli distill method=reflow drew them into")
    settings = _read_settings(files[0])
    x0, x1, y, count = [], [], [], 0
    for file in files:
        if count >= n:
            break
        tensors, _ = read_tensors(file)
        part = [tensors.get(k) for k in ("x0", "x1", "y")]
        shape = tuple(part[0].shape[1:]) if shape is None and part[0] is not None else shape
        if part[0] is None or part[1] is None or tuple(part[0].shape[1:]) != tuple(shape) or \
                part[0].shape != part[1].shape or (part[2] is not None and part[2].shape[0] != part[0].shape[0]):
            got = None if part[0] is None else tuple(part[0].shape[1:])
            raise DiffcliError(f"{file} holds pairs of shape {got}, where {tuple(shape or ())} belong (x0 and x1 "
                               "alike): give the pair folder of this teacher")
        x0.append(part[0].float()), x1.append(part[1].float()), y.append(part[2])
        count += len(part[0])
    if count < n:
        raise DiffcliError(f"{folder} holds {count} pairs, fewer than the {n} asked (distill.reflow.n); draw more "
                           "with the same teacher and sampler, or lower distill.reflow.n")
    labels = None if y[0] is None else torch.cat(y)[:n].long()
    return torch.cat(x0)[:n], torch.cat(x1)[:n], labels, settings


class PairData:
    """Reflow's pairs as a training set: batch `step` is (x0, x1) of positions step*B ... of the epoch stream
    (EpochOrder), with labels for a conditional teacher; `sample` draws the teacher's endpoints, the distribution a
    student is compared with while it trains."""

    def __init__(self, x0: torch.Tensor, x1: torch.Tensor, labels, *, device, seed: int = 0, class_names=None):
        self.device = torch.device(device)
        self.x0, self.x1 = x0.to(self.device), x1.to(self.device)
        self.labels = None if labels is None else labels.to(self.device)
        self.class_names = class_names
        self.n_classes = 0 if labels is None else (len(class_names) if class_names else int(labels.max()) + 1)
        self.shape = tuple(x0.shape[1:])
        self.is_image = shape_kind(self.shape) == "images"
        self.order = EpochOrder(len(x0), seed)

    def __len__(self):
        return len(self.x0)

    def pair_batch(self, step: int, batch_size: int):
        """(x0, x1, labels or None) of batch `step`."""
        idx = self.order.indices(step, batch_size).to(self.device)
        return self.x0[idx], self.x1[idx], None if self.labels is None else self.labels[idx]

    def sample(self, n: int, generator: torch.Generator):
        """n of the teacher's endpoints at random."""
        idx = torch.randint(len(self), (n,), generator=generator, device=generator.device)
        return self.x0[idx.to(self.device)]

    @property
    def images(self) -> torch.Tensor:
        """The teacher's endpoints as uint8 pixels (train.eval_every's classifier-FID reference)."""
        return to_uint8(self.x0)
