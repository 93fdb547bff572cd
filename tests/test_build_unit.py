"""diffcli.build in-process: the allowlist of classes a config may name, and the checking of their arguments.

tests/test_hardening.py plants hostile configs in real checkpoints and runs the CLI on them; these check the
functions behind that promise directly: a name from a config is compared as text, never imported or called.
"""

import importlib
import importlib.abc
import sys

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import ROOT
from diffcli import DiffcliError, build

BOGUS = "diffcli_test_bogus_module"  # a module that must never be looked up


def load(group: str, name: str) -> DictConfig:
    return OmegaConf.load(ROOT / "configs" / group / f"{name}.yaml")


def root(model: str = "ddpm", sampler: str | None = None, net: str = "mlp") -> DictConfig:
    """The shipped group files under one root, so their interpolations (${eta}, ${data.sigma_max}) resolve."""
    return OmegaConf.create({"data": {"sigma_max": 6.6}, "eta": 0.0, "steps": None, "net": load("net", net),
                             "model": load("model", model), "sampler": load("sampler", sampler) if sampler else None})


def refusal(call, *args, **kwargs) -> str:
    """The message of the DiffcliError that call(...) raises, checked to be one line."""
    with pytest.raises(DiffcliError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


class ImportRecorder(importlib.abc.MetaPathFinder):
    """Records each module Python looks for that is not loaded yet, but OmegaConf's lazily loaded parser (antlr4)."""

    def __init__(self):
        self.names = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in ("antlr4", "omegaconf", "hydra", "yaml"):
            self.names.append(name)
        return None


@pytest.fixture
def no_imports(monkeypatch):
    """Any import of a new module, importlib.import_module or Hydra's class lookup during the test is recorded."""
    recorder = ImportRecorder()
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    calls = []
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: calls.append(name))
    import hydra.utils

    monkeypatch.setattr(hydra.utils, "get_class", lambda name: calls.append(name))
    yield recorder.names, calls
    assert BOGUS not in sys.modules


# ------------------------------------------------------------------------------------------------ check_names

# (what, the config edit, the refusal's fragment): each names code that is not one of diffcli's own classes
HOSTILE = [
    ("os.system as the net", {"net": {"_target_": "os.system", "command": "touch PWNED"}},
     "net._target_=os.system is not a diffcli network and name it on the command line (net_class=os.system)"),
    ("a bogus module as the net", {"net": {"_target_": f"{BOGUS}.Net"}},
     f"net._target_={BOGUS}.Net is not a diffcli network"),
    ("a diffcli function as the net", {"net": {"_target_": "diffcli.paths.expand"}},
     "net._target_=diffcli.paths.expand is not a diffcli network"),
    ("a nested os.system in a net argument", {"net": {"_target_": "diffcli.nets.MLP",
                                                     "time_scale": {"_target_": "os.system", "command": "x"}}},
     "net.time_scale names a class (_target_: os.system)"),
    ("Hydra's _args_ on the net", {"net": {"_target_": "diffcli.nets.MLP", "_args_": [f"{BOGUS}.x"]}},
     "net._args_ is not supported"),
    ("builtins.eval as the path", {"model": {"path": {"_target_": "builtins.eval", "source": "1"}}},
     "model.path._target_=builtins.eval is not a diffcli path; choose one of diffcli.paths.DDPMPath"),
    ("a diffcli function as the path", {"model": {"path": {"_target_": "diffcli.paths.expand"}}},
     "model.path._target_=diffcli.paths.expand is not a diffcli path"),
    ("a bogus module as the path", {"model": {"path": {"_target_": f"{BOGUS}.Path"}}},
     f"model.path._target_={BOGUS}.Path is not a diffcli path"),
    ("a nested class in a path argument", {"model": {"path": {"_target_": "diffcli.paths.DDPMPath",
                                                             "T": {"_target_": f"{BOGUS}.T"}}}},
     f"model.path.T names a class (_target_: {BOGUS}.T)"),
    ("the oracle with a bogus path", {"net": {"_target_": "diffcli.oracle.Oracle", "path": {"_target_": f"{BOGUS}.P"}}},
     f"net.path._target_={BOGUS}.P is not a diffcli path"),
    ("os.system as the sampler", {"sampler": {"fn": {"_target_": "os.system", "_partial_": True, "command": "x"}}},
     "sampler.fn._target_=os.system is not a diffcli sampler; choose one of ancestral, consistency, ddim"),
    ("a diffcli module's non-sampler as the sampler", {"sampler": {"fn": {"_target_": "diffcli.samplers.sde.ddim"}}},
     "sampler.fn._target_=diffcli.samplers.sde.ddim is not a diffcli sampler"),
    ("a bogus sampler", {"sampler": {"fn": {"_target_": f"{BOGUS}.fn"}}},
     f"sampler.fn._target_={BOGUS}.fn is not a diffcli sampler"),
]


