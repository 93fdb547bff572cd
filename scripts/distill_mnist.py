"""Issue 30's MNIST table: few-step students of a `train=quick` MNIST flow by `diffcli distill` (reflow and
consistency distillation), each given about the teacher's own training time, scored by classifier-FID next to the
teacher at the same NFE (euler) and at its own 18-step heun (34 NFE).

1. The teacher: --teacher (a `train=quick model=flow net=unet_small data=mnist data.split=test train.steps=1500`
   run), else one trained with exactly those settings into <out>/teacher (model.cond=class with --conditional).
   Its training time (train.log, first line to last) is the budget the students are held to.
2. `diffcli distill teacher=... method=<m>` into <out>/<m>, timed: reflow draws --pairs pairs with the teacher's
   `sampler=heun steps=18` into <out>/pairs (a killed draw continues there) and trains --steps steps on them;
   consistency trains --steps steps against one heun step of the teacher. --conditional distils classifier-free
   guidance at w = --guidance into the student.
3. `diffcli eval metric=cfid n=500 seed=0` of the student at 1, 2 and 4 steps, of the teacher with euler at 1, 2 and
   4 steps and with heun at 18 (at guidance w too with --conditional); samples.png of each to <out>/pictures/.
4. One Markdown table (also <out>/table.md) with the distillation times next to the teacher's training time, the
   budget arithmetic, and issue 30's two aims checked: the 2-NFE student's confidence within 0.03 of the teacher's
   heun-18 one, its classifier-FID within 1.5x.

    python scripts/distill_mnist.py --data /work/shared/data --out /tmp/distill_mnist --teacher /tmp/q/mnist
    python scripts/distill_mnist.py --data /work/shared/data --out /tmp/distill_mnist_cond --conditional --guidance 2

On 2 CPU cores without AMX (fp32, 3 teacher steps/s): about 8 minutes per method (the teacher's 9 minutes of
training is the budget), 3-4 minutes of evals, and another 9 minutes when the teacher is trained here: about
20 minutes with --teacher, 30 without. Finished runs and evals are reused (a rerun of a method with other
--pairs/--steps redoes it and its scores); give another --out for another teacher or --n.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from datetime import datetime
from pathlib import Path

from mnist_side_by_side import diffcli, log_lines

TEACHER = ["train=quick", "model=flow", "net=unet_small", "data=mnist", "data.split=test", "data.download=false"]
PAIR_SAMPLER = ["sampler=heun", "steps=18"]  # reflow's pairs: the teacher's own 18-step heun (34 NFE on a flow)
# (pairs, steps) by --conditional, sized to the 1500-step teacher's 530 s (3.0 steps/s) on 2 cores without AMX:
# pairs at 7.7/s (smoke test, batch 64; half that under guidance, two network passes per NFE), reflow training at
# 3 steps/s, consistency at 1.2-1.5 steps/s (its teacher's heun step and target network; about 1 with guidance).
# Unconditional: reflow 2000 / 7.7 + 600 / 3 = 460 s, consistency 600 / 1.3 = 460 s; conditional: reflow
# 1000 / 3.9 + 450 / 3 = 410 s, consistency 450 / 1.0 = 450 s; each plus about 10 s of start-up.
DEFAULTS = {False: (2000, 600), True: (1000, 450)}


def log_times(file: Path) -> list[tuple[datetime, str]]:
    """(time, message) of each line of a diffcli log file."""
    return [(datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f"), line.split("] - ", 1)[-1])
            for line in file.read_text().splitlines() if line.startswith("[")]


def last_ckpt(run: Path, steps: int) -> bool:
    """Whether the run holds its final EMA checkpoint."""
    return (run / "checkpoints" / f"ema_{steps}.safetensors").exists()


def teacher_run(a) -> Path:
    """The teacher's run folder: --teacher, else one trained with the issue's settings into <out>/teacher."""
    if a.teacher:
        return a.teacher.resolve()
    run = a.out / "teacher"
    if not last_ckpt(run, a.teacher_steps):
        shutil.rmtree(run, ignore_errors=True)
        diffcli("train", *TEACHER, f"data.root={a.data}", f"train.steps={a.teacher_steps}",
                *(["model.cond=class"] if a.conditional else []), f"hydra.run.dir={run}")
    return run


def train_seconds(run: Path) -> tuple[float, float]:
    """(train.log's first to last line, the sum of steps / it_per_s of log.jsonl) in seconds."""
    stamps = [stamp for stamp, _ in log_lines(run)]
    rows, done, steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()], 0, 0.0
    for r in rows:
        steps, done = steps + (r["step"] - done) / r["it_per_s"], r["step"]
    return (stamps[-1] - stamps[0]).total_seconds(), steps


