"""Noise schedules and timestep grids, all in float64.

A discrete schedule is its cumulative product of alphas, abar[t] for t = 0 .. T-1. A noisy sample
at training step t is x_t = sqrt(abar) x0 + sqrt(1 - abar) eps (the variance-preserving form); the
same noise level in the variance-exploding form has sigma = sqrt((1 - abar) / abar).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential")


def linear_betas(n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM (Ho et al. 2020): betas linear in t."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)


def scaled_linear_betas(n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Latent diffusion / Stable Diffusion: sqrt(beta) linear in t."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2


def cosine_betas(n: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): abar(t) = cos^2((t/T + s)/(1 + s) pi/2)."""
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = [min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def sigmoid_betas(n: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """GeoDiff (Xu et al. 2022): betas follow a sigmoid over [-6, 6]."""
    x = torch.linspace(-6, 6, n, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
    shift and scale sqrt(abar) so that the last step has exactly zero signal."""
    sqrt_abar = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """EDM (Karras et al. 2022, eq. 5): n sigmas from sigma_max down to sigma_min, uniform in
    sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """n sigmas from sigma_max down to sigma_min, uniform in log sigma."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def spaced_timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: str,
    *,
    offset: int = 1,
    extra_point: bool = False,
    rounded: bool = True,
) -> torch.Tensor:
    """Descending training timesteps for `steps` model evaluations (Lin et al. 2023, table 2).

    leading: multiples of T // steps, plus `offset` (Stable Diffusion uses 1); trailing: counted
    back from T - 1; linspace: evenly from T - 1 to 0. With `extra_point` the leading and linspace
    grids are laid over steps + 1 points and the last (t = 0 side) dropped, as multistep solvers
    do. `rounded=False` keeps the linspace grid fractional (the sigma-space samplers)."""
    T = num_train_timesteps
    n = steps + int(extra_point)
    if spacing == "leading":
        t = np.arange(0, n)[::-1] * (T // n) + offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)) - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, n)[::-1]
        if rounded:
            t = t.round()
    else:
        raise ValueError(
            f"spacing must be one of 'leading', 'trailing', 'linspace'; got {spacing!r}"
        )
    if extra_point and spacing != "trailing":
        t = t[:-1]
    return torch.tensor(t.tolist(), dtype=torch.float64)


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete diffusion schedule: betas[t] for t = 0 .. T-1, float64."""

    betas: torch.Tensor
    name: str = "custom"

    def __post_init__(self) -> None:
        b = self.betas
        if b.ndim != 1 or len(b) < 2:
            raise ValueError(
                f"betas must be a 1-d tensor of length >= 2, got shape {tuple(b.shape)}"
            )
        if not bool(((b > 0) & (b <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        object.__setattr__(self, "betas", b.detach().to("cpu", torch.float64))

    @classmethod
    def from_betas(
        cls,
        kind: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        *,
        zero_terminal_snr: bool = False,
    ) -> Schedule:
        """A named beta schedule: 'linear', 'scaled_linear', 'cosine' or 'sigmoid'."""
        n = num_train_timesteps
        if kind == "linear":
            betas = linear_betas(n, beta_start, beta_end)
        elif kind == "scaled_linear":
            betas = scaled_linear_betas(n, beta_start, beta_end)
        elif kind == "cosine":
            betas = cosine_betas(n)
        elif kind == "sigmoid":
            betas = sigmoid_betas(n, beta_start, beta_end)
        else:
            raise ValueError(f"unknown beta schedule {kind!r}; valid: {list(BETA_SCHEDULES)}")
        name = kind
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
            name += "+zero_snr"
        return cls(betas, name)

    @classmethod
    def stable_diffusion(cls) -> Schedule:
        """The schedule Stable Diffusion 1.x/2.x was trained with."""
        return cls.from_betas("scaled_linear", 1000, 0.00085, 0.012)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        abar = torch.cumprod(1 - self.betas, 0)
        # zero terminal SNR makes abar[-1] = 0; keep it finite as diffusers does (2^-24)
        return torch.where(abar == 0, torch.full_like(abar, 2.0**-24), abar)

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma[t] = sqrt((1 - abar) / abar): the variance-exploding noise level of each step."""
        abar = self.alphas_cumprod
        return ((1 - abar) / abar).sqrt()

    def sigma_at(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (possibly fractional) training timesteps, linear interpolation in t."""
        return _interp(t, torch.arange(self.num_train_timesteps, dtype=torch.float64), self.sigmas)

    def t_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) training timestep of each sigma: linear interpolation in log sigma."""
        log_s = self.sigmas.log()
        ls = sigma.clamp_min(1e-10).log()
        low = (ls[None, :] >= log_s[:, None]).sum(0).sub(1).clamp(0, len(log_s) - 2)
        lo, hi = log_s[low], log_s[low + 1]
        w = ((lo - ls) / (lo - hi)).clamp(0, 1)
        return low + w

    def __repr__(self) -> str:
        return f"Schedule({self.name}, T={self.num_train_timesteps})"


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.interp(x.numpy(), xp.numpy(), fp.numpy()))