def hostile(edit: dict) -> DictConfig:
    cfg = root(sampler="ddim")
    for key, node in edit.items():  # replace (not merge) the node the edit names
        if key == "model":
            cfg.model.path = node["path"]
        elif key == "sampler":
            cfg.sampler.fn = node["fn"]
        else:
            cfg[key] = node
    return cfg


@pytest.mark.parametrize("what, edit, fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_check_names_refuses_what_is_not_diffcli_s_own_without_importing_it(what, edit, fragment, no_imports):
    """The refusal names the key and the fix; nothing the config names is looked up, imported or called."""
    assert fragment in refusal(build.check_names, hostile(edit))
    imported, calls = no_imports
    assert imported == [] and calls == []


def test_the_shipped_configs_pass_check_names_on_text_alone(no_imports):
    """diffcli's own classes, every shipped model and sampler: accepted without importing anything."""
    for model in ("ddpm", "flow", "edm", "ncsn", "vesde", "vpsde", "subvpsde"):
        build.check_names(root(model, "ddim"))
    for sampler in build.SAMPLER_NAMES:
        build.check_names(root("ddpm", sampler))
    for net in ("mlp", "unet_small", "unet_ddpm_cifar", "mlp_classifier", "unet_classifier"):
        build.check_names(root(net=net))
    assert no_imports == ([], [])


def test_a_user_class_is_accepted_only_when_named_by_the_caller(no_imports):
    """The net class of the user's own passes when the command line names it; still not imported by the check."""
    cfg = hostile({"net": {"_target_": f"{BOGUS}.Net", "hidden": 8}})
    build.check_names(cfg, user_class=f"{BOGUS}.Net")
    message = refusal(build.check_names, cfg, user_class=f"{BOGUS}.Other")
    assert f"net._target_={BOGUS}.Net is not a diffcli network and the command line names {BOGUS}.Other" in message
    assert no_imports == ([], [])


def test_the_user_class_opens_the_net_only():
    """Naming a class on the command line does not let a path or a sampler be that class."""
    cfg = hostile({"model": {"path": {"_target_": "os.getcwd"}}})
    assert "model.path._target_=os.getcwd is not a diffcli path" in refusal(build.check_names, cfg,
                                                                          user_class="os.getcwd")
    cfg = hostile({"sampler": {"fn": {"_target_": "os.getcwd"}}})
    assert "sampler.fn._target_=os.getcwd" in refusal(build.check_names, cfg, user_class="os.getcwd")


@pytest.mark.parametrize("what, edit, fragment", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_the_builders_refuse_the_same_names_before_importing(what, edit, fragment, no_imports):
    """build_net / build_path / build_sampler_fn check the name first: the hostile node is never looked up."""
    cfg = hostile(edit)
    key = next(iter(edit))
    if key == "net":
        message = refusal(build.build_net, cfg.net, (2,))
    elif key == "model":
        message = refusal(build.build_path, cfg.model.path)
    else:
        message = refusal(build.build_sampler_fn, cfg.sampler.fn, False)
    assert fragment.split(" and name it")[0] in message
    assert no_imports == ([], [])


# ------------------------------------------------------------------------------------------------ plain


@pytest.mark.parametrize("value, fragment", [
    ({"a": {"_target_": "os.system"}}, "net.a names a class (_target_: os.system); only diffcli's own networks"),
    ({"a": [1, {"b": {"_target_": "x.y"}}]}, "net.a[1].b names a class"),
    ({"a": "${oc.env:HOME}"},
     "net.a='${oc.env:HOME}' is an interpolation; stored configs are data and are not resolved"),
    ({"a": ["ok", "x${b}"]}, "net.a[1]='x${b}' is an interpolation"),
    ({"a": float("nan")}, "net.a is NaN; give a number"),
    ({"a": [1.0, float("nan")]}, "net.a[1] is NaN"),
    ({"a": b"bytes"}, "net.a is a bytes; configs hold numbers, text, lists and mappings"),
    ({"a": {1, 2}}, "net.a is a set"),
    ({"a": object()}, "net.a is a object"),
], ids=["target", "deep target", "interpolation", "interpolation in a list", "nan", "nan in a list", "bytes", "set",
        "object"])
def test_plain_refuses_what_is_not_plain_data(value, fragment):
    assert fragment in refusal(build.plain, value, "net")


def test_plain_keeps_plain_data_and_allows_targets_when_asked():
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": float("inf")}, "t": {"_target_": "diffcli.nets.MLP"}}
    assert build.plain(value, "net", targets=True) == value
    assert build.plain(OmegaConf.create({"a": [1, {"b": 2}]}), "net") == {"a": [1, {"b": 2}]}


# ------------------------------------------------------------------------------------------------ builders


@pytest.mark.parametrize("net, shape, n_classes", [("mlp", (2,), 0), ("mlp", (2,), 3), ("unet_small", (1, 8, 8), 0),
                                                    ("mlp_classifier", (2,), 3), ("unet_classifier", (1, 8, 8), 4)])
def test_build_net_accepts_the_shipped_configs(net, shape, n_classes):
    import torch

    model = build.build_net(load("net", net), shape, n_classes=n_classes)
    assert type(model).__name__ == load("net", net)._target_.rsplit(".", 1)[1]
    if net == "mlp":  # the config's arguments reached the class
        assert model.fc_in.out_features == 128 and len(model.blocks) == 3 and model.n_classes == n_classes
        assert model(torch.zeros(4, 2), torch.rand(4), torch.zeros(4, dtype=torch.long) if n_classes else None
                     ).shape == (4, 2)


MLP = "diffcli.nets.MLP"
BAD_NET = [({"hidden": 1.5}, "net.hidden=1.5 must be an integer"),
           ({"hidden": True}, "net.hidden=True must be an integer"),
           ({"hidden": "128"}, "net.hidden='128' must be an integer"),
           ({"time_scale": "x"}, "net.time_scale='x' must be a number"),
           ({"time_scale": False}, "net.time_scale=False must be a number"),
           ({"hiden": 3}, "net.hiden is not an argument of MLP; its arguments: hidden, depth, emb_dim, time_embedding, "
                          "time_scale, fourier_scale, n_classes"),
           ({"shape": [3]}, "net.shape is not an argument of MLP"),  # given at run time, never by a config
           ({"_recursive_": False}, "net._recursive_ is not supported; configs name a class and plain arguments only"),
           ({"_convert_": "all"}, "net._convert_ is not supported")]


@pytest.mark.parametrize("args, fragment", BAD_NET, ids=["float for int", "bool for int", "text for int",
                                                         "text for float", "bool for float", "unknown", "runtime shape",
                                                         "_recursive_", "_convert_"])
def test_build_net_refuses_unknown_arguments_and_wrong_types_in_one_line(args, fragment):
    assert fragment in refusal(build.build_net, {"_target_": MLP, **args}, (2,))


def test_build_net_checks_list_items_and_required_arguments():
    assert refusal(build.build_net, {"_target_": "diffcli.nets.UNet", "ch_mult": [1, 2.5]}, (1, 8, 8)) == \
        "net.ch_mult=[1, 2.5] must be a list of integers"
    assert refusal(build.build_net, {"_target_": "diffcli.nets.MLPClassifier"}, (2,)) == \
        "net: missing a required argument: 'n_classes'"
    assert refusal(build.build_net, {"hidden": 3}, (2,)) == \
        "net._target_ is missing; choose one of the shipped configs"


def test_build_net_takes_an_integer_where_a_number_belongs():
    """An int is a fine float (time_scale: 10); a float is never truncated to an int."""
    assert build.build_net({"_target_": MLP, "time_scale": 10, "hidden": 8}, (2,)).fc_in.out_features == 8


def test_build_net_builds_the_user_class_named_by_the_caller(tmp_path, monkeypatch):
    (tmp_path / "diffcli_test_mynet.py").write_text("from diffcli.nets import MLP\n\nclass Net(MLP):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    node = {"_target_": "diffcli_test_mynet.Net", "hidden": 8}
    try:
        assert "net_class=diffcli_test_mynet.Net" in refusal(build.build_net, node, (2,))
        assert "diffcli_test_mynet" not in sys.modules
        net = build.build_net(node, (2,), user_class="diffcli_test_mynet.Net")
        assert type(net).__name__ == "Net" and net.fc_in.out_features == 8
        assert "net.hidden=1.5 must be an integer" in refusal(build.build_net, {**node, "hidden": 1.5}, (2,),
                                                              user_class="diffcli_test_mynet.Net")
    finally:
        sys.modules.pop("diffcli_test_mynet", None)


def test_locate_is_one_line_for_a_class_that_cannot_be_imported():
    message = refusal(build._locate, f"{BOGUS}.Net", "net")
    assert message.startswith(f"net._target_={BOGUS}.Net cannot be imported (")
    assert BOGUS in message
    assert refusal(build._locate, "os.path.join", "net").startswith("net._target_=os.path.join cannot be imported (")


@pytest.mark.parametrize("model", ["ddpm", "edm", "flow", "ncsn", "subvpsde", "vesde", "vpsde"])
def test_build_path_accepts_the_shipped_models(model):
    cfg = root(model)
    path = build.build_path(cfg.model.path)
    assert f"diffcli.paths.{type(path).__name__}" == cfg.model.path._target_


@pytest.mark.parametrize("node, fragment", [
    ({"T": 10.5}, "model.path.T=10.5 must be an integer"),
    ({"T": "1000"}, "model.path.T='1000' must be an integer"),
    ({"beta_start": "tiny"}, "model.path.beta_start='tiny' must be a number"),
    ({"TT": 10}, "model.path.TT is not an argument of DDPMPath; its arguments: T, schedule, beta_start, beta_end, "
                 "zero_terminal_snr"),
    ({"zero_terminal_snr": "yes"}, "model.path.zero_terminal_snr='yes' must be true or false"),
], ids=["float T", "text T", "text beta", "unknown", "text bool"])
def test_build_path_refuses_unknown_arguments_and_wrong_types(node, fragment):
    assert refusal(build.build_path, {"_target_": "diffcli.paths.DDPMPath", **node}).startswith(fragment)


def test_path_arguments_fill_the_defaults():
    """Two spellings of the same path compare equal; a changed argument does not."""
    shipped = build.path_arguments(root("ddpm").model.path)
    assert shipped == build.path_arguments({"_target_": "diffcli.paths.DDPMPath"})
    assert shipped == build.path_arguments({"_target_": "diffcli.paths.DDPMPath", "T": 1000})
    assert shipped == ("diffcli.paths.DDPMPath", {"T": 1000, "schedule": "linear", "beta_start": 1e-4,
                                                  "beta_end": 0.02, "zero_terminal_snr": False, "betas": None})
    assert shipped != build.path_arguments({"_target_": "diffcli.paths.DDPMPath", "zero_terminal_snr": True})
    assert build.path_arguments(root("flow").model.path) == ("diffcli.paths.FlowPath",
                                                             {"prior": "gaussian", "eps": 1e-5})
    assert "model.path._target_=os.getcwd is not a diffcli path" in refusal(build.path_arguments,
                                                                            {"_target_": "os.getcwd"})


@pytest.mark.parametrize("sampler", build.SAMPLER_NAMES)
def test_every_shipped_sampler_and_its_grid_build(sampler):
    for model in ("ddpm", "flow"):
        cfg = root(model, sampler)
        fn = build.build_sampler_fn(cfg.sampler.fn, is_image=False)
        assert f"diffcli.samplers.{fn.func.__name__}" == cfg.sampler.fn._target_
        grid = build.build_grid(cfg.sampler.grid, build.build_path(cfg.model.path), 10)
        assert 0 <= grid[-1] < grid[0] <= 1 and bool((grid.diff() < 0).all())


def test_clip_x0_auto_is_static_for_images_only():
    fn = root(sampler="ddim").sampler.fn
    assert build.build_sampler_fn(fn, is_image=True).keywords["clip_x0"] == "static"
    assert build.build_sampler_fn(fn, is_image=False).keywords["clip_x0"] == "none"
    assert build.build_sampler_fn(fn, is_image=False).keywords["eta"] == 0.0  # ${eta} resolved from the root


@pytest.mark.parametrize("node, fragment", [
    ({"etaa": 1.0}, "sampler.fn.etaa is not an argument of ddim; its arguments: eta, clip_x0, clip_sample_range, "
                    "dynamic_thresholding_ratio, sample_max_value"),
    ({"eta": "x"}, "sampler.fn.eta='x' must be a number"),
    ({"x": 1}, "sampler.fn.x is not an argument of ddim"),  # what generate() passes at run time
    ({"generator": 1}, "sampler.fn.generator is not an argument of ddim"),
    ({"clip_x0": "sometimes"}, "sampler.fn.clip_x0=sometimes is unknown; choose auto, none, static or dynamic"),
    ({"_args_": [1]}, "sampler.fn._args_ is not supported"),
], ids=["unknown", "text eta", "runtime x", "runtime generator", "clip", "args"])
def test_build_sampler_fn_refuses_unknown_arguments_and_wrong_types(node, fragment):
    assert refusal(build.build_sampler_fn, {"_target_": "diffcli.samplers.ddim", **node}, False).startswith(fragment)


@pytest.mark.parametrize("node, fragment", [
    ({"name": "nope"}, "sampler.grid.name=nope is not a time grid; choose one of ddim, uniform"),
    ({"spacing": "leading"}, "sampler.grid.name=None is not a time grid"),
    ({"name": "ddim", "spacng": "leading"}, "sampler.grid.spacng is not an argument of ddim_grid; its arguments: "
                                             "spacing, t_min, steps_offset, set_alpha_to_one"),
    ({"name": "ddim", "steps_offset": 1.5}, "sampler.grid.steps_offset=1.5 must be an integer"),
    ({"name": "uniform", "t_min": "${x}"}, "sampler.grid.t_min='${x}' is an interpolation"),
    ({"name": "uniform", "t_min": {"_target_": "os.getcwd"}}, "sampler.grid.t_min names a class"),
    ({"name": "uniform", "steps": 3}, "sampler.grid.steps is not an argument of uniform_grid"),
], ids=["unknown grid", "no name", "unknown argument", "float for int", "interpolation", "target", "runtime steps"])
def test_build_grid_refuses_unknown_arguments_and_wrong_types(node, fragment):
    path = build.build_path(root().model.path)
    assert refusal(build.build_grid, node, path, 10).startswith(fragment)


def test_a_bad_ddim_spacing_names_its_key_and_every_choice():
    path = build.build_path(root().model.path)
    message = refusal(build.build_grid, {"name": "ddim", "spacing": "sideways"}, path, 10)
    assert message.startswith("sampler.grid.spacing=sideways") and "auto" in message, message