def phases(run: Path) -> dict:
    """Seconds of distill.log's pair draw (0 when reused) and of the student's training."""
    lines = log_times(run / "distill.log")
    at = {key: next((t for t, m in lines if m.startswith(key)), None) for key in ("drawing", "distilling", "done")}
    start = at["drawing"] or at["distilling"]
    return {"pairs_s": (at["distilling"] - start).total_seconds(),
            "train_s": (at["done"] - at["distilling"]).total_seconds()}


def distill(a, teacher: Path, method: str) -> dict:
    """`diffcli distill` of one method into <out>/<method> (reused when finished); its wall time and phases."""
    run, record = a.out / method, a.out / method / "timing.json"
    asked = {"steps": a.steps, "pairs": a.pairs if method == "reflow" else None, "guidance": a.guidance * a.conditional}
    if last_ckpt(run, a.steps) and record.exists() and json.loads(record.read_text()).get("asked") == asked:
        return json.loads(record.read_text())
    for old in [run, *(a.out / "eval").glob(f"{method}_*")]:  # a new student: its old scores go too
        shutil.rmtree(old, ignore_errors=True)
    extra = [f"reflow.n={a.pairs}", f"reflow.part_size={min(250, a.pairs)}", f"reflow.pairs={a.out / 'pairs'}",
             *PAIR_SAMPLER] if method == "reflow" else []
    guided = [f"guidance={a.guidance}"] if a.conditional else []
    start = time.perf_counter()
    diffcli("distill", f"teacher={teacher}", f"method={method}", f"data.root={a.data}", f"train.steps={a.steps}",
            *extra, *guided, "seed=0", f"hydra.run.dir={run}")
    out = {"wall_s": time.perf_counter() - start, **phases(run), "asked": asked}
    record.write_text(json.dumps(out, indent=2))
    return out


def evaluate(a, ckpt: Path, name: str, extra: list[str]) -> dict:
    """`diffcli eval metric=cfid` of a run into <out>/eval/<name> (reused when there); its samples.png to pictures/."""
    out = a.out / "eval" / name
    if not (out / "metrics.json").exists():
        diffcli("eval", f"ckpt={ckpt}", *extra, f"n={a.n}", "metric=cfid", "seed=0", f"data.root={a.data}",
                f"hydra.run.dir={out}")
    (a.out / "pictures").mkdir(exist_ok=True)
    shutil.copyfile(out / "samples.png", a.out / "pictures" / f"{name}.png")
    return json.loads((out / "metrics.json").read_text())


def row(model: str, sampler: str, m: dict, conditional: bool) -> str:
    """One Markdown row of an eval's metrics.json."""
    r = m["metrics"]
    agreement = f" {r.get('agreement', float('nan')):.3f} |" if conditional else ""
    return (f"| {model} | {sampler} | {m['nfe']} | {r['cfid']:,.2f} | {r['confidence']:.3f} | "
            f"{r['class_entropy']:.3f} |{agreement} {m['seconds']:.0f} |")


def aims(method: str, student: dict, teacher: dict) -> str:
    """Issue 30's two aims for the 2-NFE student against the teacher's heun-18, in words."""
    s, t = student["metrics"], teacher["metrics"]
    gap, ratio = s["confidence"] - t["confidence"], s["cfid"] / t["cfid"]
    ok = lambda good: "met" if good else "missed"  # noqa: E731
    return (f"- {method}, 2 NFE: confidence {s['confidence']:.3f} against the teacher's {t['confidence']:.3f} at "
            f"{teacher['nfe']} NFE ({gap:+.3f}; aim within 0.03: {ok(gap >= -0.03)}); classifier-FID "
            f"{s['cfid']:.2f} against {t['cfid']:.2f} ({ratio:.2f}x; aim within 1.5x: {ok(ratio <= 1.5)})")


def budget(method: str, t: dict, a, teacher_s: float) -> str:
    """The budget arithmetic of one distillation, in words."""
    rate = f", {a.pairs / t['pairs_s']:.1f} pairs/s" if method == "reflow" and t["pairs_s"] > 0 else ""
    pairs = f"pairs {t['pairs_s']:.0f} s ({a.pairs}{rate}) + " if method == "reflow" else ""
    return (f"- {method}: {pairs}training {t['train_s']:.0f} s ({a.steps} steps, {a.steps / t['train_s']:.2f} "
            f"steps/s); {t['wall_s']:.0f} s wall in all = {t['wall_s'] / teacher_s:.2f}x the teacher's "
            f"{teacher_s:.0f} s ({'within' if t['wall_s'] <= teacher_s else 'over'} budget)")


