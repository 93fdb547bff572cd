"""`diffcli distill` (diffcli/distill.py, distilling.py, pairs.py) against closed forms and the exact oracle.

- One Gaussian N(m, S): the teacher's flow map is x0 = m + S^(1/2) x1, so the reflowed coupling is deterministic and
  the 2-rectified flow's paths are straight: one Euler step of a trained student must give N(m, S) (the teacher's own
  one step collapses every sample onto m).
- eight_gaussians with the exact oracle as teacher: the issue's targets, frozen after one calibration on the oracle
  (2-reflow straightness <= teacher's / 4; 1-step sliced Wasserstein <= 2x the teacher's dopri5; consistency
  distillation's 1 step within 5% of the data variance (MSE) of the teacher's ODE endpoint from the same noise).
- Pair folders continue where a killed draw stopped and refuse pairs of another teacher; a distilled run resumes
  exactly (the consistency target network included); bad input is one line.
"""

import math

import pytest
import torch

from conftest import compose_config, run_cli
from diffcli import DiffcliError
from diffcli.distill import run_distill
from diffcli.likelihood import straightness
from diffcli.loading import load_model
from diffcli.metrics import sliced_wasserstein
from diffcli.pairs import PART, draw_pairs, read_pairs
from diffcli.samplers import dopri5, euler, linear_grid
from diffcli.toys import eight_gaussians
from diffcli.train import run_train

CPU = torch.device("cpu")
M = [0.5, -0.3]
S = [[0.3, 0.1], [0.1, 0.15]]
ONE_GAUSSIAN = ["data=gmm", f"data.params.means=[{M}]", f"data.params.covs=[{S}]", "data.params.weights=[1.0]"]
QUIET = ["train.sample_every=0", "train.eval_every=0", "train.log_every=500", "device=cpu"]


def oracle_teacher(tmp_path, data, model="flow", name="teacher"):
    """The exact oracle of `data` on `model`'s path, as a training run (nothing to train)."""
    run_train(compose_config("train", [*data, f"model={model}", "net=oracle", "device=cpu"]), tmp_path / name)
    return tmp_path / name


def distil(tmp_path, teacher, *args, name="student"):
    out = run_distill(compose_config("distill", [f"teacher={teacher}", "net=mlp", *QUIET, *args]), tmp_path / name)
    return load_model(out["out_dir"], CPU)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.slow
def test_one_euler_step_of_a_2_reflow_is_the_gaussian_target(tmp_path):
    """1 Euler step of the student trained on the teacher's pairs draws N(m, S): mean and covariance within 3 SE plus
    a stated model error of 0.03; its velocity is the closed form v(x_t, t) = (I - A) x1 - m of the straight
    coupling x0 = m + A x1 (A = S^(1/2)) to within 0.05 RMS, where the velocity's own RMS is about 0.9."""
    teacher = oracle_teacher(tmp_path, ONE_GAUSSIAN)
    student = distil(tmp_path, teacher, "sampler=dopri5", "reflow.n=4000", "train.steps=1500")
    path, n = student.denoiser.path, 20000
    x1 = torch.randn(n, 2, generator=gen(1))
    with torch.no_grad():
        x0 = euler(student.denoiser, path, x1, linear_grid(path, 1)).double()
    m, s = torch.tensor(M, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)
    se_mean, se_cov = (s.diagonal() / n).sqrt(), ((s.diagonal()[:, None] * s.diagonal()[None] + s**2) / n).sqrt()
    model_error = 0.03
    assert ((x0.mean(0) - m).abs() <= 3 * se_mean + model_error).all(), x0.mean(0)
    assert ((x0.T.cov() - s).abs() <= 3 * se_cov + model_error).all(), x0.T.cov()
    # the closed-form velocity along the coupling
    evals, evecs = torch.linalg.eigh(s)
    a = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    t = torch.rand(n, generator=gen(2), dtype=torch.float64)
    x1 = x1.double()
    x_t = (1 - t[:, None]) * (m + x1 @ a) + t[:, None] * x1
    v_true = x1 @ (torch.eye(2, dtype=torch.float64) - a) - m
    with torch.no_grad():
        v = student.denoiser.net(x_t.float(), t.float()).double()
    assert (v - v_true).pow(2).sum(1).mean().sqrt() < 0.05
    # the teacher's own single step (independent coupling) collapses onto the mean: the test can fail
    oracle = load_model(str(teacher), CPU).denoiser
    collapsed = euler(oracle, oracle.path, torch.randn(2000, 2, generator=gen(3), dtype=torch.float64),
                      linear_grid(oracle.path, 1))
    assert (collapsed.T.cov() - s).abs().max() > 5 * model_error


