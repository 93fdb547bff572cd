"""The figures of docs/guides/tracking.md: a sweep of three formulations on a toy logged to TensorBoard and MLflow,
and an Optuna search of train=quick's learning rate and EMA decay on a toy budget.

    python scripts/tracking_demo.py --out /tmp/tracking [--steps 3000] [--trials 16] [--trial-steps 1500]

Writes <out>/tensorboard.png (the sweep's curves, drawn from its event files with TensorBoard's own reader),
prints the MLflow table of the sweep (MlflowClient) and the search's table (diffcli summary, search.png); about
8 minutes on 2 CPU cores. Prints the CPU (lscpu).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from diffcli.hardware import cpu_name

DIFFCLI = str(Path(sys.executable).with_name("diffcli"))


def diffcli(*args, cwd: Path) -> None:
    r = subprocess.run([DIFFCLI, *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"diffcli {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def formulation_sweep(out: Path, steps: int) -> Path:
    """`diffcli train -m model=ddpm,vpsde,flow` on eight_gaussians, logger=[tensorboard,mlflow]."""
    sweep = out / "formulations"
    diffcli("train", "-m", "model=ddpm,vpsde,flow", "data=eight_gaussians", f"train.steps={steps}",
            "train.eval_every=250", "train.sample_every=0", "objective.metric=sliced_wasserstein",
            "logger=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            f"hydra.sweep.dir={sweep}", cwd=out)
    return sweep


def tensorboard_picture(sweep: Path, file: Path) -> None:
    """The loss and the EMA samples' sliced Wasserstein of each job, read from its event file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        events = EventAccumulator(str(job), size_guidance={"scalars": 0})
        events.Reload()
        model = json.loads((job / "metrics.json").read_text())["model"]
        for ax, tag in zip(axes, ("train/loss", "ema/sliced_wasserstein")):
            points = events.Scalars(tag)
            ax.plot([p.step for p in points], [p.value for p in points], label=model)
            ax.set(xlabel="step", ylabel=tag, title=f"{tag} (TensorBoard scalars)", yscale="log")
            ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(file, dpi=110)


def mlflow_table(db: Path, sweep: Path) -> str:
    """The sweep's MLflow experiment as a Markdown table (one run per job)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(str(sweep))
    runs = client.search_runs([experiment.experiment_id], order_by=["metrics.`final/sliced_wasserstein` ASC"])
    rows = ["| run (MLflow run name) | model.name | train.steps | final/loss | final/sliced_wasserstein | "
            "final/in_modes | status |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r.data.metrics
        rows.append(f"| {r.info.run_name} | {r.data.params['model.name']} | {r.data.params['train.steps']} | "
                    f"{m['final/loss']:.4f} | {m['final/sliced_wasserstein']:.4f} | {m['final/in_modes']:.3f} | "
                    f"{r.info.status} |")
    return f"experiment `{experiment.name}`\n\n" + "\n".join(rows)


def search(out: Path, trials: int, steps: int) -> Path:
    """An Optuna search of train=quick's lr and EMA decay, the toy's sliced Wasserstein as the objective."""
    sweep = out / "search"
    diffcli("train", "-m", "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={trials}", "hydra.sweeper.sampler.seed=0",
            "train=quick", "data=eight_gaussians", "net=mlp", f"train.steps={steps}", "train.sample_every=0",
            "train.ckpt_every=100000", "train.eval_n=2000", "train.lr=tag(log,interval(1e-4,3e-2))",
            "train.ema.decay=interval(0.9,0.999)", "objective.metric=sliced_wasserstein",
            f"hydra.sweep.dir={sweep}", cwd=out)
    return sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--trial-steps", type=int, default=1500)
    args = parser.parse_args()
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(f"CPU: {cpu_name()}")
    sweep = formulation_sweep(out, args.steps)
    tensorboard_picture(sweep, out / "tensorboard.png")
    print(mlflow_table(out / "mlflow.db", sweep))
    found = search(out, args.trials, args.trial_steps)
    subprocess.run([DIFFCLI, "summary", str(found)], check=True)
    print(f"wrote {out / 'tensorboard.png'} and {found / 'search.png'}")


if __name__ == "__main__":
    main()
