"""Peak memory of `diffcli eval` against n: samples and features are streamed, so the peak should not grow with n.

    python scripts/eval_memory.py --ckpt outputs/train/<run> [--n 1000 50000] [--metric cfid] [OVERRIDE ...]

Each figure is the peak resident set size (ru_maxrss, from wait4) of one fresh process: first one that only loads
the checkpoint (the model's own footprint: Python, torch, diffcli and the weights), then `diffcli eval` at each n
with the given overrides (default: 1-step Euler, the cheapest sampler, since memory does not depend on the NFE).
Prints peak RSS, its excess over the footprint, and the wall time of each.
"""

import argparse
import os
import subprocess
import sys
import time

LOAD = ("import sys; from diffcli.allocator import keep_freed_memory; keep_freed_memory(); "
        "from diffcli.loading import load_model; import torch; load_model(sys.argv[1], torch.device('cpu'))")


def peak_mib(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", nargs="+", type=int, default=[1000, 50000])
    parser.add_argument("--metric", default="cfid")
    parser.add_argument("overrides", nargs="*", default=["sampler=euler", "steps=1"])
    args = parser.parse_args()
    base, _ = peak_mib([sys.executable, "-c", LOAD, args.ckpt])
    print(f"model footprint (load only): {base:.0f} MiB peak RSS")
    print("| n | peak RSS (MiB) | above the footprint (MiB) | seconds |\n|---|---|---|---|")
    for n in args.n:
        peak, seconds = peak_mib([sys.executable, "-m", "diffcli", "eval", f"ckpt={args.ckpt}", f"n={n}",
                                  f"metric={args.metric}", "device=cpu", *args.overrides,
                                  f"hydra.run.dir=outputs/eval_memory/n{n}_{int(time.time())}"])
        print(f"| {n:,} | {peak:.0f} | {peak - base:.0f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
