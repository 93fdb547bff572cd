"""Every picture diffcli draws: sample grids and scatters, trajectories and learned fields (sample, eval, train),
loss curves (train), contact sheets and quality-against-NFE / guidance figures (summary). Files in, PNGs out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .runs import atomic_file, read_jsonl

if TYPE_CHECKING:  # torch is imported where a picture needs it: diffcli summary reads files only
    import torch

_SKIP_PLOT = ("_sem", "_std", "_nfe", "_total", "_covered")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, file, dpi: int = 120) -> Path:
    """Save and close a figure; written to a temporary renamed over `file` (runs.atomic_file)."""
    try:
        with atomic_file(file) as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        pyplot().close(fig)
    return Path(file)


def save_trajectory_picture(frames: torch.Tensor, file: Path) -> Path:
    """2D: sample paths from the prior (grey) to the samples (blue); images: rows of samples over time."""
    import torch

    from .data import shape_kind

    if shape_kind(frames.shape[2:]) == "images":  # (frames, n, C, H, W): 8 samples, 10 moments in time
        from torchvision.utils import save_image

        cols = torch.linspace(0, len(frames) - 1, min(10, len(frames))).round().long()
        strip = frames[cols][:, :8].transpose(0, 1).flatten(0, 1)  # row = one sample's path
        with atomic_file(file) as tmp:
            save_image((strip.clamp(-1, 1) + 1) / 2, tmp, nrow=len(cols))
        return Path(file)
    plt = pyplot()
    paths = frames[:, :300]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(paths[..., 0], paths[..., 1], lw=0.4, alpha=0.35, c="tab:blue")
    ax.scatter(*paths[0].T, s=3, c="0.6", label="prior (t = 1)")
    ax.scatter(*paths[-1].T, s=3, c="tab:red", label="samples (t = 0)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=3)
    ax.set_title("sampling trajectories")
    fig.tight_layout()
    return save_figure(fig, file)


def save_field_picture(denoiser, reference: torch.Tensor, file: Path,
                       times=(0.8, 0.4, 0.1, 0.02)) -> Path:
    """The learned score (Gaussian prior) or velocity (otherwise) as arrows at a few times, over the data."""
    import torch

    path, plt = denoiser.path, pyplot()
    lo, hi = reference.min(0).values - 1, reference.max(0).values + 1
    axes_1d = [torch.linspace(lo[i].item(), hi[i].item(), 21) for i in range(2)]
    grid = torch.stack(torch.meshgrid(*axes_1d, indexing="xy"), -1).reshape(-1, 2)
    device = denoiser.device
    kind = "score" if path.gaussian_prior else "velocity"
    fig, axes = plt.subplots(1, len(times), figsize=(4 * len(times), 4))
    for ax, t_val in zip(axes, times):
        t = torch.tensor(t_val, dtype=torch.float64)
        with torch.no_grad():
            x0, x1 = (v.cpu() for v in denoiser.predict(grid.to(device), t))
        field = -x1 / path.sigma(t) if kind == "score" else path.d_alpha(t) * x0 + path.d_sigma(t) * x1
        ax.scatter(*reference.T, s=1, c="0.8")
        ax.quiver(grid[:, 0], grid[:, 1], field[:, 0], field[:, 1], color="tab:blue")
        ax.set(title=f"learned {kind}, t = {t_val}", aspect="equal")
    fig.tight_layout()
    return save_figure(fig, file, dpi=110)


PICTURE_IMAGES = 256  # the images a sample grid shows at most (class_rows: 10 of each of up to 20 classes)


def class_rows(samples: torch.Tensor, labels: torch.Tensor, cols: int = 10, max_rows: int = 20) -> torch.Tensor:
    """Images arranged one row per requested class (the first `cols` of each; short rows padded in black)."""
    import torch

    rows = []
    for c in sorted(set(labels.tolist()))[:max_rows]:
        row = samples[labels == c][:cols]
        rows.append(torch.cat([row, -torch.ones(cols - len(row), *samples.shape[1:])]))
    return torch.cat(rows)


def save_picture(samples: torch.Tensor, file: Path, reference: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, title: str | None = None) -> Path:
    """An image grid for images in [-1, 1] (one row per class when labels are given); a scatter plot (over
    reference data, coloured by requested class) for 2D points."""
    from .data import shape_kind

    file = Path(file)
    if shape_kind(samples.shape[1:]) == "images":
        from torchvision.utils import save_image

        with atomic_file(file) as tmp:
            if labels is not None:
                save_image((class_rows(samples, labels.cpu()) + 1) / 2, tmp, nrow=10)
            else:
                save_image((samples[:PICTURE_IMAGES] + 1) / 2, tmp,
                           nrow=int(math.ceil(math.sqrt(min(len(samples), PICTURE_IMAGES)))))
        return file
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    if reference is not None:
        ax.scatter(*reference.T.cpu(), s=2, c="0.75", label="data")
    if labels is None:
        ax.scatter(*samples.T, s=2, c="tab:blue", label="samples")
    else:
        points = ax.scatter(*samples.T, s=2, c=labels.cpu() % 10, cmap="tab10", vmin=0, vmax=9)
        ax.legend(*points.legend_elements(), title="class", loc="upper right", fontsize="small")
    ax.set_aspect("equal")
    if labels is None:
        ax.legend(loc="upper right", markerscale=4)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, file)


def plot_loss(out_dir: Path, title: str) -> Path:
    """loss.png from log.jsonl, with the eval_every metric beside it when there is one."""
    plt = pyplot()
    rows = [r for r in read_jsonl(out_dir / "log.jsonl") if r.get("loss") is not None]  # null: all steps skipped
    evals = read_jsonl(out_dir / "eval.jsonl")
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=title)
    ax.grid(alpha=0.3)
    if evals:
        key = next(k for k, v in evals[0].items() if k != "step" and isinstance(v, float))
        axes[0][1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o")
        axes[0][1].set(xlabel="step", ylabel=key, title=f"{key} of EMA samples (train.eval_every)")
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_dir / "loss.png")


EDIT_ROWS = 16  # the inputs edited.png shows at most


def save_edit_picture(columns: list, file: Path, title: str) -> Path:
    """An edit side by side: for images one row per (name, images) pair, one column per input (EDIT_ROWS at
    most); for 2D points the results over the inputs' known coordinates (rug ticks where one coordinate is
    unknown)."""
    import torch

    from .data import shape_kind

    name, first = columns[0]
    if shape_kind(first.shape[1:]) == "images":
        from torchvision.utils import make_grid

        cols = min(len(first), EDIT_ROWS)
        grid = torch.cat([images[:cols] for _, images in columns])  # one row per kind, one column per input
        picture = make_grid((grid.clamp(-1, 1) + 1) / 2, nrow=cols, padding=2, pad_value=1.0)
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(0.75 * cols + 1.2, 0.75 * len(columns) + 0.5))
        ax.imshow(picture.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_yticks([(k + 0.5) * picture.shape[1] / len(columns) for k in range(len(columns))],
                      [n for n, _ in columns], fontsize=7)
        ax.set_xticks([])
        ax.set_title(title, fontsize=7)
        fig.tight_layout()
        return save_figure(fig, file)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    inputs, results = first, columns[-1][1]
    complete = ~torch.isnan(inputs).any(1)
    ax.scatter(*results.T, s=2, c="tab:blue", label=columns[-1][0])
    if complete.any():
        ax.scatter(*inputs[complete].T, s=2, c="0.6", label="complete inputs")
    for axis in (0, 1):
        known = inputs[torch.isnan(inputs[:, 1 - axis]) & ~torch.isnan(inputs[:, axis]), axis]
        if len(known):  # the observed coordinate of each half-known point, as ticks on its axis
            other = ax.get_ylim()[0] if axis == 0 else ax.get_xlim()[0]
            xy = (known, torch.full_like(known, other)) if axis == 0 else (torch.full_like(known, other), known)
            ax.plot(*xy, "|" if axis == 0 else "_", c="tab:red", ms=8, label=f"known x[{axis}]")
    ax.legend(loc="upper right", markerscale=3, fontsize="small")
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, file)


def contact_sheet(panels, file: Path) -> Path:
    """Pictures side by side in one PNG: `panels` are (title, image array) pairs, the jobs' last samples."""
    plt = pyplot()
    cols = min(4, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.5 * cols, 4.8 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, image) in zip(axes.flat, panels):
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, file)


