"""fastdiff.sample: seeds, batch invariance, guidance, and the errors a user can hit."""

import importlib
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff.ops import noise as noise_ops
from fastdiff.ops.step import step_op

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

SD = fastdiff.Schedule.stable_diffusion()


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"])
def test_same_seed_same_sample_whatever_the_batch(sampler, toy_model):
    kw = dict(sampler=sampler, steps=6, schedule=SD, seed=123)
    batch = fastdiff.sample(toy_model, (4, 2, 3, 5), **kw)
    again = fastdiff.sample(toy_model, (4, 2, 3, 5), **kw)
    assert torch.equal(batch, again)  # bit for bit, run to run
    alone = fastdiff.sample(toy_model, (1, 2, 3, 5), sample_offset=2, **kw)
    assert torch.equal(batch[2:3], alone)
    other_seed = fastdiff.sample(toy_model, (4, 2, 3, 5), **{**kw, "seed": 124})
    assert (other_seed - batch).abs().max() > 0.1


def test_guidance_is_one_batched_call(toy_model):
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return toy_model(x, t) + context.view(-1, 1, 1, 1)

    c, u = torch.full((3,), 0.5), torch.zeros(1)
    out = fastdiff.sample(
        model, (3, 1, 4, 4), sampler="ddim", steps=5, schedule=SD,
        cond={"context": c}, uncond={"context": u}, guidance_scale=7.5,
    )  # fmt: skip
    assert calls == [6] * 5
    # y_u + w (y_c - y_u) = toy + w * 0.5
    guided = lambda x, t: toy_model(x, t) + 7.5 * 0.5
    ref = fastdiff.sample(guided, (3, 1, 4, 4), sampler="ddim", steps=5, schedule=SD)
    torch.testing.assert_close(out, ref)


