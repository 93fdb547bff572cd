"""Quality against training minutes with `train=quick`: MNIST, the Fashion-MNIST and CIFAR-10 subsets of
../shared/data, `model=flow net=unet_small`, each checkpoint (every 1,600 steps) scored by classifier-FID,
confidence and class balance on n samples of 18-step `heun` (35 NFE). Runs the real `diffcli train` /
`diffcli eval` commands one at a time and prints a Markdown table; finished runs and scores are reused.

    python scripts/quick_table.py                          # all three datasets (about 40 minutes on 2 AMX Xeon cores)
    python scripts/quick_table.py --data mnist --n 500
    python scripts/quick_table.py --data mnist --extra train.precision=fp32 train.steps=1800 --tag fp32

Minutes are wall time in train.log from the run's first line to the checkpoint's step (start-up and any
compile included; sample grids and checkpoints written along the way too).
"""

import argparse
import json
from pathlib import Path

from mnist_side_by_side import DATA as MNIST, diffcli, log_lines, real_floor

SHARED = "../shared/data"
DATASETS = {
    "mnist": MNIST,
    "fashion_mnist": ["data=npz", f"data.path={SHARED}/fashion_mnist_subset.npz"],
    "cifar10": ["data=npz", f"data.path={SHARED}/cifar10_train_subset.npz", "data.hflip=true"],
}
# where eval reads each set's real images (never from the checkpoint: docs/guides/evaluation.md)
EVAL_DATA = {"mnist": [f"data.root={SHARED}"], "fashion_mnist": [DATASETS["fashion_mnist"][1]],
             "cifar10": [DATASETS["cifar10"][1]]}
QUICK = ["model=flow", "net=unet_small", "train=quick"]
HEUN = ["sampler=heun", "steps=18"]


def minutes_at(run: Path) -> dict[int, float]:
    """Minutes from the run's first log line to each logged step."""
    lines = log_lines(run)
    start, out = lines[0][0], {}
    for stamp, message in lines:
        words = message.split()
        if len(words) > 1 and words[0] == "step" and words[1].isdigit():
            out[int(words[1])] = (stamp - start).total_seconds() / 60
    return out


def score(ckpt: Path, n: int, located: list[str]) -> dict:
    """Classifier-FID, confidence and class balance of n heun-18 samples of one EMA checkpoint (cached)."""
    out = ckpt.parent.parent / f"eval_heun18_{ckpt.stem}_{n}"
    if not (out / "metrics.json").exists():
        diffcli("eval", f"ckpt={ckpt}", *HEUN, f"n={n}", "metric=cfid", *located, f"hydra.run.dir={out}")
    return json.loads((out / "metrics.json").read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    ap.add_argument("--n", type=int, default=500, help="samples per score")
    ap.add_argument("--extra", nargs="*", default=[], help="more train overrides (e.g. train.precision=bf16)")
    ap.add_argument("--tag", default="quick", help="run folder name under --root/<data>/")
    ap.add_argument("--root", type=Path, default=Path("outputs/quick"))
    a = ap.parse_args()
    rows = []
    for name in a.data:
        run = a.root / name / a.tag
        checkpoints = sorted(run.glob("checkpoints/ema_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        if not checkpoints or not (run / "loss.png").exists():
            diffcli("train", *QUICK, *DATASETS[name], *a.extra, f"hydra.run.dir={run}")
            checkpoints = sorted(run.glob("checkpoints/ema_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        minutes = minutes_at(run)
        for ckpt in checkpoints:
            step = int(ckpt.stem.split("_")[1])
            m = score(ckpt, a.n, EVAL_DATA[name])
            rows.append(f"| {name} | {a.tag} | {step} | {minutes.get(step, float('nan')):.1f} | {m['cfid']:,.1f} | "
                        f"{m['confidence']:.2f} | {m['class_entropy']:.2f} |")
    print("| data | run | step | minutes | classifier-FID | confidence | class balance |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if "mnist" in a.data:
        print(f"MNIST real against real, n = {a.n}: {real_floor(a.n):.1f}")


if __name__ == "__main__":
    main()