_AXES = {"nfe": ("NFE per sample", "log", "NFE"), "guidance": ("guidance weight w", "linear", "w"),
         "classifier_scale": ("classifier scale s", "linear", "s")}


def plot_search(rows, best_value, params: dict, file: Path) -> Path:
    """An Optuna sweep: each trial's objective in job order with the best so far (the direction read off the best
    value: the smallest or the largest), then the objective against each numeric searched parameter (`params`:
    name -> each row's value), the best trial starred."""
    plt = pyplot()
    pts = [(k, r["objective"]) for k, r in enumerate(rows) if isinstance(r.get("objective"), float)]
    jobs, values = zip(*pts)
    better = max if best_value is not None and best_value == max(values) != min(values) else min
    numeric = [name for name, xs in params.items() if all(isinstance(x, (int, float)) for x in xs)]
    fig, axes = plt.subplots(1, 1 + len(numeric), figsize=(5 * (1 + len(numeric)), 3.8), squeeze=False)
    ax = axes[0][0]
    ax.plot(jobs, values, "o", label="trial")
    ax.plot(jobs, [better(values[: i + 1]) for i in range(len(values))], "-", label="best so far")
    ax.set(xlabel="trial (job)", ylabel="objective", title=f"Optuna search: {len(values)} trials")
    ax.legend(fontsize=8)
    for ax, name in zip(axes[0][1:], numeric):
        found = [(x, r["objective"], r.get("best")) for x, r in zip(params[name], rows)
                 if isinstance(r.get("objective"), float)]
        ax.plot([x for x, _, _ in found], [v for _, v, _ in found], "o")
        ax.plot([x for x, _, b in found if b], [v for _, v, b in found if b], "*", ms=14, label="best")
        spread = [x for x, _, _ in found if x > 0]
        ax.set(xlabel=name, ylabel="objective", title=f"objective against {name}",
               xscale="log" if spread and len(spread) == len(found) and max(spread) > 10 * min(spread) else "linear")
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, file)


