"""Schedules against diffusers' definitions (its schedulers build betas from the same names)."""

import diffusers
import numpy as np
import pytest
import torch

from fastdiff.schedules import (
    Schedule,
    karras_sigmas,
    rescale_zero_terminal_snr,
    spaced_timesteps,
)

KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("kind", [*KINDS, "sigmoid"])
def test_betas_match_diffusers(kind):
    ours = Schedule.from_betas(kind, 1000, 0.00085, 0.012).betas
    if kind == "sigmoid":  # diffusers' DDPMScheduler builds it as GeoDiff does
        x = torch.linspace(-6, 6, 1000, dtype=torch.float64)
        ref = torch.sigmoid(x) * (0.012 - 0.00085) + 0.00085
    else:
        s = diffusers.DDPMScheduler(beta_schedule=KINDS[kind], beta_start=0.00085, beta_end=0.012)
        ref = s.betas.double()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)


def test_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_fn

    betas = Schedule.from_betas("scaled_linear", 1000, 0.00085, 0.012).betas
    torch.testing.assert_close(rescale_zero_terminal_snr(betas), ref_fn(betas), rtol=1e-9, atol=0)
    s = Schedule.from_betas("scaled_linear", 1000, 0.00085, 0.012, zero_terminal_snr=True)
    assert s.alphas_cumprod[-1] == 2.0**-24  # finite, as diffusers keeps it
    assert abs(s.alphas_cumprod[0] - Schedule.stable_diffusion().alphas_cumprod[0]) < 1e-12


def test_cosine_follows_its_closed_form():
    abar = Schedule.from_betas("cosine", 1000).alphas_cumprod
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(1, 1001)
    np.testing.assert_allclose(abar.numpy()[:900], (f(t) / f(0))[:900], rtol=1e-9)


def test_spacings():
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "leading"), [751, 501, 251, 1])
    np.testing.assert_array_equal(spaced_timesteps(1000, 3, "trailing"), [999, 666, 332])
    np.testing.assert_array_equal(spaced_timesteps(1000, 4, "linspace"), [999, 666, 333, 0])
    # multistep grids lay steps + 1 points and drop t = 0
    np.testing.assert_array_equal(
        spaced_timesteps(1000, 4, "linspace", extra_point=True), [999, 749, 500, 250]
    )
    with pytest.raises(ValueError, match="spacing must be one of"):
        spaced_timesteps(1000, 4, "cosine")


def test_karras_endpoints_and_rho():
    s = karras_sigmas(0.03, 14.6, 10, rho=7.0)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03)
    assert (s.diff() < 0).all()
    # uniform in sigma^(1/rho)
    inv = s ** (1 / 7)
    torch.testing.assert_close(inv.diff(), inv.diff()[:1].expand(9))


def test_sigma_and_timestep_maps_are_inverse():
    s = Schedule.stable_diffusion()
    t = torch.tensor([0.0, 10.0, 500.0, 998.0, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_at(t), s.sigmas[t.long()])
    sig = torch.tensor([0.05, 0.5, 3.0, 14.0], dtype=torch.float64)
    back = s.sigma_at(s.t_at(sig))
    # t_at interpolates log sigma, sigma_at sigma itself: inverse up to that curvature
    torch.testing.assert_close(back.log(), sig.log(), rtol=0, atol=2e-3)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        Schedule.from_betas("quadratic")
    with pytest.raises(ValueError, match="betas must lie in"):
        Schedule(torch.tensor([0.1, 1.5]))
