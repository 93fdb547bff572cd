"""diffcli.schema in-process: the typed schema, the value ranges and the override policy, without a subprocess.

tests/test_cli.py and tests/test_hardening.py keep the end-to-end promise (one line on stderr, exit code 2);
these check the functions behind it, case by case, in milliseconds.
"""

import copy
import functools
import math

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from conftest import ROOT, compose_config
from diffcli import DiffcliError
from diffcli.ranges import RANGES, check_ranges
from diffcli.schema import (SCHEMAS, EvalApp, SampleApp, TrainApp, all_groups, check_overrides, command_groups,
                            config_error, parse_overrides, validate)

APPS = {"train": TrainApp, "sample": SampleApp, "eval": EvalApp}


@functools.lru_cache(maxsize=None)
def _composed(name: str, overrides: tuple = ()) -> DictConfig:
    return compose_config(name, overrides)


def composed(name: str, *overrides: str) -> DictConfig:
    """A shipped primary config composed through Hydra's API (cached: composing takes ~0.1 s), as a copy."""
    return copy.deepcopy(_composed(name, tuple(overrides)))


def refusal(call, *args) -> str:
    """The message of the DiffcliError that call(*args) raises, checked to be one line."""
    with pytest.raises(DiffcliError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ validate


@pytest.mark.parametrize("command", list(APPS))
def test_the_shipped_configs_validate_against_their_schema(command):
    """Each command's composed config merges onto its schema, typed by it, and its values are in range."""
    cfg = validate(composed(command), SCHEMAS[f"{command}_schema"], f"diffcli {command}")
    assert OmegaConf.get_type(cfg) is APPS[command]
    check_ranges(cfg)


@pytest.mark.parametrize("command", list(APPS))
def test_each_primary_config_lists_its_schema_first(command):
    """train.yaml, sample.yaml and eval.yaml put `<command>_schema` (a SCHEMAS key) first in their defaults."""
    defaults = OmegaConf.load(ROOT / "configs" / f"{command}.yaml").defaults
    assert defaults[0] == f"{command}_schema" and SCHEMAS[defaults[0]] is APPS[command]


UNKNOWN = [({"train": {"stepz": 5}}, "train.stepz"), ({"foo": 1}, "foo"),
           ({"train": {"ema": {"decy": 0.9}}}, "train.ema.decy"), ({"model": {"times": {"dst": "uniform"}}},
                                                                    "model.times.dst")]


@pytest.mark.parametrize("given, key", UNKNOWN, ids=[k for _, k in UNKNOWN])
def test_an_unknown_key_is_one_line_naming_it(given, key):
    """An unknown key, at any depth, is refused in one line that names it and where the keys are listed."""
    message = refusal(validate, given, TrainApp, "diffcli train")
    assert message == f"diffcli train: {key} is not a known key (`--cfg job` lists the keys)"


def test_a_plus_key_that_hydra_lets_through_is_refused():
    """`+train.stepz=5` composes (Hydra adds the key unchecked); validating the composed config refuses it."""
    cfg = composed("train", "+train.stepz=5")
    assert cfg.train.stepz == 5
    assert "train.stepz is not a known key" in refusal(validate, cfg, TrainApp, "diffcli train")


WRONG_TYPE = [(TrainApp, {"train": {"steps": "abc"}}, "train.steps", "could not be converted to Integer"),
              (TrainApp, {"train": {"steps": 1.5}}, "train.steps", "could not be converted to Integer"),
              (TrainApp, {"train": {"lr": "fast"}}, "train.lr", "could not be converted to Float"),
              (TrainApp, {"seed": True}, "seed", "could not be converted to Integer"),
              (SampleApp, {"n": 1.5}, "n", "could not be converted to Integer"),
              (SampleApp, {"labels": ["a"]}, "labels[0]", "could not be converted to Integer"),
              (SampleApp, {"sample": {"save_trajectory": "maybe"}}, "sample.save_trajectory", "is not a valid bool"),
              (EvalApp, {"metric": {"rtol": "tight"}}, "metric.rtol", "could not be converted to Float")]


@pytest.mark.parametrize("schema, given, key, fragment", WRONG_TYPE, ids=[w[2] for w in WRONG_TYPE])
def test_a_wrong_type_is_one_line_naming_the_key(schema, given, key, fragment):
    """A word where a number belongs, a float for an integer, a bool for an integer: one line with the key."""
    message = refusal(validate, given, schema, "diffcli x")
    assert message.startswith(f"diffcli x: {key}: ") and fragment in message, message


def test_validate_leaves_interpolations_unresolved(tmp_path):
    """Interpolations survive validation as text: no resolver runs (no folder made, no missing env var error)."""
    folder = tmp_path / "made"
    given = {"ckpt": f"${{diffcli.new_dir:{folder}}}", "guide": "${oc.env:DIFFCLI_TEST_NO_SUCH_VARIABLE}",
             "steps": "${n}", "n": 7}
    cfg = validate(given, SampleApp, "diffcli sample")
    stored = OmegaConf.to_container(cfg, resolve=False)
    assert {k: stored[k] for k in given} == given and not folder.exists()
    assert cfg.steps == 7  # and they still resolve when read


def test_validate_accepts_a_plain_dict_and_fills_the_schema_defaults():
    """A stored config read from a file (a plain dict) gets the schema's defaults for keys it predates."""
    cfg = validate({"model": {"name": "ddpm"}}, TrainApp, "stored")
    assert cfg.model.precond == "none" and cfg.model.times.dist == "uniform" and cfg.train.lr_schedule == "constant"


# ------------------------------------------------------------------------------------------------ config_error


def _omegaconf_error(given, schema=TrainApp):
    with pytest.raises(Exception) as info:
        OmegaConf.merge(OmegaConf.structured(schema), given)
    return info.value


def test_config_error_names_the_key_of_a_wrong_value():
    """OmegaConf's multi-line report becomes '<full_key>: <first line>'."""
    error = _omegaconf_error({"train": {"steps": "abc"}})
    assert len(str(error).splitlines()) > 1
    assert config_error(error) == "train.steps: Value 'abc' of type 'str' could not be converted to Integer"


def test_config_error_of_an_unknown_key_says_where_the_keys_are():
    error = _omegaconf_error({"train": {"ema": {"decy": 1}}})
    assert config_error(error) == "train.ema.decy is not a known key (`--cfg job` lists the keys)"


def test_config_error_without_a_full_key_line():
    """A 'Key ... not in' message without OmegaConf's full_key line takes the key from the quotes; others pass on."""
    assert config_error(ValueError("Key 'stepz' is not in struct")) == \
        "stepz is not a known key (`--cfg job` lists the keys)"
    assert config_error(ValueError("something else\nsecond line")) == "something else"
    assert config_error(ValueError()) == "ValueError"


# ------------------------------------------------------------------------------------------------ check_ranges

# key -> (a value out of range, a value in range); NaN and infinities are tried on every key besides
RANGE_CASES = {
    "train.steps": (0, 10), "train.batch_size": (-1, 64), "train.lr": (0.0, 1e-3),
    "train.betas": ([0.9, 1.0], [0.9, 0.999]), "train.weight_decay": (-0.1, 0.0), "train.warmup": (-1, 0),
    "train.grad_clip": (0.0, None), "train.ema.decay": (1.0, 0.999), "train.ema.warmup": (-1, 0),
    "train.channels_last": ("yes", True), "train.compile": ("sometimes", "auto"), "train.grad_accum": (0, 2),
    "precision": ("fp8", "bf16"), "compile": ("sometimes", True), "channels_last": ("yes", "auto"),
    "train.max_nonfinite": (0, 20), "train.log_every": (0, 1), "train.ckpt_every": (0, 5),
    "train.sample_every": (-1, 0), "train.eval_every": (-1, 0), "train.n_samples": (0, 16), "train.eval_n": (0, 16),
    "train.keep_last": (-1, 0), "data.sigma_max": (0.0, None), "model.sigma_data": (0.0, 0.5),
    "model.snr_gamma": (-5.0, 5.0), "model.sigma_min": (-0.002, 0.002), "sample_steps": (0, 2), "reflow.n": (0, 100), "reflow.part_size": (0, 50),
    "consistency.N": (1, 18), "consistency.mu": (1.0, 0.95), "model.times.mean": (math.inf, -1.2), "model.times.std": (0.0, None),
    "model.cond": ("label", "class"), "train.p_uncond": (1.5, 0.0), "label": (-1, 0), "labels": ([], [0, 3]),
    "guidance_interval": ([5.0, 1.0], [0.28, 5.42]), "classifier_scale": (-1.0, 0.0), "guidance": (-0.5, 0.0),
    "sampler.steps": (0, None), "sampler.default_steps": (10**6 + 1, 50), "sampler.continuous_steps": (0, 1000),
    "steps": (0, None), "eta": (-0.1, 1.0), "n": (0, 8), "batch_size": (0, 1), "metric.batch_size": (0, 100),
    "metric.kid_subsets": (0, 1), "metric.kid_subset_size": (1, 2), "metric.nll_n": (0, 1), "metric.probes": (0, 1),
    "metric.straightness_n": (0, 10), "metric.straightness_steps": (0, 10),
    "metric.rtol": (0.0, 1e-5), "metric.atol": (-1e-5, 1e-5), "metric.n_reference": (0, None),
    "metric.classifier_epochs": (0, None), "task": ("paint", "inpaint"), "method": ("blend", "repaint"),
    "strength": (1.5, 0.5), "jump_length": (0, 10), "jump_n_sample": (0, 10), "sigma_y": (-0.1, 0.05),
    "scale": (-1.0, 0.3), "frames": (1, 8),
    "objective.metric": ("fid", "sliced_wasserstein"), "objective.direction": ("lower", "maximize"),
    "logger.flush_timeout": (-1.0, 30.0), "logger.wandb.mode": ("shared", "offline"),
}
# keys whose value is a list: NaN and infinity go inside it
AS_LIST = {"train.betas": lambda x: [0.9, x], "labels": lambda x: [x], "guidance_interval": lambda x: [0.5, x]}


def _only(key, value) -> DictConfig:
    """A config holding just `key` (check_ranges skips the keys a config does not have)."""
    cfg = OmegaConf.create()
    OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def test_every_range_has_a_case_here():
    """A key added to RANGES without a case in this file fails here."""
    assert set(RANGE_CASES) == set(RANGES)


@pytest.mark.parametrize("key", list(RANGES))
def test_a_value_out_of_range_nan_or_infinite_is_one_line_naming_the_key_and_the_range(key):
    """The bad value, NaN, inf and -inf are each refused with the key and what it must be; the good value passes."""
    bad, good = RANGE_CASES[key]
    check_ranges(_only(key, good))
    assert refusal(check_ranges, _only(key, bad)) == f"{key}={bad} must be {RANGES[key][1]}"
    for special in (math.nan, math.inf, -math.inf):
        value = AS_LIST.get(key, lambda x: x)(special)
        assert refusal(check_ranges, _only(key, value)) == f"{key}={value} must be {RANGES[key][1]}"


UPPER = {"steps": 10**6 + 1, "n": 10**7 + 1, "batch_size": 2**20 + 1, "train.batch_size": 2**20 + 1,
         "train.n_samples": 10_001, "train.eval_n": 10**7 + 1, "sampler.continuous_steps": 10**6 + 1}


@pytest.mark.parametrize("key", list(UPPER))
def test_a_size_beyond_any_machine_is_refused(key):
    """Sizes are bounded above too (a stored config is checked with the same table): one past the bound is refused,
    the bound itself passes."""
    check_ranges(_only(key, UPPER[key] - 1))
    assert refusal(check_ranges, _only(key, UPPER[key])) == f"{key}={UPPER[key]} must be {RANGES[key][1]}"


def test_check_ranges_reports_the_first_bad_key_of_a_composed_config():
    """On a whole composed config, the first key out of range in RANGES' order is the one named."""
    cfg = composed("train", "data=moons")
    check_ranges(cfg)
    cfg.train.ckpt_every, cfg.model.sigma_data = 0, -1.0
    assert refusal(check_ranges, cfg) == "train.ckpt_every=0 must be a positive integer"


# ------------------------------------------------------------------------------------------------ overrides


def test_command_groups_are_the_groups_of_each_primary_config():
    assert command_groups("train") == ["net", "model", "train", "data", "sampler", "logger"]
    assert command_groups("sample") == ["sampler"]
    assert command_groups("eval") == ["sampler", "metric", "logger"]


def test_all_groups_are_the_shipped_config_folders():
    assert all_groups() == sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_dir() and p.name[0] != "_")
    assert all_groups() == ["data", "logger", "metric", "model", "net", "sampler", "train"]