def time_rows(timings: dict, teacher_s: float, steps_s: float, options: str) -> list[str]:
    """The distillation wall times next to the teacher's training time, as a Markdown table."""
    return ["| run | wall time (s) | pairs (s) | training (s) | of the teacher's training |", "|---|---|---|---|---|",
            f"| teacher training | {teacher_s:.0f} | | {steps_s:.0f} (steps) | 1.00x |",
            *[f"| distill method={m}{options} | {t['wall_s']:.0f} | {t['pairs_s']:.0f} | {t['train_s']:.0f} | "
              f"{t['wall_s'] / teacher_s:.2f}x |" for m, t in timings.items()]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="the folder holding MNIST/")
    ap.add_argument("--out", type=Path, default=Path("/tmp/distill_mnist"))
    ap.add_argument("--teacher", type=Path, default=None, help="a trained run (default: train one into <out>/teacher)")
    ap.add_argument("--teacher-steps", type=int, default=1500, help="the teacher's train.steps when trained here")
    ap.add_argument("--conditional", action="store_true", help="a class-conditional teacher; CFG distilled at w")
    ap.add_argument("--guidance", type=float, default=2.0, help="w with --conditional")
    ap.add_argument("--pairs", type=int, default=None, help="reflow's (noise, teacher sample) pairs (default: 2000, "
                    "1000 with --conditional)")
    ap.add_argument("--steps", type=int, default=None, help="the students' training steps at the teacher's batch "
                    "(default: 600, 450 with --conditional)")
    ap.add_argument("--methods", default="reflow,consistency")
    ap.add_argument("--n", type=int, default=500, help="samples per classifier-FID")
    ap.add_argument("--eval-steps", default="1,2,4", help="the students' (and euler teacher's) steps scored; the aims "
                    "read 2")
    a = ap.parse_args()
    a.pairs, a.steps = a.pairs or DEFAULTS[a.conditional][0], a.steps or DEFAULTS[a.conditional][1]
    a.out, a.data = a.out.resolve(), a.data.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in a.methods.split(",") if m]
    eval_steps = [int(k) for k in a.eval_steps.split(",") if k]
    teacher = teacher_run(a)
    teacher_s, steps_s = train_seconds(teacher)
    timings = {m: distill(a, teacher, m) for m in methods}

    cond = a.conditional
    w = [f"guidance={a.guidance}"] if cond else []
    tag = f"_w{a.guidance:g}" if cond else ""
    columns = ["model", "sampler", "NFE", "classifier-FID", "confidence", "class balance", "eval (s)"]
    columns[6:6] = ["agreement"] if cond else []
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    rows, two = [], {}
    for m in methods:
        for k in eval_steps:
            r = evaluate(a, a.out / m, f"{m}_{k}", [f"sampler.steps={k}"])
            two |= {m: r} if k == 2 else {}
            rows.append(row(f"{m} student", f"{r['sampler']}, {k} steps", r, cond))
    for k in eval_steps:
        r = evaluate(a, teacher, f"teacher_euler{k}{tag}", ["sampler=euler", f"sampler.steps={k}", *w])
        rows.append(row("teacher" + (f", w = {a.guidance:g}" if cond else ""), f"euler, {k} steps", r, cond))
    heun = evaluate(a, teacher, f"teacher_heun18{tag}", ["sampler=heun", "sampler.steps=18", *w])
    rows.append(row("teacher" + (f", w = {a.guidance:g}" if cond else ""), "heun, 18 steps", heun, cond))
    if cond:
        r = evaluate(a, teacher, "teacher_heun18", ["sampler=heun", "sampler.steps=18"])
        rows.append(row("teacher, w = 1", "heun, 18 steps", r, cond))

    lines = [f"MNIST, {a.n} samples per score, seed 0; teacher {teacher} ({'class-conditional, ' if cond else ''}"
             f"training {teacher_s:.0f} s wall, {steps_s:.0f} s of steps)", "", header, *rows, "",
             *time_rows(timings, teacher_s, steps_s, f" guidance={a.guidance:g}" if cond else ""),
             "", "Budget:", *[budget(m, t, a, teacher_s) for m, t in timings.items()],
             "", "Aims (issue 30):", *[aims(m, two[m], heun) for m in methods if m in two],
             "", f"Pictures: {a.out / 'pictures'}/<name>.png"]
    text = "\n".join(lines)
    (a.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
