"""Sample quality at each speed setting: the same checkpoint and noise, classifier-FID and the largest pixel difference
against fp32 eager.

    python scripts/precision_quality.py --ckpt outputs/train/<mnist run> [--n 2000] [--settings ...] [OVERRIDE ...]

Runs the real `diffcli sample` once per setting (default: fp32 eager, auto, bf16, fp32 compiled channels-last), the
same seed and sampler (default heun, 18 steps), then scores each samples.npz with classifier-FID against the
model's training images (the classifier of `diffcli eval metric=cfid`, cached) and compares its pixels with the
fp32 eager run's. Prints one table row per setting, with the wall time of the sample command.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = {
    "fp32 eager": ["precision=fp32", "compile=false", "channels_last=false"],
    "auto": [],
    "bf16 eager": ["precision=bf16", "compile=false", "channels_last=false"],
    "fp32 compiled, channels-last": ["precision=fp32", "compile=true", "channels_last=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--out", default="outputs/precision_quality")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("overrides", nargs="*", default=["sampler=heun", "steps=18"])
    args = parser.parse_args()
    from diffcli.cfid import classifier_fid, classifier_for
    from diffcli.checkpoint import find_ema, load_ema
    from diffcli.data import build_data, to_float
    from diffcli.scoring import default_cache_dir

    _, train_cfg, step, _ = load_ema(find_ema(args.ckpt))
    data = build_data(train_cfg.data, "cpu", seed=0)
    classifier, _ = classifier_for(train_cfg.data, cache_dir=default_cache_dir(), device=torch.device("cpu"), seed=0)
    reference = to_float(data.images)
    runs, rows = {}, []
    for name in args.settings:
        folder = Path(args.out) / name.replace(" ", "_").replace(",", "")
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "diffcli", "sample", f"ckpt={args.ckpt}", f"n={args.n}",
                               "device=cpu", "seed=0", *args.overrides, *SETTINGS[name], f"hydra.run.dir={folder}"],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        seconds = time.perf_counter() - t0
        speed = next((line.split("the network in ")[-1].strip() for line in
                      (folder / "sample.log").read_text().splitlines() if "the network in" in line), "?")
        runs[name] = torch.from_numpy(np.load(folder / "samples.npz")["samples"])
        scores = classifier_fid(classifier, runs[name], reference)
        gap = (runs[name] - runs[args.settings[0]]).abs().max().item()
        rows.append(f"| {name} ({speed}) | {seconds:.0f} | {scores['cfid']:.2f} | {scores['confidence']:.3f} | "
                    f"{gap:.4f} |")
        print(rows[-1], flush=True)
    print(f"\n{train_cfg.model.name} on {train_cfg.data.name}, step {step}, n = {args.n}, {' '.join(args.overrides)}")
    print(f"| setting (what ran) | seconds | classifier-FID | confidence | largest pixel difference from "
          f"{args.settings[0]} |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
