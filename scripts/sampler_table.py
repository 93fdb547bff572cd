"""Which sampler works with which formulation and prior, generated from diffcli.samplers.NEEDS.

    python scripts/sampler_table.py      # prints the Markdown table docs/guides/sampling.md carries

tests/test_configs.py keeps the copy in docs/guides/sampling.md identical to this output.

Each sampler is checked with the options its YAML sets (dpmpp_2m_sde's eta = 1, heun's s_churn = 0, ...); where
those fail but setting one of them to 0 passes, the cell names that setting (e.g. `eta=0`).
"""

from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffcli import DiffcliError
from diffcli.samplers import NEEDS, check_sampler

FORMULATIONS = {"ddpm": [], "ncsn": [], "vesde": [], "edm": [], "vpsde": [], "subvpsde": [], "flow": [],
                "flow, uniform prior": ["model.prior=uniform"]}


def table() -> str:
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        paths = {}
        for label, extra in FORMULATIONS.items():
            cfg = compose("train", overrides=[f"model={label.split(',')[0]}", "data=eight_gaussians", *extra])
            paths[label] = instantiate(cfg.model.path)
        defaults = {sampler: _default_options(compose("sample", overrides=[f"sampler={sampler}"]))
                    for sampler in NEEDS}
    rows = ["| sampler | " + " | ".join(FORMULATIONS) + " |", "|---" * (len(FORMULATIONS) + 1) + "|"]
    for sampler in NEEDS:
        rows.append(f"| `{sampler}` | " + " | ".join(_mark(sampler, p, defaults[sampler]) for p in paths.values())
                    + " |")
    return "\n".join(rows)


def _default_options(cfg) -> dict:
    """The sampler's options as its YAML sets them."""
    fn = OmegaConf.to_container(cfg.sampler.fn, resolve=True)
    return {k: v for k, v in fn.items() if k not in ("_target_", "_partial_")}


def _valid(sampler, path, options) -> bool:
    try:
        check_sampler(sampler, path, **options)
        return True
    except DiffcliError:
        return False


def _mark(sampler, path, options) -> str:
    if _valid(sampler, path, options):
        return "yes"
    for key, value in options.items():  # valid once a stochasticity option is 0?
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0 \
                and _valid(sampler, path, {**options, key: 0.0}):
            return f"`{key}=0`"
    return "-"


if __name__ == "__main__":
    print(table())