def plot_against(rows, metrics, key: str, file: Path) -> Path:
    """quality_figure, saved to `file`."""
    return save_figure(quality_figure(rows, metrics, key), file)


def quality_figure(rows, metrics, key: str):
    """One panel per metric: value against `key` (NFE on a log scale, the guidance weight or scale), one line per
    (model, sampler) and, against NFE, per guidance weight."""
    plt = pyplot()
    label_x, scale, short = _AXES[key]
    metrics = [m for m in metrics if not m.endswith(_SKIP_PLOT)][:6]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    groups = {}
    for r in rows:
        if r.get(key) is not None:
            w = f", w = {r['guidance']:g}" if key != "guidance" and r.get("guidance") is not None else ""
            groups.setdefault(f"{r['model']} / {r['sampler']}{w}", []).append(r)
    xs = sorted({r[key] for r in rows if r.get(key) is not None})
    for ax, metric in zip(axes[0], metrics):
        for label, group in groups.items():
            pts = sorted((r[key], r[metric]) for r in group  # inf or nan from a diverged run: no point to draw
                         if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set(xscale=scale, xlabel=label_x, ylabel=metric, title=f"{metric} vs {short}")
        ax.grid(alpha=0.3)
        if scale == "log":  # ticks at the values measured, as plain numbers (log axes label 2x10^0, 3x10^0, ...)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    if scale == "log":
        _thin_ticks(fig, xs)
    return fig


def _thin_ticks(fig, xs) -> None:
    """Blank each tick label that would overlap the last one kept, left to right (1000 and 1001 NFE side by side)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        kept, labels = None, []
        for x, label in zip(xs, ax.get_xticklabels()):
            box = label.get_window_extent(renderer)
            if kept is not None and box.x0 < kept.x1 + 4:  # 4 pixels of air between labels
                labels.append("")
            else:
                kept = box
                labels.append(f"{x:g}")
        ax.set_xticks(xs, labels)