@pytest.mark.slow
def test_reflow_of_the_oracle_on_eight_gaussians(tmp_path):
    """2-reflow of the exact teacher: straightness at most a quarter of the teacher's, 1-step sliced Wasserstein at
    most twice the teacher's dopri5 figure."""
    teacher = oracle_teacher(tmp_path, ["data=eight_gaussians"])
    student = distil(tmp_path, teacher, "sampler=dopri5", "reflow.n=4000", "train.steps=800")
    oracle = load_model(str(teacher), CPU).denoiser
    x1 = torch.randn(1000, 2, generator=gen(4))
    with torch.no_grad():
        s_teacher = straightness(oracle, x1.double(), 100).mean().item()
        s_student = straightness(student.denoiser, x1, 100).mean().item()
        assert s_student <= s_teacher / 4, (s_student, s_teacher)
        reference = eight_gaussians(4000, generator=gen(5), device=CPU)
        x1 = torch.randn(4000, 2, generator=gen(6))
        one_step = euler(student.denoiser, student.denoiser.path, x1, linear_grid(student.denoiser.path, 1))
        exact = dopri5(oracle, oracle.path, x1.double(), torch.tensor([1.0, 1e-3, 0.0], dtype=torch.float64))
    sw_student = sliced_wasserstein(one_step.float(), reference)
    sw_teacher = sliced_wasserstein(exact.float(), reference)
    assert sw_student <= 2 * sw_teacher, (sw_student, sw_teacher)


@pytest.mark.slow
def test_consistency_distillation_of_the_oracle_on_eight_gaussians(tmp_path):
    """One consistency step from the top level t_N lands within 5% of the data variance (MSE) of the teacher's
    dopri5 endpoint from the same x(t_N) = sigma(t_N) x1."""
    teacher = oracle_teacher(tmp_path, ["data=eight_gaussians"])
    student = distil(tmp_path, teacher, "method=consistency", "train.steps=800")
    oracle, d = load_model(str(teacher), CPU).denoiser, student.denoiser
    t_top = float(student.config.model.sampler_options.grid.t_max)
    x = torch.randn(2000, 2, generator=gen(7), dtype=torch.float64) * oracle.path.sigma(torch.tensor(t_top))
    data_variance = eight_gaussians(20000, generator=gen(8), device=CPU).var(0).sum().item()
    with torch.no_grad():
        endpoint = dopri5(oracle, oracle.path, x, torch.tensor([t_top, 1e-3, 0.0], dtype=torch.float64))
        one_step = d(x.float(), torch.tensor(t_top)).double()
    mse = (one_step - endpoint).pow(2).sum(1).mean().item()
    assert mse <= 0.05 * data_variance, (mse, data_variance)


