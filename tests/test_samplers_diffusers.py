"""Every sampler against the diffusers scheduler it corresponds to, on the same model function
and the same noise (diffusers is the external oracle; it runs here on CPU, no network)."""

import importlib
import inspect
import textwrap
import types

import diffusers
import pytest
import torch

import fastdiff
from fastdiff import noise as noise_spec
from fastdiff.samplers import Col, build_plan

# fastdiff sampler      diffusers scheduler (with its keyword arguments)     spacings diffusers has
MAPPING = {
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "ddpm": ("DDPMScheduler", dict(clip_sample=False)),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="sde-dpmsolver++", solver_order=2),
    ),
    "dpmpp_3m_sde": (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="sde-dpmsolver++", solver_order=3),
    ),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2")),
}
DISCRETE = ["leading", "trailing", "linspace"]
SPACINGS = {
    "ddim": DISCRETE,
    "ddpm": DISCRETE,
    "euler_a": DISCRETE,
    **{k: [*DISCRETE, "karras", "exponential"] for k in ("euler", "heun")},
    **{k: [*DISCRETE, "karras", "exponential"] for k in ("dpmpp_2m", "dpmpp_2m_sde")},
    **{k: [*DISCRETE, "karras", "exponential"] for k in ("dpmpp_3m_sde", "unipc")},
}
PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SD = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)
SHAPE = (2, 3, 5, 7)


def _supported(sampler, prediction):
    return not (sampler == "euler_a" and prediction == "x0")  # diffusers lacks it


