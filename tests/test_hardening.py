"""Hardening: a checkpoint never runs code; bad input and faults end in one line, exit 2, no traceback.

Every case runs the real `diffcli` command in a subprocess. Hostile checkpoints carry payloads
that would leave a marker file behind if anything instantiated, imported, unpickled or resolved
them; each test asserts the one-line refusal and that the marker is absent.
"""

import fcntl
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import DIFFCLI, run_cli, start_training
from test_cli import assert_one_line_error

TINY = ["data=moons", "train.steps=4", "train.log_every=2", "train.ckpt_every=2", "train.sample_every=0",
        "train.eval_every=0", "train.batch_size=64"]


class Payload:
    """Unpickling this runs a shell command: the classic pickle exploit."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny trained run (checkpoints at steps 2 and 4) that the tests copy and tamper with."""
    root = tmp_path_factory.mktemp("hardening")
    r = run_cli("train", *TINY, "hydra.run.dir=run", cwd=root)
    assert r.returncode == 0, r.stderr
    return root / "run"


def _copy_run(run, dest):
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".diffcli.lock"))
    return dest


def _rewrite(file, edit_config=None, edit_tensors=None, edit_meta=None):
    """Rewrite a checkpoint in place with its config, tensors or metadata edited."""
    with safe_open(str(file), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if edit_config:
        config = json.loads(meta["config"])
        edit_config(config)
        meta["config"] = json.dumps(config)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(file), metadata=meta)


def _hostile(run, dest, edit_config, kind="ema"):
    """A copy of the run whose newest `kind` checkpoint carries an edited config."""
    _copy_run(run, dest)
    _rewrite(dest / "checkpoints" / f"{kind}_4.safetensors", edit_config)
    return dest


def _set(key, value):
    """An edit that puts `value` at the dotted `key` of a stored config."""
    def edit(config):
        *parents, last = key.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value(config) if callable(value) else value
    return edit


# payload family -> (key it hides in, value given the marker and pickle file paths, fragment of the refusal)
PAYLOADS = {
    "os.system in a nested key": ("net.time_scale", lambda m, p: {"_target_": "os.system", "command": f"touch {m}"},
                                  "net.time_scale"),
    "asyncio shell as the net class": ("net._target_", lambda m, p: "asyncio.create_subprocess_shell",
                                       "net._target_=asyncio.create_subprocess_shell"),
    "builtins.open as the path": ("model.path", lambda m, p: {"_target_": "builtins.open", "file": str(m), "mode": "w"},
                                  "model.path._target_=builtins.open"),
    "shutil.copy in data.params": ("data.params.noise",
                                   lambda m, p: {"_target_": "shutil.copy", "src": "/etc/hostname", "dst": str(m)},
                                   "data.params.noise"),
    "torch.load of pickle bytes": ("net.fourier_scale",
                                   lambda m, p: {"_target_": "torch.load", "f": str(p), "weights_only": False},
                                   "net.fourier_scale"),
    "numpy.load allow_pickle": ("net.hidden", lambda m, p: {"_target_": "numpy.load", "file": str(p),
                                                            "allow_pickle": True}, "net.hidden"),
    "distutils spawn": ("net.emb_dim", lambda m, p: {"_target_": "distutils.spawn.spawn", "cmd": ["touch", str(m)]},
                        "net.emb_dim"),
    "oc.env interpolation": ("net.time_scale", lambda m, p: "${oc.env:HOME}", "interpolation"),
    "sampler name as a path": ("model.sampler", lambda m, p: "../../../../tmp/evil", "model.sampler"),
}


def _payload_files(tmp_path):
    marker, pkl = tmp_path / "PWNED", tmp_path / "payload.pkl"
    pkl.write_bytes(pickle.dumps(Payload(marker)))
    return marker, pkl


