"""Training speed of diffcli's step with glibc's default malloc against diffcli's setting (diffcli.allocator).

    python scripts/bench_allocator.py [--net unet_small] [--batch 32] [--precision auto|fp32|bf16]
                                      [--compile auto|on|off] [--channels-last auto|on|off] [--steps 20] [--rounds 2]

mallopt acts on the whole process, so each measurement is a fresh child process that runs only diffcli's
training step (`bench_train.DiffcliStep`, i.e. `diffcli.training.train_step`): `--rounds` pairs of children,
default glibc and diffcli's setting in alternating order (AB BA ...), each with warm-up steps and then
`--steps` timed steps. Prints images/s (median step), minor page faults and kernel (system) CPU time per
step, peak resident memory, and the ratio. `auto` settings resolve as `diffcli train` resolves them
(`diffcli.training.speed_settings`, a run of 1,000+ steps).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import add_net_arguments  # noqa: E402
from diffcli.allocator import USER_SETTINGS  # noqa: E402


def child(args) -> dict:
    """One measurement in this process: warm-up, then `steps` timed training steps of diffcli's U-Net."""
    if args.mode == "diffcli":
        from diffcli.allocator import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("diffcli.allocator.keep_freed_memory() did not take here (not glibc, or MALLOC_* set)")
    import torch
    from omegaconf import OmegaConf

    from bench_train import DiffcliStep, time_steps, unet_and_batch
    from diffcli.training import speed_settings

    device, shape = torch.device("cpu"), (args.channels, args.image_size, args.image_size)
    tc = OmegaConf.create({"steps": 1000, "precision": args.precision, "compile": args.compile,
                           "channels_last": args.channels_last})
    precision, compiled, nhwc = speed_settings(tc, device, is_image=True)
    net, _, x0 = unet_and_batch(args.net, shape, args.batch, device, nhwc)
    step = DiffcliStep(net, x0, device, precision)
    run = torch.compile(net) if compiled else net
    time_steps(lambda: step(run), args.warmup, device)
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = time_steps(lambda: step(run), args.steps, device)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"mode": args.mode, "setting": f"{precision}{', compiled' if compiled else ''}{', channels-last' if nhwc else ''}",
            "images_per_s": args.batch / statistics.median(seconds),
            "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
            "system_ms_per_step": 1e3 * (after.ru_stime - before.ru_stime) / args.steps,
            "peak_rss_mib": after.ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_net_arguments(parser)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per child")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per child first (the compile among them)")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of children (default glibc, diffcli's setting)")
    parser.add_argument("--mode", choices=["glibc", "diffcli"], default=None, help=argparse.SUPPRESS)  # a child
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args()
    for name in ("compile", "channels_last"):  # on/off as speed_settings reads them
        value = getattr(args, name)
        setattr(args, name, value if value == "auto" else value == "on")
    if args.mode:
        print(json.dumps(child(args)))
        return
    env = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}  # a user setting would make both children alike
    results = {"glibc": [], "diffcli": []}
    for r in range(args.rounds):
        for mode in (("glibc", "diffcli") if r % 2 == 0 else ("diffcli", "glibc")):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], env=env, check=True,
                                 capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
            row = results[mode][-1]
            print(f"round {r + 1} {mode:8s} {row['setting']}: {row['images_per_s']:.1f} images/s, "
                  f"{row['minor_faults_per_step']:.0f} minor faults and {row['system_ms_per_step']:.1f} ms system "
                  f"time per step, peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    mean = {mode: {key: statistics.mean(row[key] for row in rows) for key in rows[0] if key not in ("mode", "setting")}
            for mode, rows in results.items()}
    ratio = mean["diffcli"]["images_per_s"] / mean["glibc"]["images_per_s"]
    print(f"images/s: glibc default {mean['glibc']['images_per_s']:.1f}, diffcli's setting "
          f"{mean['diffcli']['images_per_s']:.1f}, ratio {ratio:.3f}; peak RSS {mean['glibc']['peak_rss_mib']:.0f} "
          f"against {mean['diffcli']['peak_rss_mib']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "mean": mean, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
