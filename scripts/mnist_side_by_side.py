"""MNIST side by side: edm, ddpm, vpsde and flow, the same small U-Net and the same training steps on
the MNIST test split, each scored by classifier-FID at its default sampler and at 18-step heun.
Runs the real `diffcli train` / `diffcli eval` commands, one at a time, and prints a Markdown table.

    python scripts/mnist_side_by_side.py                        # 2000 samples everywhere (hours on a CPU)
    python scripts/mnist_side_by_side.py --n-default 500 --n-long 100   # fewer for the longer defaults

Finished runs (a checkpoint, a metrics.json) are reused, so an interrupted call picks up where it
stopped. Real-against-real classifier-FID at each sample count is printed too: the metric's floor
grows as n shrinks, so compare a row with the floor at its own n.
"""

import argparse
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

MODELS = ["edm", "flow", "vpsde", "ddpm"]
DATA = ["data=mnist", "data.root=../shared/data", "data.split=test", "data.download=false"]
EVAL_DATA = ["data.root=../shared/data"]  # eval reads real images only from where its own command line says
TRAIN = ["train.batch_size=64", "train.lr=5e-4", "train.warmup=50", "train.ema.decay=0.99",
         "train.sample_every=0", "train.eval_every=0"]
DEFAULT_NFE = {"edm": 35, "flow": 100, "vpsde": 1000, "ddpm": 1000}  # configs/model/*.yaml `sampler:`


def diffcli(*args: str) -> None:
    """One diffcli command; stop the script if it fails."""
    print("$ diffcli " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "diffcli", *args], check=True)


def log_lines(run: Path) -> list[tuple[datetime, str]]:
    """(time, message) of each line of a run's train.log."""
    return [(datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f"), line.split("] - ", 1)[-1])
            for line in (run / "train.log").read_text().splitlines() if line.startswith("[")]


def train(out: Path, model: str, steps: int, extra=()) -> float:
    """Train `model` (with `extra` overrides) into `out` unless its final EMA checkpoint exists; the training wall
    time (s) from train.log."""
    if not (out / "checkpoints" / f"ema_{steps}.safetensors").exists():
        diffcli("train", f"model={model}", *DATA, f"train.steps={steps}", *TRAIN, f"train.ckpt_every={steps}",
                *extra, f"hydra.run.dir={out}")
    stamps = [stamp for stamp, _ in log_lines(out)]
    return (stamps[-1] - stamps[0]).total_seconds()


def score(ckpt: Path, tag: str, n: int, sampler: list[str]) -> dict:
    """Classifier-FID (and confidence, class balance) of n samples; cached in <ckpt>/eval_<tag>_<n>/metrics.json."""
    out = ckpt / f"eval_{tag}_{n}"
    if not (out / "metrics.json").exists():
        diffcli("eval", f"ckpt={ckpt}", *sampler, f"n={n}", "metric=cfid", *EVAL_DATA, f"hydra.run.dir={out}")
    return json.loads((out / "metrics.json").read_text())


def real_floor(n: int, seed: int = 0) -> float:
    """Classifier-FID of n real test images against the whole reference set, as `eval` scores samples."""
    import torch
    from hydra import compose, initialize_config_module

    from diffcli.cfid import classifier_fid, classifier_for
    from diffcli.data import build_data

    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        cfg = compose("train", overrides=DATA).data
    images = build_data(cfg, "cpu", seed=seed).images
    classifier, _ = classifier_for(cfg, cache_dir=Path("~/.cache/diffcli").expanduser(), device="cpu", seed=seed)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return classifier_fid(classifier, images[pick], images)["cfid"]


def cell(m: dict) -> str:
    r = m["metrics"]
    return f"{r['cfid']:,.1f} | {r['confidence']:.2f} | {r['class_entropy']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n", type=int, default=2000, help="samples per score")
    ap.add_argument("--n-default", type=int, default=None, help="samples for the default samplers other than heun "
                    "(default: --n)")
    ap.add_argument("--n-long", type=int, default=None, help="samples for the defaults of 1000 NFE (default: "
                    "--n-default)")
    ap.add_argument("--root", type=Path, default=Path("outputs/mnist11"))
    a = ap.parse_args()
    n_default = a.n_default or a.n
    n_long = a.n_long or n_default
    rows = []
    for model in MODELS:
        ckpt = a.root / model
        seconds = train(ckpt, model, a.steps)
        heun = score(ckpt, "heun18", a.n, ["sampler=heun", "steps=18"])
        n = n_long if DEFAULT_NFE[model] >= 1000 else n_default
        default = heun if model == "edm" else score(ckpt, "default", n, [])
        rows.append(f"| `{model}` | {seconds:.0f} | {default['sampler']} ({default['nfe']}), n = {default['n']} | "
                    f"{cell(default)} | {heun['nfe']} | {cell(heun)} |")
    print("| `model=` | train (s) | default sampler (NFE), samples | classifier-FID | confidence | class balance "
          "| heun NFE | classifier-FID | confidence | class balance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    for n in sorted({a.n, n_default, n_long}):
        print(f"real against real, n = {n}: {real_floor(n):.1f}")


if __name__ == "__main__":
    main()
