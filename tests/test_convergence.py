"""Convergence order on Gaussian data, where the exact denoiser and the exact probability-flow
ODE solution are known in closed form (per dimension, data ~ N(mu, sd^2)):

    D(x; alpha, sigma) = mu + alpha sd^2 (x - alpha mu) / (alpha^2 sd^2 + sigma^2)
    x_ve(s) = mu + (x_ve(s0) - mu) sqrt(sd^2 + s^2) / sqrt(sd^2 + s0^2)    (x_ve = x / alpha)

Each sampler integrates from sigma_max down a karras grid; the error at the last grid point
before s = 0 (the final jump to s = 0 has an error floor independent of the step count) must
shrink as 2^-p when the step count doubles.
"""

import math

import pytest
import torch

import fastdiff
from fastdiff.samplers import Col, build_plan

MU, SD = 0.3, 0.7
ORDERS = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2, "unipc": 3}


def _exact_denoiser(plan, prediction):
    """The model: exact for the noise level of the row being evaluated (taken from the plan)."""
    calls = [0]

    def model(x, t):
        row = plan.table[calls[0]]
        calls[0] += 1
        a, s = row[Col.ALPHA].item(), row[Col.SIGMA].item()
        x0 = MU + a * SD**2 * (x - a * MU) / (a * a * SD**2 + s * s)
        eps = (x - a * x0) / s
        return {"x0": x0, "eps": eps, "v": a * eps - s * x0}[prediction]

    return model


def _error(sampler, steps, prediction):
    schedule = fastdiff.Schedule.stable_diffusion()
    plan = build_plan(sampler, schedule, steps, spacing="karras", prediction=prediction)
    noise = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    states = []
    fastdiff.sample(
        _exact_denoiser(plan, prediction),
        noise=noise,
        sampler=sampler,
        steps=steps,
        schedule=schedule,
        prediction=prediction,
        spacing="karras",
        callback=lambda i, x, x0: states.append(x),
    )
    last = plan.rows - 1  # the state before the last row sits at that row's noise level
    a, s = plan.table[last, Col.ALPHA].item(), plan.table[last, Col.SIGMA].item()
    a0, s0 = plan.table[0, Col.ALPHA].item(), plan.table[0, Col.SIGMA].item()
    start = noise * plan.init_scale / a0
    exact = MU + (start - MU) * math.sqrt(SD**2 + (s / a) ** 2) / math.sqrt(SD**2 + (s0 / a0) ** 2)
    return (states[last - 1] / a - exact).abs().max().item()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", sorted(ORDERS))
def test_convergence_order(sampler, prediction):
    errors = [_error(sampler, n, prediction) for n in (16, 32, 64)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    p = ORDERS[sampler]
    assert all(p - 0.25 < o < p + 0.5 for o in orders), f"errors {errors}, observed orders {orders}"


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_stochastic_samplers_reach_the_data_distribution(sampler):
    """With the exact denoiser and many steps, a stochastic sampler's samples have the data's
    mean and standard deviation. Standard errors on 16000 draws: ~0.005; the tolerance is 0.02.
    (diffusers' 3M SDE coefficient, "- 0.5", gives std 0.65 for data std 0.5 at 200 steps, 1.03
    at 1000.)"""
    schedule = fastdiff.Schedule.stable_diffusion()
    steps = 400
    plan = build_plan(sampler, schedule, steps, prediction="x0")
    x = fastdiff.sample(
        _exact_denoiser(plan, "x0"),
        (1000, 16),
        sampler=sampler,
        steps=steps,
        schedule=schedule,
        prediction="x0",
        seed=0,
        dtype=torch.float64,
    )
    assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - SD) < 0.02, (
        f"mean {x.mean().item():.4f} (data {MU}), std {x.std().item():.4f} (data {SD})"
    )