class OpLog(TorchDispatchMode):
    """The names of the aten/fastdiff ops run under it, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


COPIES = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_state_takes_a_channels_last_models_layout(guided):
    """A channels_last UNet returns channels_last outputs for NCHW inputs: after row 0 the state
    and the histories are converted to its layout once, so every later model call gets a
    channels_last x and no step copies the model's output into another layout (no copy op
    from row 1 on). The samples are those drawn from channels_last noise to begin with."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(memory_format=torch.channels_last)
    seen = []

    def model(x, t, c=None):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        out = 0.1 * conv(x) * torch.cos(t / 1000)[:, None, None, None]
        return out if c is None else out + 0.01 * c

    kw = dict(sampler="dpmpp_2m_sde", steps=4, seed=1, backend="cpu")
    if guided:
        kw.update(
            guidance_scale=3.0,
            cond={"c": torch.ones(1, 4, 8, 8)},
            uncond={"c": -torch.ones(1, 4, 8, 8)},
        )
    ends = []  # the op count at the end of each row
    with OpLog() as log:
        out = fastdiff.sample(
            model, (2, 4, 8, 8), callback=lambda *a: ends.append(len(log.ops)), **kw
        )
    assert seen == [False, True, True, True]
    assert out.is_contiguous(memory_format=torch.channels_last)
    later = log.ops[ends[0] :]
    assert later.count("fastdiff.step.default") == 3
    assert not [op for op in later if op.startswith(COPIES)], later
    x_T = torch.empty(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    noise_ops.gaussian_(x_T, 1, 0, scale=1.0, backend="cpu")  # the seed's x_T, in the kernel
    assert torch.equal(out, fastdiff.sample(model, noise=x_T, **kw))


def test_state_takes_an_nchw_models_layout(toy_model):
    """The other way round: channels_last noise and a model whose output is NCHW."""
    seen = []

    def model(x, t):
        seen.append(x.is_contiguous())
        return toy_model(x.contiguous(), t)

    x_T = fastdiff.noise.randn_like_batch(2, 0, (2, 3, 4, 5))
    kw = dict(sampler="dpmpp_2m", steps=3, backend="cpu")
    out = fastdiff.sample(model, noise=x_T.contiguous(memory_format=torch.channels_last), **kw)
    assert seen == [False, True, True] and out.is_contiguous()
    assert torch.equal(out, fastdiff.sample(toy_model, noise=x_T, **kw))


def test_diffusers_style_outputs_are_accepted(toy_model):
    class Out:
        def __init__(self, sample):
            self.sample = sample

    ref = fastdiff.sample(toy_model, (1, 1, 3, 3), steps=3, schedule=SD)
    out = fastdiff.sample(lambda x, t: Out(toy_model(x, t)), (1, 1, 3, 3), steps=3, schedule=SD)
    tup = fastdiff.sample(lambda x, t: (toy_model(x, t),), (1, 1, 3, 3), steps=3, schedule=SD)
    assert torch.equal(out, ref) and torch.equal(tup, ref)


def test_float64_and_float16_states(toy_model):
    x64 = fastdiff.sample(toy_model, (2, 1, 4, 4), steps=4, schedule=SD, dtype=torch.float64)
    x16 = fastdiff.sample(toy_model, (2, 1, 4, 4), steps=4, schedule=SD, dtype=torch.float16)
    assert x64.dtype == torch.float64 and x16.dtype == torch.float16
    assert (x16.double() - x64).abs().max() < 2e-2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sampler="plms"), ValueError, "unknown sampler 'plms'; valid samplers"),
        (dict(steps=0), ValueError, "steps must be between 1 and num_train_timesteps=1000"),
        (dict(steps=1001), ValueError, "steps must be between 1"),
        (dict(steps=2.5), TypeError, "steps must be an int"),
        (dict(spacing="uniform"), ValueError, "unknown spacing 'uniform'; valid spacings"),
        (dict(prediction="score"), ValueError, "unknown prediction 'score'; valid"),
        (dict(eta=0.5, sampler="euler"), ValueError, "eta applies to the 'ddim' and 'euler_a'"),
        (dict(guidance_scale=3.0), ValueError, "guidance_scale needs both cond and uncond"),
        (dict(uncond={"c": torch.zeros(1)}), ValueError, "uncond is only used with guidance"),
        (dict(noise=torch.zeros(2, 1, 3, 3)), ValueError, "noise has shape"),
        (dict(seed=-1), ValueError, "seed must be in"),
        (dict(schedule="linear"), TypeError, "schedule must be a fastdiff.Schedule"),
        (dict(backend="cuda"), ValueError, "unknown backend 'cuda'|backend 'cuda' cannot run"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match, toy_model):
    kwargs = {"schedule": SD, **kwargs}
    with pytest.raises((error, RuntimeError), match=match):
        fastdiff.sample(toy_model, (1, 1, 3, 3), **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(shape=(4,)), ValueError, r"shape must be \(B, ...\) with no zero dimension"),
        (dict(shape=(1, 0, 3)), ValueError, r"no zero dimension, got \(1, 0, 3\)"),
        (dict(noise=torch.zeros(3)), ValueError, r"noise must be batched \(B, ...\)"),
        (dict(dtype=torch.int32), TypeError, "dtype must be a floating point dtype"),
        (
            dict(guidance_scale=2.0, cond={"c": torch.zeros(2)}, uncond={"d": torch.zeros(2)}),
            ValueError,
            r"cond and uncond must have the same keys, got \['c'\] and \['d'\]",
        ),
        (
            dict(cond={"c": torch.zeros(3, 4)}),
            ValueError,
            r"cond\['c'\] has shape \(3, 4\); its first dimension must be the batch size 2 or 1",
        ),
    ],
)
def test_bad_shapes_and_conditioning_are_named(kwargs, error, match):
    kwargs = {"shape": (2, 1, 3, 3), **kwargs} if "noise" not in kwargs else kwargs
    with pytest.raises(error, match=match):
        fastdiff.sample(lambda x, t, **cond: x, steps=2, schedule=SD, **kwargs)


def test_model_returning_no_tensor_is_reported():
    with pytest.raises(TypeError, match="model returned str at step 0; expected a tensor"):
        fastdiff.sample(lambda x, t: "image", (1, 1, 3, 3), steps=2, schedule=SD)


def test_missing_shape_and_noise(toy_model):
    with pytest.raises(ValueError, match="give either shape"):
        fastdiff.sample(toy_model)


