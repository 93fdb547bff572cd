"""What the experiment trackers cost the training loop: the same toy run with logger=none and with every tracker
at once (tensorboard, mlflow, wandb offline, csv), alternated in one process, and the cost of one hand-off.

    python scripts/logging_overhead.py [--steps 3000] [--log-every 10] [--repeats 3] [--each]

The loop's time is the sum of its log windows (log.jsonl's it_per_s: every step, log row and hand-off to the
trackers inside them); a log row every 10 steps is ten times the default toy preset's rate, so the overhead
shown is an upper bound. --each measures every tracker alone too. Prints the CPU (lscpu) next to the figures.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from diffcli.hardware import cpu_kind, cpu_name
from diffcli.loggers import RunInfo, Trackers
from diffcli.runs import read_jsonl
from diffcli.train import run_train

ALL = "logger=[tensorboard,mlflow,wandb,csv]"


def loop_seconds(folder: Path, steps: int, log_every: int, loggers: str) -> float:
    """One toy run; the seconds its step loop took (the sum of its log windows: every step, log row and hand-off)."""
    overrides = ["data=eight_gaussians", f"train.steps={steps}", f"train.log_every={log_every}", "train.sample_every=0",
                 "train.eval_every=0", f"train.ckpt_every={steps}", "device=cpu", loggers,
                 f"logger.mlflow.tracking_uri=sqlite:///{folder.parent / 'mlflow.db'}" if "mlflow" in loggers else ""]
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        cfg = compose("train", [o for o in overrides if o])
    run_train(cfg, folder)
    return sum(log_every / row["it_per_s"] for row in read_jsonl(folder / "log.jsonl"))


def hand_off_us(root: Path, calls: int = 2_000) -> float:
    """Microseconds the step loop spends handing one log row to four trackers (the rest is their threads')."""
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        settings = compose("train", [ALL, f"logger.mlflow.tracking_uri=sqlite:///{root / 'hand_off.db'}"]).logger
    (root / "hand_off").mkdir()
    trackers = Trackers(settings, RunInfo(root / "hand_off", "train", {}))
    trackers.wait_open()
    row = {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 0.3, "train/it_per_s": 100.0}
    t0 = time.perf_counter()
    for step in range(calls):
        trackers.scalars(step, row)
    per_call = (time.perf_counter() - t0) / calls * 1e6
    trackers.close()
    return per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--each", action="store_true", help="also each tracker alone")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()} ({cpu_kind()}); {args.steps} steps of eight_gaussians (net=mlp, batch 512), a log row every "
          f"{args.log_every} steps")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        loop_seconds(root / "warm", 200, args.log_every, "logger=none")  # first-call costs out of the figures
        runs = {"none": "logger=none", "all": ALL}
        runs |= {name: f"logger={name}" for name in ("tensorboard", "mlflow", "wandb", "csv")} if args.each else {}
        times = {name: [] for name in runs}
        for k in range(args.repeats):  # alternated: drift of the machine falls on all alike
            for name, loggers in runs.items():
                times[name].append(loop_seconds(root / f"{name}_{k}", args.steps, args.log_every, loggers))
                print(f"  repeat {k}: logger={name:<11} loop {times[name][-1]:.2f} s")
        none = statistics.median(times["none"])
        spread = (max(times["none"]) - min(times["none"])) / none
        print(f"median loop with logger=none: {none:.2f} s (its own spread between repeats {spread:.1%})")
        for name in list(runs)[1:]:
            t = statistics.median(times[name])
            print(f"  logger={name:<11} {t:.2f} s: ratio {t / none:.3f} ({(t - none) / args.steps * 1e3:+.3f} ms a step)")
        print(f"hand-off of one log row to four trackers: {hand_off_us(root):.1f} us on the step loop's thread")


if __name__ == "__main__":
    main()