class _Float64Torch(types.ModuleType):
    """`torch` with float32 meaning float64, swapped into a diffusers scheduler module so that
    its own arithmetic (and its casts to float32) run in float64."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


def _scheduler(sampler, spacing, prediction, **extra):
    cls, kwargs = MAPPING[sampler]
    kwargs = {**SD, **kwargs, "prediction_type": PREDICTION[prediction], **extra}
    if spacing in ("karras", "exponential"):
        kwargs.update(timestep_spacing="linspace", **{f"use_{spacing}_sigmas": True})
    else:
        kwargs["timestep_spacing"] = spacing
    return getattr(diffusers, cls)(**kwargs)


def diffusers_loop(
    sampler, spacing, prediction, steps, model, noise, *, seed=0, exact=False, plan=None, **extra
):
    """Run diffusers' own loop. Stochastic schedulers get fastdiff's noise for row r (step
    r + 1). exact=True runs the scheduler in float64 with fastdiff's float64 grid in place of its
    float32-rounded one, after checking that the two grids agree."""
    mod = importlib.import_module(_scheduler_module(sampler))
    saved = {n: getattr(mod, n) for n in ("torch", "randn_tensor") if hasattr(mod, n)}
    row = [0]

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        z = noise_spec.randn_like_batch(seed, row[0] + 1, tuple(shape))
        return z.to(dtype or torch.float32)

    mod.randn_tensor = randn_tensor
    if exact:
        mod.torch = _Float64Torch()
    cls = getattr(diffusers, MAPPING[sampler][0])
    saved_update = cls.__dict__.get("multistep_dpm_solver_third_order_update")
    if sampler == "dpmpp_3m_sde":
        cls.multistep_dpm_solver_third_order_update = _fixed_3m_sde_update(cls, mod)
    try:
        s = _scheduler(sampler, spacing, prediction, **extra)
        s.set_timesteps(steps)
        if exact:
            _use_exact_grid(s, plan)
        x = noise * s.init_noise_sigma
        for i, t in enumerate(s.timesteps):
            row[0] = i
            y = model(s.scale_model_input(x, t), t.to(x.dtype).expand(x.shape[0]))
            x = s.step(y, t, x).prev_sample
    finally:
        for n, v in saved.items():
            setattr(mod, n, v)
        if saved_update is not None:
            cls.multistep_dpm_solver_third_order_update = saved_update
    return x


# diffusers 0.42's third-order SDE-DPM-Solver++ update has "- 0.5" in the D2 coefficient where
# its ODE update with h -> 2h (and k-diffusion's DPM++ 3M SDE, phi_3) has "+ 0.5"; with the
# sign as it is, samples diverge as steps grow (test_convergence.py). The oracle is diffusers'
# own function with that one sign corrected.
_DIFFUSERS_3M_SDE = "((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2"


def _fixed_3m_sde_update(cls, mod):
    src = textwrap.dedent(inspect.getsource(cls.multistep_dpm_solver_third_order_update))
    assert src.count(_DIFFUSERS_3M_SDE) == 1, "diffusers' 3M SDE update changed: recheck it"
    namespace = {}
    exec(
        src.replace(_DIFFUSERS_3M_SDE, _DIFFUSERS_3M_SDE.replace("- 0.5", "+ 0.5")),
        vars(mod),
        namespace,
    )
    return namespace["multistep_dpm_solver_third_order_update"]


def _scheduler_module(sampler):
    return type(_scheduler(sampler, "leading", "eps")).__module__


def _use_exact_grid(s, plan):
    table = plan.table
    # sigma-grid timesteps come from float32-rounded sigmas in diffusers: close, then ours
    atol = 2e-4 if s.timesteps.is_floating_point() and s.timesteps.frac().eq(0).all() else 5e-3
    torch.testing.assert_close(s.timesteps.double(), table[:, Col.T], rtol=0, atol=atol)
    if s.timesteps.is_floating_point():
        s.timesteps = table[:, Col.T].clone()
    if hasattr(s, "sigmas") and not hasattr(s, "final_alpha_cumprod"):
        ours = torch.cat([table[:, Col.SIGMA] / table[:, Col.ALPHA], torch.zeros(1).double()])
        torch.testing.assert_close(s.sigmas.double(), ours, rtol=2e-6, atol=0)
        s.sigmas = ours
    ours_abar = fastdiff.Schedule.stable_diffusion().alphas_cumprod
    torch.testing.assert_close(s.alphas_cumprod.double(), ours_abar, rtol=1e-6, atol=0)
    s.alphas_cumprod = ours_abar
    if hasattr(s, "final_alpha_cumprod"):
        s.final_alpha_cumprod = ours_abar[0]


CASES = [
    (sampler, spacing, prediction)
    for sampler in MAPPING
    for spacing in SPACINGS[sampler]
    for prediction in PREDICTION
    if _supported(sampler, prediction)
]


@pytest.mark.parametrize("sampler,spacing,prediction", CASES)
def test_equals_diffusers_exactly_in_float64(sampler, spacing, prediction, toy_model):
    """Same grid, same update formulas: in float64 the two loops agree to rounding, at every
    step count (1 and 2 included, where the order and final-step rules all kick in)."""
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    schedule = fastdiff.Schedule.stable_diffusion()
    for steps in (1, 2, 3, 7, 16):
        if spacing in ("karras", "exponential") and steps == 1:
            continue  # diffusers spans the sigma range of its 1-step grid: a single point
        plan = build_plan(sampler, schedule, steps, spacing=spacing, prediction=prediction)
        ref = diffusers_loop(
            sampler, spacing, prediction, steps, toy_model, noise, exact=True, plan=plan
        )
        out = fastdiff.sample(
            toy_model,
            noise=noise,
            sampler=sampler,
            steps=steps,
            schedule=schedule,
            prediction=prediction,
            spacing=spacing,
        )
        err = (out - ref).abs().max().item()
        assert err < 1e-9, f"{steps} steps: max abs error {err:.3e}"


# diffusers truncates the fractional timesteps of multistep exponential grids, which it
# computes from float32 betas: at some steps its grid is one training step off the float64 one
# (a grid difference, not an update one: the float64 test above covers those samplers).
FLOAT32_CASES = [
    c
    for c in CASES
    if not (c[1] == "exponential" and MAPPING[c[0]][0].endswith("MultistepScheduler"))
]


@pytest.mark.parametrize("sampler,spacing,prediction", FLOAT32_CASES)
def test_equals_diffusers_in_float32(sampler, spacing, prediction, toy_model):
    """diffusers in float32 (unmodified, except the 3M SDE sign above) vs fastdiff in float32:
    max abs error <= 1e-4. The corrected 3M SDE D2 coefficient, (1 - e^-2h - 2h) / (2h)^2 + 0.5,
    is a difference of nearly equal terms for small h, which diffusers evaluates in float32
    (fastdiff in float64): 5e-4 there; the float64 test above holds it to 1e-9."""
    tol = 5e-4 if sampler == "dpmpp_3m_sde" else 1e-4
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    schedule = fastdiff.Schedule.stable_diffusion()
    for steps in (7, 10, 25):
        ref = diffusers_loop(sampler, spacing, prediction, steps, toy_model, noise)
        out = fastdiff.sample(
            toy_model,
            noise=noise,
            sampler=sampler,
            steps=steps,
            schedule=schedule,
            prediction=prediction,
            spacing=spacing,
        )
        err = (out - ref).abs().max().item()
        assert err <= tol, f"{steps} steps: max abs error {err:.3e}"


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", DISCRETE)
def test_ddim_eta_equals_diffusers(eta, spacing, toy_model):
    noise = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    schedule = fastdiff.Schedule.stable_diffusion()
    for steps in (3, 10):
        plan = build_plan("ddim", schedule, steps, spacing=spacing, eta=eta)
        mod = importlib.import_module(_scheduler_module("ddim"))
        saved = mod.torch
        mod.torch = _Float64Torch()
        try:
            s = _scheduler("ddim", spacing, "eps")
            s.set_timesteps(steps)
            _use_exact_grid(s, plan)
            x = noise.clone()
            for i, t in enumerate(s.timesteps):
                z = noise_spec.randn_like_batch(0, i + 1, SHAPE).double()
                x = s.step(
                    toy_model(x, t.double().expand(2)), t, x, eta=eta, variance_noise=z
                ).prev_sample
        finally:
            mod.torch = saved
        out = fastdiff.sample(
            toy_model,
            noise=noise,
            sampler="ddim",
            steps=steps,
            eta=eta,
            schedule=schedule,
            spacing=spacing,
        )
        assert (out - x).abs().max().item() < 1e-9


def test_ddpm_clip_sample_is_the_x0_clamp(toy_model):
    """diffusers' DDPM clip_sample clamps x0 before the posterior mean: fastdiff's clamp."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * 3
    big = lambda x, t, **c: 4 * toy_model(x, t)  # x0 far outside [-1, 1]
    ref = diffusers_loop("ddpm", "trailing", "eps", 10, big, noise, clip_sample=True)
    out = fastdiff.sample(
        big,
        noise=noise,
        sampler="ddpm",
        steps=10,
        spacing="trailing",
        schedule=fastdiff.Schedule.stable_diffusion(),
        clamp=(-1, 1),
    )
    unclamped = fastdiff.sample(
        big,
        noise=noise,
        sampler="ddpm",
        steps=10,
        spacing="trailing",
        schedule=fastdiff.Schedule.stable_diffusion(),
    )
    assert (out - ref).abs().max() <= 1e-4
    assert (unclamped - ref).abs().max() > 1e-2  # the clamp matters here
