"""The resume policy in-process: which overrides a resumed run takes, and where its folder is.

tests/test_hardening.py resumes real runs through the CLI (a changed model refused, the log continued in the
run's own folder); these check schema.resume_overrides and cli._run_folder_overrides directly, with a stored
config composed from the shipped files and a run folder holding one tiny checkpoint.
"""

import copy
import functools
import os

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import compose_config
from diffcli import DiffcliError, runs
from diffcli.cli import _run_folder_overrides
from diffcli.schema import TrainApp, parse_overrides, resume_overrides, validate

RUN = "runs/r"


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple) -> DictConfig:
    return compose_config("train", overrides)


def composed(*overrides: str) -> DictConfig:
    """`diffcli train <overrides>` composed (cached: composing takes ~0.1 s), as a copy."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.lru_cache(maxsize=None)
def _stored() -> DictConfig:
    """What a checkpoint of `diffcli train data=moons` carries: the resolved config, typed by the schema."""
    return validate(OmegaConf.to_container(compose_config("train", ["data=moons"]), resolve=True), TrainApp, "stored")


def stored() -> DictConfig:
    return copy.deepcopy(_stored())


def resume(*overrides: str, stored_cfg: DictConfig | None = None):
    """resume_overrides as `diffcli train train.resume=runs/r <overrides>` calls it."""
    args = [f"train.resume={RUN}", *overrides]
    return resume_overrides(composed(*args), stored() if stored_cfg is None else stored_cfg, args, RUN)


def refusal(*overrides: str, stored_cfg: DictConfig | None = None) -> str:
    with pytest.raises(DiffcliError) as info:
        resume(*overrides, stored_cfg=stored_cfg)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ resume_overrides


TRAIN_CHANGES = ("train.steps=6000", "train.lr=0.01", "train.ema.decay=0.99")


def test_train_overrides_apply_on_top_of_the_stored_run():
    resumed, user_class = resume(*TRAIN_CHANGES)
    assert OmegaConf.get_type(resumed) is TrainApp and user_class is None
    assert (resumed.train.steps, resumed.train.lr, resumed.train.ema.decay) == (6000, 0.01, 0.99)
    expected = stored()
    expected.train.steps, expected.train.lr, expected.train.ema.decay = 6000, 0.01, 0.99
    assert OmegaConf.to_container(resumed) == OmegaConf.to_container(expected)  # all else as stored


def test_train_resume_itself_is_not_copied():
    resumed, _ = resume(*TRAIN_CHANGES)
    assert resumed.train.resume is None


def test_the_command_line_defaults_do_not_replace_the_stored_settings():
    """The command line composes eight_gaussians by default; the resumed run stays on its stored moons."""
    assert composed(f"train.resume={RUN}").data.name == "eight_gaussians"
    resumed, _ = resume()
    assert resumed.data.name == "moons" and resumed.train.batch_size == 512


PASSING = ("hydra.run.dir=x", "hydra.job.chdir=true", "hydra/job_logging=stdout", "device=cpu")


def test_hydra_keys_and_device_pass():
    resumed, _ = resume(*PASSING)
    assert OmegaConf.to_container(resumed, resolve=False) == OmegaConf.to_container(stored(), resolve=False) | {
        "device": resumed.device}


def test_a_device_override_is_where_the_resumed_run_goes():
    resumed, _ = resume(*PASSING)
    assert resumed.device == "cpu"


REFUSED = [("model=flow", "model.name there is 'ddpm', here 'flow'"),
           ("net.hidden=64", "net.hidden there is 128, here 64"),
           ("seed=3", "seed there is 0, here 3"),
           ("data=rings", "data.name there is 'moons', here 'rings'"),
           ("net=unet_small", "net._target_ there is 'diffcli.nets.MLP', here 'diffcli.nets.UNet'"),
           ("++model.snr_gamma=1.0", "model.snr_gamma there is 5.0, here 1.0")]


@pytest.mark.parametrize("override, difference", REFUSED, ids=[r[0] for r in REFUSED])
def test_an_override_that_changes_the_run_is_refused(override, difference):
    """One line: the run, the key, the stored and the new value, and the fix (drop the override that changes it)."""
    *same, changed = override.split()
    assert refusal(*same, changed) == (f"train.resume continues {RUN} as it was trained: {difference}; drop {changed} "
                                       "or start a new run")


def test_an_override_equal_to_the_stored_run_passes():
    resumed, user_class = resume("data=moons", "model=ddpm", "net=mlp", "net.hidden=128", "seed=0",
                                 "data.params.noise=0.05")
    assert OmegaConf.to_container(resumed) == OmegaConf.to_container(stored()) and user_class is None


def test_naming_the_stored_train_preset_again_passes():
    resumed, _ = resume("train=toy")
    assert resumed.train.batch_size == 512


def test_the_override_to_drop_is_the_one_that_changes_the_run():
    assert refusal("data=moons", "data.params.noise=0.2").endswith("drop data.params.noise=0.2 or start a new run")


def test_a_bad_train_override_is_refused_naming_the_key():
    args = [f"train.resume={RUN}", "train.steps=abc"]
    with pytest.raises(DiffcliError) as info:  # composed without it: Hydra itself refuses the word
        resume_overrides(composed(f"train.resume={RUN}"), stored(), args, RUN)
    assert str(info.value).startswith(f"train.resume={RUN}: train.steps: Value 'abc'")
    args = [f"train.resume={RUN}", "+train.stepz=3"]
    with pytest.raises(DiffcliError) as info:
        resume_overrides(composed(*args), stored(), args, RUN)
    assert str(info.value) == f"train.resume={RUN}: train.stepz is not a known key (`--cfg job` lists the keys)"


def _with_user_net(name="mynet.Net"):
    run = stored()
    run.net = {"_target_": name, "hidden": 128}
    return run


def test_naming_the_stored_net_class_again_makes_it_the_user_class():
    resumed, user_class = resume("net._target_=mynet.Net", stored_cfg=_with_user_net())
    assert user_class == "mynet.Net" and resumed.net._target_ == "mynet.Net"


def test_a_stored_net_class_not_named_again_is_no_user_class():
    resumed, user_class = resume(stored_cfg=_with_user_net())
    assert user_class is None and resumed.net._target_ == "mynet.Net"


def test_naming_another_net_class_is_refused():
    assert refusal("net._target_=other.Net", stored_cfg=_with_user_net()) == (
        f"train.resume continues {RUN} as it was trained: net._target_ there is 'mynet.Net', here 'other.Net'; "
        "drop net._target_=other.Net or start a new run")


# ------------------------------------------------------------------------------------------------ run folder


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch, tmp_path):
    monkeypatch.setattr(runs, "_CLAIMED", {})
    monkeypatch.setattr(runs, "CREATED", {})
    monkeypatch.chdir(tmp_path)


class FreshAdam:
    """The state_dict of an Adam optimizer before its first step (torch.optim's first use costs seconds)."""

    def __init__(self, net):
        self.n = len(list(net.parameters()))

    def state_dict(self):
        return {"state": {}, "param_groups": [{"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                               "params": list(range(self.n))}]}


def trained_run(folder: str) -> str:
    """A run folder with a real (tiny) training-state checkpoint, as `diffcli train` leaves it."""
    from diffcli.build import build_net
    from diffcli.checkpoint import load_state, save_state

    net = build_net({"_target_": "diffcli.nets.MLP", "hidden": 8, "depth": 1, "emb_dim": 8}, (2,))
    os.makedirs(f"{folder}/checkpoints")
    file = f"{folder}/checkpoints/state_4.safetensors"
    save_state(file, net=net, ema_net=copy.deepcopy(net), optimizer=FreshAdam(net), scaler=None, step=4,
               cfg=stored(), shape=(2,))
    assert load_state(file)["step"] == 4
    return folder


def _parsed(overrides):
    return [(o.key_or_group, o.value()) for o in parse_overrides(overrides)]


def test_resume_runs_in_the_folder_of_the_run_it_continues():
    trained_run("r")
    out = _run_folder_overrides("train", ["train.resume=r", "train.steps=6"])
    assert out == ["hydra.run.dir='r'", "hydra.output_subdir=null"]
    assert _parsed(out) == [("hydra.run.dir", "r"), ("hydra.output_subdir", None)]
    assert runs.CREATED == {}  # the run's own folder is never removed as unused


@pytest.mark.parametrize("folder, given", [("my run", "'my run'"), ("it's", '"it\'s"'), ("end\\", "'end\\\\'")],
                         ids=["space", "quote", "trailing backslash"])
def test_a_folder_name_hydra_must_quote_reaches_hydra_unchanged(folder, given):
    trained_run(folder)
    out = _run_folder_overrides("train", [f"train.resume={given}"])
    assert _parsed(out)[0] == ("hydra.run.dir", folder)


def test_a_backslash_inside_a_folder_name_reaches_hydra_unchanged():
    trained_run("a\\b")
    out = _run_folder_overrides("train", ["train.resume='a\\b'"])
    assert _parsed(out)[0] == ("hydra.run.dir", "a\\b")


def test_resume_with_a_run_folder_of_its_own_is_refused():
    trained_run("r")
    with pytest.raises(DiffcliError) as info:
        _run_folder_overrides("train", ["train.resume=r", "hydra.run.dir=x"])
    assert str(info.value) == "train.resume=r continues that run in its own folder; drop hydra.run.dir=x"


def test_resume_of_a_folder_without_checkpoints_is_refused():
    os.mkdir("empty")
    with pytest.raises(DiffcliError, match="train.resume=empty: no checkpoints/state_<step>.safetensors there"):
        _run_folder_overrides("train", ["train.resume=empty"])
    with pytest.raises(DiffcliError, match="train.resume=missing is not a folder"):
        _run_folder_overrides("train", ["train.resume=missing"])


@pytest.mark.parametrize("command, args", [("train", ["train.resume=r", "-m"]),
                                           ("train", ["train.resume=r", "--multirun"]), ("sample", ["train.resume=r"]),
                                           ("train", ["train.resume=null"]), ("train", ["train.steps=6"])])
def test_no_folder_overrides_without_a_single_resumed_training_run(command, args):
    trained_run("r")
    assert _run_folder_overrides(command, args) == []


def test_a_new_run_folder_is_noted_as_this_process_s_own():
    """hydra.run.dir=new/run (absent): noted with the parents made for it, to remove if the run fails at once."""
    os.mkdir("there")
    assert _run_folder_overrides("train", ["hydra.run.dir=new/deep/run"]) == []
    assert _run_folder_overrides("sample", ["hydra.run.dir=there"]) == []  # existing: never this run's own
    assert runs.CREATED == {os.path.abspath("new/deep/run"): [os.path.abspath("new/deep"), os.path.abspath("new")]}