@pytest.mark.parametrize("command", list(APPS))
def test_command_groups_are_exactly_what_hydra_composes(command, tmp_path, monkeypatch):
    """The groups Hydra chose while composing (hydra.runtime.choices) are command_groups(command); no folder made."""
    monkeypatch.chdir(tmp_path)
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        choices = compose(command, return_hydra_config=True).hydra.runtime.choices
    assert sorted(g for g in choices if not g.startswith("hydra/")) == sorted(command_groups(command))
    assert list(tmp_path.iterdir()) == []


def test_parse_overrides_reads_key_value_arguments_only():
    """Flags (-m, --cfg job) are skipped; quoted values and lists are parsed as Hydra parses them."""
    parsed = parse_overrides(["a=1", "-m", "--cfg", "job", "+b.c=[1,2]", "x='q r'", "~d=3"])
    assert [(o.key_or_group, o.value(), o.input_line) for o in parsed] == \
        [("a", 1, "a=1"), ("b.c", [1, 2], "+b.c=[1,2]"), ("x", "q r", "x='q r'"), ("d", 3, "~d=3")]


def test_parse_overrides_of_a_syntax_error_is_empty():
    """Hydra's own message says where a syntax error is, when it runs; parse_overrides gives up quietly."""
    assert parse_overrides(["train.steps=[", "seed=1"]) == []
    check_overrides("train", ["train.stepz=[", "seed=1"])  # nothing refused: Hydra reports the syntax error


