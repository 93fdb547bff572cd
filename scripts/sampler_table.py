"""Which sampler works with which formulation and prior, generated from diffcli.samplers.NEEDS.

    python scripts/sampler_table.py      # prints the Markdown table the README carries
"""

from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from diffcli import DiffcliError
from diffcli.samplers import NEEDS, check_sampler

FORMULATIONS = {"ddpm": [], "ncsn": [], "vesde": [], "vpsde": [], "subvpsde": [], "flow": [],
                "flow, uniform prior": ["model.prior=uniform"]}


def table() -> str:
    paths = {}
    with initialize_config_module(config_module="diffcli.configs", version_base=None):
        for label, extra in FORMULATIONS.items():
            cfg = compose("train", overrides=[f"model={label.split(',')[0]}", "data=eight_gaussians", *extra])
            paths[label] = instantiate(cfg.model.path)
    rows = ["| sampler | " + " | ".join(FORMULATIONS) + " |", "|---" * (len(FORMULATIONS) + 1) + "|"]
    for sampler in NEEDS:
        rows.append(f"| `{sampler}` | " + " | ".join(_mark(sampler, p) for p in paths.values()) + " |")
    return "\n".join(rows)


def _mark(sampler, path) -> str:
    try:
        check_sampler(sampler, path)
        return "yes"
    except DiffcliError:
        return "-"


if __name__ == "__main__":
    print(table())
