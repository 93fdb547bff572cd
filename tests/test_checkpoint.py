"""Checkpoints: safetensors round trips, atomic writes, clear errors for bad files, EMA."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from diffcli import DiffcliError
from diffcli.checkpoint import (find_ema, list_checkpoints, load_ema, load_state, prune, save_atomic, save_ema,
                                save_state, strip_prefixes)
from diffcli.ema import EMA

from conftest import compose_config

# a real training config: a stored config is checked against the schema when it is read
CFG = OmegaConf.create(OmegaConf.to_container(compose_config("train", ["data=moons"]), resolve=True))


def tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))


def test_ema_round_trip(tmp_path):
    net = tiny_net()
    save_ema(tmp_path / "ema_7.safetensors", net.state_dict(), CFG, 7, (2,))
    state, cfg, step, shape = load_ema(tmp_path / "ema_7.safetensors")
    assert step == 7 and shape == (2,) and OmegaConf.to_container(cfg) == OmegaConf.to_container(CFG)
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)


def test_state_round_trip_restores_optimizer_exactly(tmp_path):
    """Two Adam steps after a save/load equal two steps without it, bit for bit."""
    net, x = tiny_net(), torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    step = lambda n, o: (o.zero_grad(), n(x).square().mean().backward(), o.step())  # noqa: E731
    for _ in range(3):
        step(net, opt)
    save_state(tmp_path / "state_3.safetensors", net=net, ema_net=net, optimizer=opt, scaler=None, step=3,
               cfg=CFG, shape=(2,))
    restored = load_state(tmp_path / "state_3.safetensors")
    net2 = tiny_net()
    net2.load_state_dict(restored["net"])
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    opt2.load_state_dict(restored["optimizer"])
    for _ in range(2):
        step(net, opt)
        step(net2, opt2)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    assert restored["step"] == 3 and torch.equal(restored["rng_cpu"], restored["rng_cpu"])


def test_no_pickle_in_files(tmp_path):
    """A safetensors file is an 8-byte length, a JSON header, raw bytes: parse it by hand."""
    net = tiny_net()
    save_ema(tmp_path / "ema_1.safetensors", net.state_dict(), CFG, 1, (2,))
    raw = (tmp_path / "ema_1.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"]["format"] == "diffcli" and json.loads(header["__metadata__"]["config"]) == \
        OmegaConf.to_container(CFG)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ema_1.safetensors"
    save_atomic({"w": torch.ones(3)}, {"format": "diffcli"}, path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(DiffcliError, match=f"cannot write ema_1.safetensors in {tmp_path}"):
        save_atomic({"w": torch.zeros(3)}, {"format": "diffcli"}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file is gone too


def test_strip_prefixes():
    assert strip_prefixes({"module._orig_mod.conv.weight": 1, "_orig_mod.a": 2, "b.module.c": 3}) == \
        {"conv.weight": 1, "a": 2, "b.c": 3}


def test_bad_files_are_one_line_errors(tmp_path):
    net = tiny_net()
    good = tmp_path / "ema_1.safetensors"
    save_ema(good, net.state_dict(), CFG, 1, (2,))
    truncated = tmp_path / "ema_2.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("hello")
    for path, match in [(tmp_path / "missing.safetensors", "does not exist"), (truncated, "truncated"),
                        (foreign, "not a diffcli checkpoint"), (garbage, "truncated or not safetensors")]:
        with pytest.raises(DiffcliError, match=match) as e:
            load_ema(path)
        assert "\n" not in str(e.value)


def test_find_and_prune(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for s in (5, 10, 40, 200):
        save_ema(ckpts / f"ema_{s}.safetensors", tiny_net().state_dict(), CFG, s, (2,))
    assert find_ema(str(tmp_path / "run")).name == "ema_200.safetensors"  # numeric, not lexical order
    assert find_ema(None, outputs=tmp_path).name == "ema_200.safetensors"
    prune(ckpts, keep_last=2)
    assert [p.name for p in list_checkpoints(ckpts, "ema")] == ["ema_40.safetensors", "ema_200.safetensors"]
    with pytest.raises(DiffcliError, match="no training run"):
        find_ema(None, outputs=tmp_path / "empty")
    with pytest.raises(DiffcliError, match="does not exist"):
        find_ema(str(tmp_path / "nope.safetensors"))


def test_ema_matches_closed_form():
    """With constant weights theta after init theta0, shadow = theta + prod(d_k) (theta0 - theta)."""
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, 0.0)
    ema = EMA(net, decay=0.99, warmup=10)
    torch.nn.init.constant_(net.weight, 1.0)
    prod = 1.0
    for k in range(50):
        ema.update(net, k)
        prod *= min(0.99, (1 + k) / (10 + k))
    assert ema.net.weight.item() == pytest.approx(1 - prod, rel=1e-5)


def test_remove_temporaries_takes_both_kinds_of_half_written_checkpoint(tmp_path):
    """save_atomic writes through runs.atomic_file (.<stem>.<random>.partial<suffix>); older versions wrote
    .<name>.tmp<pid>. A killed write of either kind is removed; finished checkpoints stay."""
    from diffcli.checkpoint import remove_temporaries, save_atomic

    save_atomic({"w": torch.zeros(2)}, {"format": "diffcli"}, tmp_path / "ema_4.safetensors")
    killed = [tmp_path / ".ema_6.k3x9.partial.safetensors", tmp_path / ".ema_6.safetensors.tmp12345"]
    for p in killed:
        p.write_bytes(b"half a checkpoint")
    assert sorted(remove_temporaries(tmp_path)) == sorted(killed)
    assert [p.name for p in tmp_path.iterdir()] == ["ema_4.safetensors"]