def test_wrong_output_shape_is_reported(toy_model):
    learned_var = lambda x, t: torch.cat([x, x], 1)
    with pytest.raises(ValueError, match=r"model output has shape \(1, 2, 3, 3\)"):
        fastdiff.sample(learned_var, (1, 1, 3, 3), steps=2, schedule=SD)


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy, interpreted Triton
@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_non_finite_values_name_the_step(backend):
    """The step op flags the row whose result is not finite; the loop reports the first one
    after the last step: a NaN from the model (in one element), or an fp16 state that overflows
    while the model's outputs stay finite."""
    reason = step_op.get(backend).ready()
    if reason:
        pytest.skip(f"{backend}: {reason}")
    calls = [0]

    def model(x, t):
        calls[0] += 1
        y = x * 0.5
        if calls[0] == 3:
            y[0, 0, 1, 2] = float("nan")
        return y

    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    kw = dict(steps=5, schedule=SD, backend=backend, device=device)
    with pytest.raises(FloatingPointError, match="first appeared at step 2 of 5"):
        fastdiff.sample(model, (2, 1, 3, 3), sampler="euler", **kw)
    # DDIM on an x0 model that predicts x0 = 100 x: the state grows ~100x per step (fp16 ends at
    # 65504); a float32 run of the same model stays finite
    growing = lambda x, t: 100 * x
    kw.update(sampler="ddim", prediction="x0")
    with pytest.raises(FloatingPointError, match="first appeared at step 2 of 5"):
        fastdiff.sample(growing, (2, 1, 3, 3), dtype=torch.float16, **kw)
    assert torch.isfinite(fastdiff.sample(growing, (2, 1, 3, 3), **kw)).all()


def test_progress_bar_and_callback(toy_model, capsys):
    seen = []
    fastdiff.sample(
        toy_model, (1, 1, 3, 3), sampler="heun", steps=3, schedule=SD, progress=True,
        callback=lambda i, x, x0: seen.append((i, x.shape, x0.shape)),
    )  # fmt: skip
    assert [s[0] for s in seen] == list(range(5))  # heun: 2 * 3 - 1 model evaluations
    assert "heun" in capsys.readouterr().err


def test_heun_warns_when_its_first_corrector_blows_up():
    """Cosine betas clipped at 0.999 put sigma_max at 2e4: Heun's first trapezoidal corrector
    then multiplies the change in the predicted noise by ~1e4 (diffusers does the same)."""
    cosine = fastdiff.Schedule.from_betas("cosine", 1000)
    with pytest.warns(UserWarning, match=r"heun: the first step goes from sigma 2\.029e\+04"):
        fastdiff.build_plan("heun", cosine, 10, spacing="trailing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdiff.build_plan("heun", cosine, 10, spacing="leading")  # starts at sigma 6.5
        for steps in (2, 10, 50):
            fastdiff.build_plan("heun", fastdiff.Schedule.stable_diffusion(), steps)


def test_sampling_records_no_autograd_graph():
    """As diffusers' pipelines: a model with trainable weights gives a plain tensor (no graph
    kept across steps, .numpy() works), and a model may still take gradients inside (classifier
    guidance) under torch.enable_grad()."""
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    assert net.weight.requires_grad
    out = fastdiff.sample(lambda x, t: net(x), (2, 2, 4, 4), sampler="dpmpp_2m", steps=3)
    assert not out.requires_grad and out.grad_fn is None
    out.numpy()

    grads = []

    def guided(x, t):
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            energy = (net(x) ** 2).sum()
            grads.append(torch.autograd.grad(energy, x)[0])
        return net(x).detach() + 0.1 * grads[-1]

    out = fastdiff.sample(guided, (2, 2, 4, 4), sampler="ddim", steps=3)
    assert len(grads) == 3 and all(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(out).all() and not out.requires_grad


def test_plans_are_built_once_per_setting(monkeypatch, toy_model):
    """A second call with the same settings reuses the plan (same samples); another schedule,
    step count or option builds its own."""
    sample_module = importlib.import_module("fastdiff.sample")  # fastdiff.sample is the function
    built = []
    real = sample_module.build_plan
    monkeypatch.setattr(
        sample_module, "build_plan", lambda *a, **k: built.append(a) or real(*a, **k)
    )
    monkeypatch.setattr(sample_module, "_plans", {})
    kw = dict(sampler="ddim", steps=4, seed=3, eta=0.5)
    first = fastdiff.sample(toy_model, (2, 1, 3, 3), schedule=SD, **kw)
    again = fastdiff.sample(
        toy_model, (2, 1, 3, 3), schedule=fastdiff.Schedule.stable_diffusion(), **kw
    )
    assert len(built) == 1 and torch.equal(first, again)
    other = fastdiff.Schedule.from_betas("linear")
    fastdiff.sample(toy_model, (2, 1, 3, 3), schedule=other, **kw)
    fastdiff.sample(toy_model, (2, 1, 3, 3), schedule=SD, **{**kw, "steps": 5})
    fastdiff.sample(toy_model, (2, 1, 3, 3), schedule=SD, **{**kw, "eta": 1.0})
    assert len(built) == 4
    fresh = real("ddim", SD, 4, eta=0.5)
    assert torch.equal(
        sample_module._plan("ddim", SD, 4, "trailing", "eps", {"eta": 0.5}).table, fresh.table
    )