def test_a_pair_folder_continues_where_a_draw_stopped_and_refuses_another_teacher(tmp_path):
    teacher = load_model(str(oracle_teacher(tmp_path, ["data=eight_gaussians"])), CPU)
    d, grid = teacher.denoiser, linear_grid(teacher.denoiser.path, 4)
    settings = {"teacher": "t", "teacher_step": 0, "sampler": "euler 4"}
    draw = lambda folder, **kw: draw_pairs(folder, d, euler, grid, 30, (2,), part_size=10, seed=0,  # noqa: E731
                                           device=CPU, settings={**settings, **kw})
    draw(tmp_path / "whole")
    draw(tmp_path / "killed")
    (tmp_path / "killed" / PART.format(2)).unlink()  # as if the draw had been killed during part 2
    (tmp_path / "killed" / PART.format(1)).write_bytes((tmp_path / "killed" / PART.format(1)).read_bytes())
    draw(tmp_path / "killed")
    whole, again = read_pairs(tmp_path / "whole", 30), read_pairs(tmp_path / "killed", 30)
    assert torch.equal(whole[0], again[0]) and torch.equal(whole[1], again[1]) and whole[3]["nfe"] == 4
    x0, x1 = whole[0], whole[1]
    assert torch.allclose(x0, euler(d, d.path, x1.double(), grid).float(), atol=1e-5)  # endpoints of the noise
    with pytest.raises(DiffcliError, match="drawn with sampler=euler 4, this run asks sampler=heun"):
        draw(tmp_path / "whole", sampler="heun")
    with pytest.raises(DiffcliError, match="holds 30 pairs, fewer than the 40"):
        read_pairs(tmp_path / "whole", 40)
    with pytest.raises(DiffcliError, match=r"shape \(2,\), where \(1, 28, 28\) belong"):
        read_pairs(tmp_path / "whole", 30, (1, 28, 28))
    with pytest.raises(DiffcliError, match="holds no pairs"):
        read_pairs(tmp_path / "nothing", 30)


