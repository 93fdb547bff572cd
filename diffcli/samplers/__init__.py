"""The index of samplers and time grids: every sampler over (denoiser, path, x_init, t_grid) by name.

A time grid is a decreasing float64 tensor from t_0 (near 1, the prior) to 0 (the data), from `grids.py`.
Samplers step between consecutive grid points using only denoiser(x_t, t) -> x0_hat and the path's alpha,
sigma; they return the final x (network evaluations are counted by a wrapper, guidance.CountNFE). Every sampler
takes `trajectory=`: a list that receives the initial x and x after every step.

    core.py    NEEDS and check_sampler (what each sampler requires of the model), the shared pieces
    grids.py   time grids (uniform, karras, logsnr, ddim, levels, ...)
    ode.py     euler, heun (EDM's variables), dpmpp_2m, unipc, midpoint, rk4, dopri5
    sde.py     ancestral, ddim, dpmpp_2m_sde, dpmpp_3m_sde, euler_maruyama, pc, langevin, consistency

Configs and checkpoints name samplers `diffcli.samplers.<name>`: every one stays importable from here.
"""

from .grids import (GRIDS, SPACINGS, ddim_grid, ddim_timesteps, ends_grid, karras_grid, karras_levels, levels_grid,
                    linear_grid, log_snr, logsnr_grid, quadratic_grid, t_from_lambda, uniform_grid)
from .ode import dopri5, dpmpp_2m, euler, heun, midpoint, rk4, unipc
from .core import DETERMINISTIC, NEEDS, REQUIREMENTS, check_sampler, is_deterministic
from .sde import (PREDICTORS, ancestral, consistency, ddim, dpmpp_2m_sde, dpmpp_3m_sde, euler_maruyama, langevin,
                  pc)

SAMPLERS = {"ancestral": ancestral, "ddim": ddim, "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m,
            "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m_sde": dpmpp_3m_sde, "unipc": unipc, "midpoint": midpoint,
            "rk4": rk4, "dopri5": dopri5, "euler_maruyama": euler_maruyama, "pc": pc, "langevin": langevin,
            "consistency": consistency}

__all__ = ["GRIDS", "SPACINGS", "NEEDS", "DETERMINISTIC", "is_deterministic", "REQUIREMENTS", "PREDICTORS", "SAMPLERS",
           "check_sampler", "log_snr", "t_from_lambda", "ddim_timesteps", "ddim_grid", "uniform_grid", "quadratic_grid", "karras_grid",
           "karras_levels", "logsnr_grid", "ends_grid", "levels_grid", *SAMPLERS]