# (command, override, the message's fragment); each is also given with `+` and `++`
UNREAD = [
    ("train", "train.stepz=5", "train.stepz is not a key of diffcli train (did you mean train.steps?)"),
    ("train", "train.ema.decy=0.9", "train.ema.decy is not a key of diffcli train (did you mean train.ema.decay?)"),
    ("train", "seeed=3", "seeed is not a key of diffcli train (did you mean seed?)"),
    ("train", "metric=fid", "diffcli train has no metric= group; its groups: net, model, train, data, sampler"),
    ("sample", "model=flow", "diffcli sample has no model= group: a checkpoint's data, model, net and train settings "
                             "are fixed when it is trained (diffcli train makes a new one); its groups: sampler"),
    ("sample", "data=moons", "diffcli sample has no data= group: a checkpoint's data"),
    ("sample", "train=quick", "diffcli sample has no train= group: a checkpoint's data"),
    ("sample", "model.path.T=5", "model.path.T is not a key of diffcli sample: a checkpoint's data, model"),
    ("sample", "metric.nll_n=3", "metric.nll_n is not a key of diffcli sample"),
    ("eval", "train.steps=3", "train.steps is not a key of diffcli eval: a checkpoint's data"),
    ("eval", "metric.nll=3", "metric.nll is not a key of diffcli eval (did you mean metric.nll_n?)"),
    ("eval", "net=mlp", "diffcli eval has no net= group: a checkpoint's data"),
]