@pytest.mark.parametrize("method", ["reflow", "consistency"])
def test_a_distilled_run_resumes_exactly(tmp_path, method):
    """10 steps, then train.resume to 20, equals 20 steps at once (consistency: its target network is restored)."""
    teacher = oracle_teacher(tmp_path, ["data=eight_gaussians"])
    common = [f"method={method}", "sampler=euler", "steps=8", "reflow.n=500", "reflow.part_size=100",
              "train.ckpt_every=10", "train.batch_size=64", "train.warmup=5"]
    whole = distil(tmp_path, teacher, *common, "train.steps=20", name="whole")
    first = distil(tmp_path, teacher, *common, "train.steps=10", name="first")
    resume = [f"train.resume={first.file.parents[1]}", "train.steps=20"]
    run_train(compose_config("train", resume), tmp_path / "unused", overrides=resume)
    resumed = load_model(str(first.file.parents[1]), CPU)
    assert resumed.step == whole.step == 20
    for (k, a), b in zip(whole.denoiser.net.state_dict().items(), resumed.denoiser.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert resumed.config.distill.method == method and resumed.config.model.prediction == (
        "consistency" if method == "consistency" else "velocity")


def test_bad_input_is_one_line(tmp_path):
    teacher = oracle_teacher(tmp_path, ["data=eight_gaussians"])
    uniform = oracle_teacher(tmp_path, ["data=eight_gaussians", "model.prior=uniform"], name="uniform")
    refusals = [
        (["method=bogus"], "method=bogus is unknown; choose one of reflow, consistency"),
        (["method=consistency"], None),  # fine: checked below with a uniform teacher
        (["sampler=euler", "sampler.fn.s_churn=1"], "sampler euler draws noise of its own"),
        (["guidance=2"], "guidance=2.0 distils classifier-free guidance, which needs a class-conditional teacher"),
        (["init=teacher"], "init=teacher needs the teacher's network"),
    ]
    for args, message in refusals:
        if message is None:
            continue
        with pytest.raises(DiffcliError, match=message):
            distil(tmp_path, teacher, *args, "train.steps=1", name="bad")
    with pytest.raises(DiffcliError, match="method=consistency needs a Gaussian prior"):
        distil(tmp_path, uniform, "method=consistency", name="bad")
    student = distil(tmp_path, teacher, "method=consistency", "train.steps=2", "train.batch_size=8", name="cm")
    with pytest.raises(DiffcliError, match="is a consistency model, which has no probability-flow ODE"):
        distil(tmp_path, student.file, name="bad")
    other = distil(tmp_path, uniform, "sampler=euler", "steps=4", "reflow.n=100", "train.steps=1", name="other")
    with pytest.raises(DiffcliError, match="were drawn with teacher="):
        distil(tmp_path, teacher, "sampler=euler", "steps=4", f"reflow.pairs={other.file.parents[1] / 'pairs'}",
               "reflow.n=100", "train.steps=1", name="bad")


def test_the_command_line_refuses_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    for args, fragment in ((["method=reflow"], "diffcli distill needs teacher="),
                           ([f"teacher={tmp_path / 'notes.txt'}"], "not a readable checkpoint")):
        result = run_cli("distill", *args, cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr
        assert not (tmp_path / "outputs").exists()  # a failed command leaves no folder behind


def test_straightness_in_eval_and_its_refusal(tmp_path):
    """metric=straightness scores the model's ODE (Euler's estimate, as likelihood.straightness) and refuses a
    consistency model, which has none."""
    from diffcli.evaluate import run_eval

    teacher = oracle_teacher(tmp_path, ["data=eight_gaussians"])
    args = [f"ckpt={teacher}", "metric=straightness", "metric.straightness_n=200", "metric.straightness_steps=50",
            "device=cpu"]
    record = run_eval(compose_config("eval", args), tmp_path / "eval")
    assert record["metrics"]["straightness"] > 0.5 and record["nfe"] is None  # curved; nothing was sampled
    student = distil(tmp_path, teacher, "method=consistency", "train.steps=2", "train.batch_size=8", name="cm")
    with pytest.raises(DiffcliError, match="a consistency model has none"):
        run_eval(compose_config("eval", [f"ckpt={student.file}", *args[1:]]), tmp_path / "eval2")
    assert math.isfinite(record["metrics"]["straightness_sem"])


@pytest.mark.slow
def test_classifier_free_guidance_is_distilled_in(tmp_path):
    """A conditional teacher (gmm's three overlapping classes) at guidance w = 3: the pairs carry its classes (spread
    evenly), and the student's single Euler step with a class lands near the guided teacher's ODE endpoint from the
    same noise and class (MSE within 5% of the samples' variance), the unguided endpoint at least twice as far."""
    from diffcli.guidance import condition

    teacher = oracle_teacher(tmp_path, ["data=gmm", "model.cond=class"])  # overlapping classes: guidance moves them
    student = distil(tmp_path, teacher, "guidance=3", "sampler=euler", "steps=20", "reflow.n=2100",
                     "reflow.part_size=300", "train.steps=600")
    _, _, labels, settings = read_pairs(student.config.distill.pairs, 2100)
    assert settings["guidance"] == 3.0 and torch.equal(labels.bincount(), torch.full((3,), 700))
    assert student.n_classes == 3 and student.config.distill.guidance == 3.0
    oracle, path = load_model(str(teacher), CPU).denoiser, student.denoiser.path
    y = torch.arange(2000) % 3
    x1 = torch.randn(2000, 2, generator=gen(9))
    grid = linear_grid(oracle.path, 20)
    with torch.no_grad():
        one_step = euler(condition(student.denoiser, y), path, x1, linear_grid(path, 1)).double()
        guided = euler(condition(oracle, y, guidance=3.0), oracle.path, x1.double(), grid)
        unguided = euler(condition(oracle, y), oracle.path, x1.double(), grid)
    variance = unguided.var(0).sum().item()
    mse = lambda a, b: (a - b).pow(2).sum(1).mean().item()  # noqa: E731
    assert mse(one_step, guided) <= 0.05 * variance, (mse(one_step, guided), variance)
    assert mse(guided, unguided) > 2 * mse(one_step, guided), (mse(guided, unguided), mse(one_step, guided))


def test_a_ddp_wrapped_student_keeps_its_classes():
    """Under torchrun the consistency objective's student is the DDP-wrapped net, which keeps the network's
    attributes on .module: the Denoiser still sees its classes, so the loss does not drop the labels."""
    from torch import nn

    from diffcli.nets import MLP
    from diffcli.paths import FlowPath
    from diffcli.prediction import Denoiser

    net = MLP((2,), n_classes=3)
    wrapped = nn.Module()
    wrapped.module = net
    assert net.n_classes == 3 and Denoiser(wrapped, FlowPath(), "velocity").n_classes == 3
