"""Class-conditional MNIST: classifier-free guidance's adherence / quality trade-off, and classifier guidance.

A class-conditional flow (model.cond=class, train.p_uncond=0.1) with the U-Net, steps and optimiser of the
side-by-side table (scripts/mnist_side_by_side.py), on the MNIST test split; sampled with 18-step heun at
guidance w = 0, 1, 2, 4 (an even spread of the ten classes) and scored by the classifier-FID network: its
agreement with the requested label, classifier-FID, confidence and class balance. With --classifier-steps,
classifier guidance too: a noise-conditional classifier (net=unet_classifier) trained on the flow's path, guiding
the unconditional flow of the side-by-side table at scales s. Runs the real `diffcli train` / `diffcli eval`
commands one at a time; finished runs are reused.

    python scripts/mnist_conditional.py --n 500
    python scripts/mnist_conditional.py --n 500 --classifier-steps 600 --scales 1 2 4
"""

import argparse

from mnist_side_by_side import DATA, TRAIN, Path, diffcli, real_floor, score, train  # noqa: F401

HEUN = ["sampler=heun", "steps=18"]


def row(tag: str, m: dict) -> str:
    r = m["metrics"]
    return (f"| {tag} | {r['agreement']:.3f} | {r['cfid']:,.1f} | {r['confidence']:.2f} | {r['class_entropy']:.2f} "
            f"| {m['nfe']} | {m['seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n", type=int, default=500, help="samples per score")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument("--classifier-steps", type=int, default=0, help="train a noise-conditional classifier this long "
                    "and guide the unconditional flow with it (0: skip)")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--root", type=Path, default=Path("outputs/mnist12"))
    a = ap.parse_args()
    header = ("| guidance | agreement | classifier-FID | confidence | class balance | NFE | eval (s) |\n"
              "|---|---|---|---|---|---|---|")
    ckpt = a.root / "flow_cond"
    seconds = train(ckpt, "flow", a.steps, ["model.cond=class"])
    rows = [row(f"w = {w:g}", score(ckpt, f"heun18_w{w:g}", a.n, HEUN + [f"guidance={w}"])) for w in a.weights]
    print(f"class-conditional flow, {a.steps} steps: {seconds:.0f} s of training\n{header}\n" + "\n".join(rows))
    print(f"pictures: {ckpt}/eval_heun18_w<w>_{a.n}/samples.png (one row per class)")
    if a.classifier_steps:
        flow = a.root.parent / "mnist11" / "flow"  # the unconditional flow of the side-by-side table
        train(flow, "flow", a.steps)
        clf = a.root / "classifier"
        clf_seconds = train(clf, "flow", a.classifier_steps, ["net=unet_classifier"])
        rows = [row(f"s = {s:g}", score(flow, f"heun18_clf{s:g}", a.n, HEUN + [f"classifier={clf}",
                                                                                f"classifier_scale={s}"]))
                for s in a.scales]
        print(f"\nunconditional flow guided by a noise-conditional classifier ({a.classifier_steps} steps, "
              f"{clf_seconds:.0f} s; accuracy by noise level in {clf}/accuracy.json)\n{header}\n" + "\n".join(rows))
    print(f"real against real, n = {a.n}: {real_floor(a.n):.1f}")


if __name__ == "__main__":
    main()