@pytest.mark.parametrize("family", list(PAYLOADS))
def test_hostile_checkpoint_is_refused_by_sample(run, tmp_path, family):
    key, value, fragment = PAYLOADS[family]
    marker, pkl = _payload_files(tmp_path)
    _hostile(run, tmp_path / "hostile", _set(key, lambda c: value(marker, pkl)))
    r = run_cli("sample", "ckpt=hostile", "n=8", cwd=tmp_path)
    assert_one_line_error(r, fragment)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("family", ["os.system in a nested key", "builtins.open as the path", "oc.env interpolation"])
def test_hostile_checkpoint_is_refused_by_eval(run, tmp_path, family):
    key, value, fragment = PAYLOADS[family]
    marker, pkl = _payload_files(tmp_path)
    _hostile(run, tmp_path / "hostile", _set(key, lambda c: value(marker, pkl)))
    assert_one_line_error(run_cli("eval", "ckpt=hostile", "n=8", cwd=tmp_path), fragment)
    assert not marker.exists(), "the payload ran"


SAMPLER_PAYLOAD = ("sampler", lambda m, p: {"fn": {"_target_": "os.system", "_partial_": True, "command": f"touch {m}"},
                                            "grid": {"name": "uniform"}, "steps": 2}, "sampler.fn._target_=os.system")


@pytest.mark.parametrize("family", ["os.system in a nested key", "asyncio shell as the net class", "sampler fn"])
def test_hostile_state_is_refused_by_resume(run, tmp_path, family):
    key, value, fragment = SAMPLER_PAYLOAD if family == "sampler fn" else PAYLOADS[family]
    marker, pkl = _payload_files(tmp_path)
    _hostile(run, tmp_path / "hostile", _set(key, lambda c: value(marker, pkl)), kind="state")
    r = run_cli("train", "train.resume=hostile", "train.steps=6", "train.sample_every=2", cwd=tmp_path)
    assert_one_line_error(r, fragment)
    assert not marker.exists(), "the payload ran"