@pytest.mark.parametrize("command, override, fragment", UNREAD, ids=[f"{c} {o}" for c, o, _ in UNREAD])
@pytest.mark.parametrize("plus", ["", "+"])
def test_a_key_or_group_the_command_does_not_read_is_refused(command, override, fragment, plus):
    """With or without Hydra's `+`: one line naming the key, its fix (--help), and no hint toward the plus."""
    message = refusal(check_overrides, command, [f"{plus}{override}"])
    assert fragment in message and f"`diffcli {command} --help`" in message, message
    assert "+" not in message


def test_no_did_you_mean_without_a_close_key():
    message = refusal(check_overrides, "train", ["zzzzzz=1"])
    assert message == "zzzzzz is not a key of diffcli train; `diffcli train --help` lists its groups and keys"


def test_only_the_first_unread_override_is_named():
    assert refusal(check_overrides, "sample", ["steps=3", "model=flow", "data=moons"]).startswith(
        "diffcli sample has no model= group")


def test_hydra_keys_and_flags_pass():
    for command in APPS:
        check_overrides(command, ["hydra.run.dir=x", "hydra/job_logging=stdout", "hydra.job.chdir=true",
                                  "+hydra.foo.bar=1", "-m", "--cfg", "job"])


def _leaves(node, prefix=""):
    """The dotted keys of a composed config, without resolving it."""
    out = []
    for key in node:
        child = node._get_node(key)
        out += _leaves(child, f"{prefix}{key}.") if isinstance(child, DictConfig) else [f"{prefix}{key}"]
    return out


@pytest.mark.parametrize("command, overrides", [("train", ("data=moons", "sampler=ddim")),
                                                ("sample", ("sampler=ddim",)), ("eval", ("sampler=ddim",))])
def test_every_key_and_group_the_command_reads_passes(command, overrides):
    """No key of the composed config, and no group of the command, is refused (with or without `+`)."""
    keys = _leaves(composed(command, *overrides))
    assert len(keys) > 10
    check_overrides(command, [f"{key}=1" for key in keys] + [f"+{key}=1" for key in keys])
    check_overrides(command, [f"{group}=x" for group in command_groups(command)])


def test_keys_below_a_class_node_are_left_to_the_class():
    """net.*, sampler.fn.*, model.path.*, data.params.* are typed by the class they go to (diffcli/build.py)."""
    check_overrides("train", ["net.anything=1", "sampler.fn.whatever=2", "model.path.T=3", "data.params.x=4",
                              "train.betas.0=0.5"])