def test_own_network_class_only_when_named_on_the_command_line(tmp_path):
    """net._target_ of the user's own: train takes it from the command line; sample only with net_class=."""
    (tmp_path / "mynet.py").write_text("from diffcli.nets import MLP\n\nclass Net(MLP):\n    pass\n")
    env = {"PYTHONPATH": str(tmp_path)}
    r = run_cli("train", *TINY, "net._target_=mynet.Net", "hydra.run.dir=own", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert_one_line_error(run_cli("sample", "ckpt=own", "n=8", cwd=tmp_path, env=env), "net_class=mynet.Net")
    r = run_cli("sample", "ckpt=own", "n=8", "net_class=mynet.Net", "sampler=ddim", "steps=5", "hydra.run.dir=s",
                cwd=tmp_path, env=env)
    assert r.returncode == 0 and (tmp_path / "s" / "samples.npz").is_file(), r.stderr


def test_inception_weights_are_never_unpickled(tmp_path):
    """A .pth that would run code when unpickled is refused by diffcli's own weights_only read."""
    from diffcli import DiffcliError
    from diffcli.inception import load_inception

    marker, pkl = _payload_files(tmp_path)
    with pytest.raises(DiffcliError, match="not a plain weights file"):
        load_inception(pkl, torch.device("cpu"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- bad input
# (command, arguments, fragment the one line must hold); most fail at composition, before torch is used
BAD_INPUT = [
    ("train", ["train.steps=abc"], "train.steps"),
    ("train", ["train.steps=1.5"], "train.steps"),
    ("train", ["+train.stepz=5"], "train.stepz"),
    ("train", ["train.ema.decay=1.5"], "train.ema.decay"),
    ("train", ["train.lr=nan"], "train.lr"),
    ("train", ["train.ckpt_every=0"], "train.ckpt_every"),
    ("train", ["train.log_every=0"], "train.log_every"),
    ("train", ["train.sample_every=-1"], "train.sample_every"),
    ("train", ["net.hidden=1.5"], "net.hidden"),
    ("train", ["+net.hiddn=3"], "net.hiddn"),
    ("train", ["model.prior=uniform"], "model.prior"),
    ("train", ["model.sampler=../x"], "model.sampler"),
    ("train", ["device=gpu"], "device=gpu"),
    ("train", ["sampler=midpoint"], "midpoint"),
    ("train", ["data=moons", "data.params.noise=nan"], "not finite"),
    ("train", ["data=moons", "data.params.noise=abc"], "data.params.noise"),
    ("sample", ["ckpt=[a,b]"], "ckpt"),
    ("sample", ["n=1.5"], "n"),
    ("sample", ["+model=flow"], "model"),
    ("eval", ["metric.nll_n=0"], "metric.nll_n"),
]


@pytest.mark.parametrize("command, args, fragment", BAD_INPUT, ids=[" ".join(c[1]) for c in BAD_INPUT])
def test_bad_input_is_one_line(tmp_path, command, args, fragment):
    assert_one_line_error(run_cli(command, *args, cwd=tmp_path), fragment)


def test_damaged_npz_is_one_line(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "good.npz", images=images)
    np.savez_compressed(tmp_path / "packed.npz", images=images)
    raw, packed = (tmp_path / "good.npz").read_bytes(), bytearray((tmp_path / "packed.npz").read_bytes())
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    damaged = bytearray(raw)
    damaged[200:260] = bytes(60)  # pixels changed: the zip's CRC no longer matches
    (tmp_path / "damaged.npz").write_bytes(bytes(damaged))
    packed[100:140] = b"\xff" * 40  # a broken deflate stream
    (tmp_path / "broken.npz").write_bytes(bytes(packed))
    r = run_cli("train", "data=npz", "data.path=damaged.npz", "net=mlp", "train.steps=2", cwd=tmp_path)
    assert_one_line_error(r, "damaged.npz", "CRC")
    from diffcli import DiffcliError
    from diffcli.data import build_data

    for name, reason in [("cut.npz", "not a zip file"), ("broken.npz", "decompressing")]:  # the same path in-process
        with pytest.raises(DiffcliError, match=reason):
            build_data({"kind": "npz", "name": "npz", "path": str(tmp_path / name)}, "cpu")


# damaged diffcli checkpoints: (what, edit of the EMA file, fragment)
DAMAGED = [
    ("no step", dict(edit_meta=lambda m: m.pop("step")), "'step'"),
    ("shape not a list", dict(edit_meta=lambda m: m.update(shape='"x"')), "shape"),
    ("config not JSON", dict(edit_meta=lambda m: m.update(config="{not json")), "'config'"),
    ("a tensor missing", dict(edit_tensors=lambda t: t.pop(next(iter(t)))), "do not fit"),
    ("a tensor resized", dict(edit_tensors=lambda t: t.update({k: v[:1] for k, v in list(t.items())[:1]})),
     "do not fit"),
    ("unknown config key", dict(edit_config=_set("train.stepz", 3)), "train.stepz"),
    ("wrong config type", dict(edit_config=_set("train.steps", "many")), "train.steps"),
]


def _both(*edits):
    return lambda config: [edit(config) for edit in edits]


# sizes a file asks for (an allocation of 80-745 GB each, before they were bounded) and files that would take minutes
# or overflow the stack to parse: (what, edit of the EMA file, fragment); each is refused before anything is built
HOSTILE_SIZES = [
    ("a class count beyond any data", dict(edit_config=_both(_set("model.cond", "class"),
                                                             _set("model.n_classes", 10**10))), "model.n_classes"),
    ("classes the weights do not have", dict(edit_config=_both(_set("model.cond", "class"),
                                                               _set("model.n_classes", 5_000))), "do not fit"),
    ("a network width the weights do not have", dict(edit_config=_set("net.hidden", 10**6)), "do not fit"),
    ("a path of 10^9 steps", dict(edit_config=_set("model.path.T", 10**9)), "model.path.T"),
    ("a sampler of 10^9 steps", dict(edit_config=_set("steps", 10**9)), "steps=1000000000"),
    ("a sample shape of 10^10 numbers", dict(edit_meta=lambda m: m.update(shape="[1, 100000, 100000]")), "shape"),
    ("1.6 M characters of class names", dict(edit_config=_set("model.class_names", ["class name"] * 150_000)),
     "M characters"),
    ("JSON nested 100,000 deep", dict(edit_meta=lambda m: m.update(config="[" * 100_000 + "]" * 100_000)), "'config'"),
    ("JSON nested 40 deep", dict(edit_config=_set("data.params.noise", json.loads("[" * 40 + "]" * 40))), "'config'"),
]


@pytest.mark.parametrize("what, edit, fragment", HOSTILE_SIZES, ids=[h[0] for h in HOSTILE_SIZES])
def test_a_size_read_from_a_file_is_bounded_before_anything_is_built(run, tmp_path, what, edit, fragment):
    """In-process through loading.load_model (what sample, eval and the companions open a checkpoint with), with the
    address space capped at 8 GB: a refusal that came after the allocation would fail with MemoryError instead."""
    from diffcli import DiffcliError
    from diffcli.loading import load_model

    _copy_run(run, tmp_path / "bad")
    _rewrite(tmp_path / "bad" / "checkpoints" / "ema_4.safetensors", **edit)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, hard))
    try:
        with pytest.raises(DiffcliError) as info:
            load_model(str(tmp_path / "bad"), torch.device("cpu"))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert fragment in str(info.value) and len(str(info.value)) < 400


def test_hostile_sizes_are_one_line_through_the_command(run, tmp_path):
    for name, (what, edit, fragment) in {"wide": HOSTILE_SIZES[2], "deep": HOSTILE_SIZES[7]}.items():
        _copy_run(run, tmp_path / name)
        _rewrite(tmp_path / name / "checkpoints" / "ema_4.safetensors", **edit)
        assert_one_line_error(run_cli("sample", f"ckpt={name}", "n=8", cwd=tmp_path, timeout=60), fragment)


def test_a_long_value_is_not_echoed_whole(run, tmp_path):
    """A 200,000-character value from a file: the error line keeps its head and its fix, 1,000 characters at most."""
    _copy_run(run, tmp_path / "bad")
    _rewrite(tmp_path / "bad" / "checkpoints" / "ema_4.safetensors",
             edit_config=_set("model.sampler", "x" * 200_000))
    r = run_cli("sample", "ckpt=bad", "n=8", cwd=tmp_path)
    assert_one_line_error(r, "model.sampler", "refusing to load it")
    assert len(r.stderr.strip()) < 1100


@pytest.mark.parametrize("what, file_edit, fragment", [
    ("optimizer JSON nested 100,000 deep", dict(edit_meta=lambda m: m.update(optimizer="[" * 10**5 + "]" * 10**5)),
     "'optimizer'"),
    ("a network width the weights do not have", dict(edit_config=_set("net.hidden", 10**6)),
     "train.resume: its weights do not fit")])
def test_a_hostile_training_state_is_refused_before_anything_is_built(run, tmp_path, what, file_edit, fragment):
    _copy_run(run, tmp_path / "r")
    _rewrite(tmp_path / "r" / "checkpoints" / "state_4.safetensors", **file_edit)
    assert_one_line_error(run_cli("train", "train.resume=r", "train.steps=6", cwd=tmp_path, timeout=60), fragment)


@pytest.mark.parametrize("what, edit, fragment", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_checkpoint_is_one_line(run, tmp_path, what, edit, fragment):
    _copy_run(run, tmp_path / "bad")
    _rewrite(tmp_path / "bad" / "checkpoints" / "ema_4.safetensors", **edit)
    assert_one_line_error(run_cli("sample", "ckpt=bad", "n=8", cwd=tmp_path), fragment)


# values that were accepted and then ignored, refused only after work, or refused naming the wrong fix: (command and
# arguments with {run} for the trained run's folder, fragment); each leaves no folder behind
REFUSED_EARLY = [
    (["train", "data=moons", "sampler=unipc", "sampler.fn.order=5"], "sampler.fn.order=5 must be 1, 2 or 3"),
    (["sample", "ckpt={run}", "sampler=euler", "sampler.fn.s_churn=-1"], "sampler.fn.s_churn=-1"),
    (["sample", "ckpt={run}", "guidance_interval=[0.1,1.0]"], "guidance_interval limits"),
    (["sample", "ckpt={run}", "label=2"], "needs a class-conditional model"),
    (["eval", "ckpt={run}", "metric=nll", "guidance=2", "label=1"], "label=1 guidance=2.0 would be ignored"),
]


def test_guidance_of_an_oracle_asks_for_the_label_it_lacks():
    """net=oracle knows its mixture's classes but samples the whole mixture: guidance=w without label= was refused
    with 'set label=... (or leave both unset ...)' although both were unset; now the message fits the case."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from diffcli import DiffcliError
    from diffcli.sampling import requested_labels

    oracle = SimpleNamespace(denoiser=SimpleNamespace(n_classes=8), n_classes=0)
    with pytest.raises(DiffcliError, match="samples its whole mixture unless asked for one: set label= or labels="):
        requested_labels(OmegaConf.create({"guidance": 2.0}), oracle, 10)
    assert requested_labels(OmegaConf.create({"guidance": 2.0, "label": 3}), oracle, 4).tolist() == [3, 3, 3, 3]
    assert requested_labels(OmegaConf.create({}), oracle, 4) is None  # no guidance: the whole mixture


@pytest.mark.parametrize("args, fragment", REFUSED_EARLY, ids=[" ".join(a[1:]) for a, _ in REFUSED_EARLY])
def test_a_value_that_would_be_ignored_or_fail_late_is_refused_at_once(run, tmp_path, args, fragment):
    r = run_cli(*(a.format(run=run) for a in args), cwd=tmp_path)
    assert_one_line_error(r, fragment)
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_never_writes_into_an_existing_one(run, tmp_path):
    """hydra.run.dir onto a finished run (train would replace its checkpoints, sample its .hydra/config.yaml) or
    onto a file: one line, and the run is byte-for-byte as it was."""
    _copy_run(run, tmp_path / "done")
    before = {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()}
    (tmp_path / "afile").write_text("mine")
    for args in (["train", *TINY, "hydra.run.dir=done"], ["sample", "ckpt=done", "n=8", "hydra.run.dir=done"],
                 ["eval", "ckpt=done", "n=8", "-m", "seed=1,2", "hydra.sweep.dir=done"]):
        assert_one_line_error(run_cli(*args, cwd=tmp_path), "already holds files")
    assert_one_line_error(run_cli("sample", "ckpt=done", "hydra.run.dir=afile", cwd=tmp_path), "afile is a file")
    assert {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()} == before
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_companion_from_other_data_or_without_classes_is_one_line(run, tmp_path):
    """Classifier guidance with a classifier of other 2D data (eight_gaussians for a moons model) was accepted; a
    classifier whose class count is missing, or a guide whose classes differ from its weights, were tracebacks."""
    r = run_cli("train", "data=eight_gaussians", "net=mlp_classifier", *TINY[1:], "hydra.run.dir=clf", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_one_line_error(run_cli("sample", f"ckpt={run}", "classifier=clf", "n=8", cwd=tmp_path),
                          "was trained on eight_gaussians", "the model on moons")
    _rewrite(tmp_path / "clf" / "checkpoints" / "ema_4.safetensors",
             edit_config=_both(_set("data.name", "moons"), _set("model.n_classes", None)))
    assert_one_line_error(run_cli("sample", f"ckpt={run}", "classifier=clf", "n=8", cwd=tmp_path),
                          "records no class count")
    _copy_run(run, tmp_path / "guide")
    _rewrite(tmp_path / "guide" / "checkpoints" / "ema_4.safetensors",
             edit_config=_both(_set("model.cond", "class"), _set("model.n_classes", 3)))
    assert_one_line_error(run_cli("sample", f"ckpt={run}", "guide=guide", "guidance=2", "n=8", cwd=tmp_path),
                          "guide/checkpoints/ema_4.safetensors", "do not fit")


def test_sigterm_stops_sample_cleanly(run, tmp_path):
    """SIGTERM (a scheduler's stop) is one line and exit 143, and the run's folder and partial samples go, as with
    Ctrl-C (it was exit 143 with no word and a folder left behind)."""
    proc = subprocess.Popen([str(DIFFCLI), "sample", f"ckpt={run}", "n=1000000", "batch_size=1000000", "steps=1000",
                             "hydra.run.dir=out"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while not (tmp_path / "out" / ".hydra").is_dir() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # into the sampling loop
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.strip() == "diffcli: error: terminated (SIGTERM)", stderr
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_changed_model(run, tmp_path):
    _copy_run(run, tmp_path / "r")
    for change, fragment in [("model=flow", "model"), ("data.params.noise=0.2", "data.params.noise"),
                             ("seed=3", "seed")]:
        assert_one_line_error(run_cli("train", "train.resume=r", "train.steps=6", change, cwd=tmp_path), fragment)


# ---------------------------------------------------------------------------------------------- faults


def test_runs_started_together_get_their_own_folders(tmp_path):
    """Two runs whose folder names coincide (as two starts in one second do) write two folders."""
    same = "hydra.run.dir=${diffcli.new_dir:outputs/train/same}"
    procs = [subprocess.Popen([str(DIFFCLI), "train", *TINY, same], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    folders = sorted(p.name for p in (tmp_path / "outputs" / "train").iterdir())
    assert folders == ["same", "same_1"]
    for name in folders:  # each log holds one run's rows only
        rows = [json.loads(line)["step"] for line in (tmp_path / "outputs" / "train" / name / "log.jsonl").open()]
        assert rows == [2, 4]


def test_a_folder_another_run_writes_into_is_refused(run, tmp_path):
    _copy_run(run, tmp_path / "busy")
    with open(tmp_path / "busy" / ".diffcli.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train holds it
        r = run_cli("train", "train.resume=busy", "train.steps=6", cwd=tmp_path)
    assert_one_line_error(r, "another diffcli train is writing into")


def test_full_disk_keeps_older_checkpoints(run, tmp_path):
    """A write that fails (here: a file-size limit, as a full disk does) is one line; nothing is damaged."""
    _copy_run(run, tmp_path / "r")
    limit = (tmp_path / "r" / "checkpoints" / "ema_4.safetensors").stat().st_size // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    r = subprocess.run([str(DIFFCLI), "train", "train.resume=r", "train.steps=6"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env, preexec_fn=small_files)
    assert_one_line_error(r, "cannot write", "in r/checkpoints")
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(p.name for p in (run / "checkpoints").iterdir())
    assert (ckpts / "state_4.safetensors").read_bytes() == (run / "checkpoints" / "state_4.safetensors").read_bytes()


def test_unwritable_output_folder_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    assert_one_line_error(run_cli("train", *TINY, "hydra.run.dir=afile/run", cwd=tmp_path), "afile")


FAILS_BEFORE_WORK = [("train", ["train.ckpt_every=0"]),  # refused inside Hydra's job, its folder made
                     ("train", ["train.ckpt_every=0", "hydra.run.dir=new/run"]),  # a folder named on the command line
                     ("train", ["data=npz", "data.path=missing.npz"]),
                     ("sample", ["ckpt=missing/run"]),
                     ("eval", ["n=0"]),
                     ("train", ["-m", "train.ckpt_every=0"]),  # a sweep's job folder and the sweep's own
                     ("train", ["-m", "train.resume=missing/run"])]


@pytest.mark.parametrize("command, args", FAILS_BEFORE_WORK, ids=[" ".join(a) for _, a in FAILS_BEFORE_WORK])
def test_a_command_that_fails_before_any_work_leaves_no_folder(tmp_path, command, args):
    assert_one_line_error(run_cli(command, *args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("always")
def test_a_library_warning_is_logged_not_a_second_stderr_line(capsys, caplog):
    """Under diffcli, Python warnings go to logging (Hydra's console is stdout, and the run's log file)."""
    import logging
    import warnings

    from diffcli.cli import _quiet_warnings

    logging.captureWarnings(False)  # an earlier in-process main() may have left it on, under another test's catcher
    _quiet_warnings()
    try:
        with caplog.at_level(logging.WARNING, logger="py.warnings"):
            warnings.warn("a library's deprecation", UserWarning)
    finally:
        logging.captureWarnings(False)
    assert capsys.readouterr().err == "" and "a library's deprecation" in caplog.text


def test_a_failed_run_keeps_a_folder_that_was_there(tmp_path):
    (tmp_path / "mine").mkdir()
    assert_one_line_error(run_cli("train", "train.ckpt_every=0", "hydra.run.dir=mine", cwd=tmp_path), "ckpt_every")
    assert (tmp_path / "mine").is_dir()


def test_resume_logs_into_the_run_it_continues(run, tmp_path):
    """No stray outputs/train/<date>/ holding only .hydra/ and train.log: the resumed run's log gets the lines."""
    _copy_run(run, tmp_path / "r")
    hydra_files = {p.name: p.read_text() for p in (tmp_path / "r" / ".hydra").iterdir()}
    before = (tmp_path / "r" / "train.log").read_text()
    r = run_cli("train", "train.resume=r", "train.steps=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    log = (tmp_path / "r" / "train.log").read_text()
    assert log.startswith(before) and "resuming r from step 4" in log[len(before):]
    assert {p.name: p.read_text() for p in (tmp_path / "r" / ".hydra").iterdir()} == hydra_files  # its own config
    assert_one_line_error(run_cli("train", "train.resume=r", "train.steps=8", "hydra.run.dir=x", cwd=tmp_path),
                          "drop hydra.run.dir=x")


def test_resume_survives_a_torn_log_line_and_removes_temporaries(run, tmp_path):
    _copy_run(run, tmp_path / "r")
    with open(tmp_path / "r" / "log.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # a crash in the middle of writing a row
    tmp = tmp_path / "r" / "checkpoints" / ".ema_6.safetensors.tmp12345"
    tmp.write_bytes(b"half a checkpoint")
    r = run_cli("train", "train.resume=r", "train.steps=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not tmp.exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "r" / "log.jsonl").open()] == [2, 4, 6]


def test_all_steps_skipped_logs_no_loss(tmp_path):
    """A log window in which every step was non-finite (huge data: the loss overflows) records null, not 0."""
    r = run_cli("train", *TINY, "data.params.scale=1e30", "hydra.run.dir=r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").open()]
    assert [row["loss"] for row in rows] == [None, None] and rows[-1]["skipped"] == 4


def test_non_finite_samples_are_one_line(run, tmp_path):
    _copy_run(run, tmp_path / "nan")
    _rewrite(tmp_path / "nan" / "checkpoints" / "ema_4.safetensors",
             edit_tensors=lambda t: t.update({k: v * float("nan") for k, v in t.items() if v.is_floating_point()}))
    assert_one_line_error(run_cli("sample", "ckpt=nan", "n=8", "sampler=ddim", "steps=5", cwd=tmp_path), "not finite")


def test_second_ctrl_c_exits_at_once_without_traceback(tmp_path):
    proc = start_training("data=moons", "train.steps=1000000", "train.batch_size=65536", "train.log_every=1",
                          "train.ckpt_every=1000000", cwd=tmp_path)  # slow steps: the second signal lands mid-step
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
