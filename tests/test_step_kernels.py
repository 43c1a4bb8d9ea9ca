"""The fused sampler step (fastdiff.ops.step) on every backend available here against
step_reference: every sampler's every row, fp32/fp16/bf16, odd sizes, NCHW and channels_last,
guidance and clamp (DESIGN.md's tolerance rule against the fp64 reference); the in-kernel noise
against fastdiff/noise.py; whole sampling trajectories; dispatch and why_not, opcheck,
torch.compile, and input errors."""

import math
import os

import pytest
import torch
from devices import device_for

import fastdiff
from fastdiff import noise
from fastdiff.ops import step as step_ops
from fastdiff.ops.step import step, step_op, step_reference
from fastdiff.samplers import NCOEF, SAMPLERS, Col, build_plan
from fastdiff.schedules import Schedule

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

FUSED = ["cuda", "cpu", "triton"]
EXTENSION = ["cuda", "cpu"]  # the backends of torch.ops.fastdiff.step
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NOISE_ATOL = 1e-6  # noise.py: fp32 noise of two correct backends agrees to 1e-6
# (shape, channels_last, guided, clamp): the odd sizes of DESIGN.md
CASES = {
    "1x1823": ((1, 1823), False, False, None),
    "3x5x7x11": ((3, 5, 7, 11), False, True, (-1.5, 1.0)),
    "3x5x7x11-cl": ((3, 5, 7, 11), True, True, None),
    "2x3x5x3-cl-clamp": ((2, 3, 5, 3), True, False, (-0.5, 0.5)),
    # 32 positions: a Triton row (4 or 8 elements) never crosses a channel
    "2x3x4x8-cl": ((2, 3, 4, 8), True, True, None),
    # 2^k channels, positions a multiple of 8: Triton's TRANSPOSE tiles (memory order, the
    # noise transposed into them)
    "2x4x6x8-cl": ((2, 4, 6, 8), True, True, None),
    "3x16x2x4-cl-clamp": ((3, 16, 2, 4), True, False, (-1.0, 1.0)),
}


def require(backend: str, device: str) -> None:
    reason = step_op.get(backend).ready()
    if reason:
        pytest.skip(f"{backend}: {reason}")


def randn(shape, dtype, device, g, channels_last=False):
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def plan_table(sampler: str, steps: int = 4) -> torch.Tensor:
    options = {"eta": 1.0} if sampler == "ddim" else {}
    return build_plan(sampler, Schedule.from_betas("linear"), steps, **options).table


def assert_step_close(fast, ref64, ref_same, noise_coef: float):
    """DESIGN.md: max |fast - fp64 ref| <= 2 max |PyTorch in fast's dtype - fp64 ref| + floor;
    the floor: one ulp at the largest magnitude, plus the noise tolerance times X_Z (both fp64
    and same-precision references draw the reference's fp32 noise, fast draws its own)."""
    ref64 = ref64.double()
    err = (fast.double() - ref64).abs().max().item()
    err_ref = (ref_same.double() - ref64).abs().max().item()
    floor = torch.finfo(fast.dtype).eps * max(1.0, ref64.abs().max().item())
    floor += NOISE_ATOL * abs(noise_coef)
    assert err <= 2 * err_ref + floor, f"error {err:.3g} > 2 x {err_ref:.3g} + {floor:.3g}"


def check_row(backend, table, row, dtype, device, shape, channels_last, guided, clamp):
    g = torch.Generator().manual_seed(1000 * row + 7)
    n_hist = 2  # random h0 and h1 in every call, so every coefficient matters
    x, y, yu, h0, h1 = (randn(shape, dtype, device, g, channels_last) for _ in range(5))
    yu = yu if guided else None
    table = table.to(device)
    counter = torch.tensor(row, device=device)
    options = dict(
        seed=2**64 - 1 - row, sample_offset=3, guidance=2.5 if guided else 1.0, clamp=clamp
    )

    def run(fn, dt, **kw):
        cast = lambda t: None if t is None else t.to(dt)
        hs = [cast(h0).clone(), cast(h1).clone()][:n_hist]
        out = fn(cast(x), cast(y), cast(yu), *hs, table, counter, **options, **kw)
        return out, hs

    out, hs = run(step, dtype, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape and out.stride() == x.stride()
    ref64, hs64 = run(step_reference, torch.float64)
    ref, hs_ref = run(step_reference, dtype)
    coef = float(table[row, Col.X_Z])
    assert_step_close(out, ref64, ref, coef)
    for h, h64, h_ref in zip(hs, hs64, hs_ref):
        assert_step_close(h, h64, h_ref, 0.0)
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("backend", FUSED)
def test_every_row_matches_reference(backend, sampler, dtype):
    device = device_for(backend)
    require(backend, device)
    table = plan_table(sampler)
    cases = list(CASES.values())
    for row in range(table.shape[0]):
        # interpreted Triton is slow: there each row takes one case in turn
        for case in cases if device != "cpu" or backend != "triton" else [cases[row % len(cases)]]:
            check_row(backend, table, row, dtype, device, *case)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_cpu_equals_reference_bitwise_without_noise(dtype, channels_last):
    """csrc/step.h keeps the reference's operation order without FMA contraction: without
    noise the cpu kernel's result is the reference's, bit for bit: the fp32 arithmetic, and a
    16-bit state's conversions (vector F16C ones for fp16 where the CPU has them, 8 elements
    at a time: 3x5x7x11 leaves a tail in every sample) rounding once, to nearest even."""
    require("cpu", "cpu")
    table = plan_table("unipc")
    for row in range(table.shape[0]):
        g = torch.Generator().manual_seed(row)
        x, y, yu, h0, h1 = (randn((3, 5, 7, 11), dtype, "cpu", g, channels_last) for _ in range(5))
        counter = torch.tensor(row)
        outs = []
        for backend in ("cpu", "reference"):
            hs = [h0.clone(), h1.clone()]
            out = step(
                x,
                y,
                yu,
                *hs,
                table,
                counter,
                guidance=3.0,
                stochastic=False,
                clamp=(-1.0, 1.0),
                backend=backend,
            )
            outs.append((out, *hs))
        for a, b in zip(*outs):
            assert torch.equal(a, b)


def unit_noise_table(rows: int, dtype=torch.float64) -> torch.Tensor:
    """Rows whose update is x_next = z (every coefficient 0 but X_Z = 1)."""
    table = torch.zeros(rows, NCOEF, dtype=dtype)
    table[:, Col.X_Z] = 1.0
    return table


# (shape, channels_last, seed, sample_offset, counter) of the noise tests
NOISE_CASES = [
    ((1, 1823), False, 0, 0, 0),
    ((3, 5, 7, 11), False, 2**64 - 1, 2**32 - 3, 2**16 + 3),  # top seed and sample
    ((3, 5, 7, 11), True, 2**63 + 12345, 17, 5),
    ((2, 6, 4, 3), True, 1, 0, 9),
    ((2, 3, 4, 8), True, 7, 2, 1),
    ((2, 16, 4, 6), True, 3, 1, 2),
    ((1, 4, 40, 40), True, 2**40 + 1, 5, 7),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape, channels_last, seed, offset, counter", NOISE_CASES)
def test_noise_matches_spec(backend, shape, channels_last, seed, offset, counter):
    device = device_for(backend)
    require(backend, device)
    x = torch.zeros(shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    table = unit_noise_table(counter + 1).to(device)
    c = torch.tensor(counter, device=device)
    z = step(x, x, None, None, None, table, c, seed=seed, sample_offset=offset, backend=backend)
    ref = noise.randn_like_batch(seed, counter + 1, shape, sample_offset=offset, device=device)
    torch.testing.assert_close(z, ref, atol=NOISE_ATOL, rtol=2.5e-7)
    assert z.stride() == x.stride()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((2, 4, 8, 8), False),
        ((3, 5, 7, 11), False),
        ((2, 6, 4, 3), True),
        ((2, 3, 4, 8), True),
        ((2, 8, 4, 6), True),
    ],
)
def test_noise_in_16_bit_states(backend, dtype, shape, channels_last):
    """16-bit states take 8 elements (two Philox blocks) per vector in the Triton kernel: each
    element still gets its own normal, rounded once to the state's dtype."""
    device = device_for(backend)
    require(backend, device)
    x = torch.zeros(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    table = unit_noise_table(4).to(device)
    z = step(x, x, None, None, None, table, torch.tensor(3, device=device), seed=5, backend=backend)
    ref = noise.randn_like_batch(5, 4, shape, device=device)
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET"):
        # Triton 3.8's interpreter truncates fp32 to bf16; compiled Triton rounds to nearest
        ref = (ref.view(torch.int32) & -(2**16)).view(torch.float32)
    torch.testing.assert_close(z, ref.to(dtype), atol=1e-6, rtol=0)  # but for a rounding tie
    assert z.stride() == x.stride()


def test_cpu_noise_in_bulk():
    """A million normals of the cpu kernel (its own vectorised logf/sincosf) against the
    reference, and their moments."""
    require("cpu", "cpu")
    shape = (4, 4, 256, 256)
    x = torch.zeros(shape)
    table = unit_noise_table(8)
    z = step(x, x, None, None, None, table, torch.tensor(7), seed=123, backend="cpu")
    ref = noise.randn_like_batch(123, 8, shape)
    torch.testing.assert_close(z, ref, atol=NOISE_ATOL, rtol=2.5e-7)
    assert abs(float(z.mean())) < 5e-3 and abs(float(z.var()) - 1) < 5e-3


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 6, 8), (3, 5, 7, 11)], ids=["4ch", "5ch"])
def test_channels_last_without_noise(backend, dtype, shape):
    """A step without noise runs a channels_last state as the flat array it is in memory (the
    CUDA kernel's vector path, Triton's MEMORY tile): the reference's result, histories too."""
    device = device_for(backend)
    require(backend, device)
    g = torch.Generator().manual_seed(5)
    table = plan_table("unipc").to(device)
    for row in range(table.shape[0]):
        x, y, yu, h0, h1 = (randn(shape, dtype, device, g, True) for _ in range(5))
        hs, hs_ref = [h0.clone(), h1.clone()], [h0.clone(), h1.clone()]
        counter = torch.tensor(row, device=device)
        kw = dict(guidance=2.0, stochastic=False)
        out = step(x, y, yu, *hs, table, counter, backend=backend, **kw)
        ref = step_reference(x, y, yu, *hs_ref, table, counter, **kw)
        assert out.stride() == x.stride()
        for a, b in zip((out, *hs), (ref, *hs_ref)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # no FMA: the reference's roundings


def test_triton_tiles():
    """kernels/step.py's tile for each layout and dtype, and the same bits whatever its size:
    several programs per sample, the last one partial."""
    pytest.importorskip("triton")
    from fastdiff.kernels import step as kernels

    dev = device_for("triton")  # compiled Triton takes CUDA tensors only
    cl = lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=dev).contiguous(
        memory_format=torch.channels_last
    )
    tile = lambda x, **kw: int(kernels._layout(x, None, **kw)[1]["constexprs"]["LAYOUT"])
    MEMORY, GATHER, TRANSPOSE = 0, 1, 2
    assert tile(torch.zeros(2, 4, 6, 8, device=dev)) == MEMORY
    assert tile(cl((2, 4, 6, 8), torch.float32)) == TRANSPOSE
    assert tile(cl((2, 4, 6, 8), torch.float16)) == TRANSPOSE
    assert tile(cl((2, 4, 6, 6), torch.float32)) == TRANSPOSE  # 36 positions: rows of 4
    assert tile(cl((2, 4, 6, 6), torch.float16)) == GATHER  # but not of 8
    assert tile(cl((3, 5, 7, 11), torch.float32)) == GATHER  # 5 channels
    assert tile(cl((3, 5, 7, 11), torch.float32), flat=True) == MEMORY  # no noise
    table = unit_noise_table(3).float().to(dev)
    for shape, dtype in [((2, 4, 6, 8), torch.float32), ((2, 4, 6, 8), torch.float16)]:
        x = cl(shape, dtype)
        outs = []
        for block in (None, 64, 128):  # 16 or 32 positions per program: 3 or 2 per sample
            args = (x, x, None, None, None, table, torch.tensor(2, device=dev))
            kw = dict(seed=9, sample_offset=1, guidance=1.0, clamp=None, stochastic=True)
            outs.append(kernels.step(*args, **kw, block=block))
            noise_out = kernels.gaussian_(torch.empty_like(x), 9, 3, 1, 1.0, block=block)
            assert torch.equal(noise_out, outs[-1])
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        z = noise.randn_like_batch(9, 3, shape, sample_offset=1)
        out = outs[0].float().cpu()
        torch.testing.assert_close(out, z.to(dtype).float(), atol=NOISE_ATOL, rtol=0)


@pytest.mark.parametrize("backend", FUSED)
def test_noise_is_batch_invariant(backend):
    """Sample n's noise does not depend on the batch it is drawn in."""
    device = device_for(backend)
    require(backend, device)
    table = unit_noise_table(4).to(device)
    counter = torch.tensor(2, device=device)
    big = torch.zeros(5, 3, 4, 5, device=device)
    z = step(big, big, None, None, None, table, counter, seed=9, backend=backend)
    for start in (0, 2, 4):
        part = big[start : start + 1]
        zp = step(
            part,
            part,
            None,
            None,
            None,
            table,
            counter,
            seed=9,
            sample_offset=start,
            backend=backend,
        )
        assert torch.equal(zp, z[start : start + 1])


def toy(x, t, **cond):
    tt = (t.to(x.dtype) / 1000).view(-1, *[1] * (x.ndim - 1))
    out = 0.6 * x * torch.cos(tt) + 0.3 * torch.sin(3 * x + tt) + 0.1 * tt
    return out + 0.05 * cond["c"] if "c" in cond else out


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("backend", FUSED)
def test_trajectory_matches_reference(backend, sampler):
    """Whole trajectories from the same x_T (each backend's own x_T differs from the reference's
    by the noise tolerance times sigma_max, ~1.6e-4 here: tests/test_noise_kernels.py)."""
    device = device_for(backend)
    require(backend, device)
    x_T = noise.randn_like_batch(5, 0, (2, 3, 5, 7), device=device)
    kwargs = dict(noise=x_T, sampler=sampler, steps=4, seed=5, device=device)
    fast = fastdiff.sample(toy, backend=backend, **kwargs)
    ref = fastdiff.sample(toy, backend="reference", **kwargs)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_guided_channels_last_trajectory(backend):
    device = device_for(backend)
    require(backend, device)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 6, generator=g).to(device)
    x_T = x_T.contiguous(memory_format=torch.channels_last)
    c = torch.randn(2, 3, 4, 6, generator=g).to(device)
    kwargs = dict(
        noise=x_T,
        sampler="dpmpp_2m_sde",
        steps=5,
        seed=3,
        guidance_scale=4.0,
        cond={"c": c},
        uncond={"c": -c},
        clamp=(-2.0, 2.0),
    )
    fast = fastdiff.sample(toy, backend=backend, **kwargs)
    ref = fastdiff.sample(toy, backend="reference", **kwargs)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_default_backend_on_cpu_is_cpu():
    """On CPU tensors `cpu` is preferred to interpreted Triton; fp64 goes to the reference."""
    require("cpu", "cpu")
    x = torch.zeros(2, 4)
    table, counter = plan_table("ddim"), torch.tensor(0)
    args = (x, x, None, None, None, table, counter)
    assert step_op.select(*args).name == "cpu"
    assert step_op.select(x.double(), *args[1:]).name == "reference"
    assert step_op.select(torch.zeros(2, 4, 6, 5)[..., ::2], *args[1:]).name != "cpu"


def opcheck_calls(device: str):
    """Arguments of torch.ops.fastdiff.step: fp32 NCHW; guided, clamped fp16 channels_last with
    an inf in y (the non-finite flag is set); an fp64 table, no history, no noise, no flags."""
    g = torch.Generator().manual_seed(0)
    table = plan_table("unipc").float().to(device)
    counter = torch.tensor(1, device=device)
    for dtype, channels_last, guided, clamp in [
        (torch.float32, False, False, None),
        (torch.float16, True, True, [-1.0, 1.0]),
    ]:
        x, y, yu, h0, h1 = (randn((2, 3, 4, 5), dtype, device, g, channels_last) for _ in range(5))
        if guided:
            y[1, 2, 3, 4] = float("inf")
        flags = torch.zeros(table.shape[0], dtype=torch.int32, device=device)
        yu = yu if guided else None
        yield (x, y, yu, h0, h1, table, counter, 2**63 - 1, 7, 2.0, clamp, True, flags)
    yield (x, y, None, None, None, table.double(), counter, -5, 0, 1.0, None, False, None)


@pytest.mark.parametrize("backend", EXTENSION)
def test_opcheck(backend):
    """The C++/CUDA op on each device it is registered for."""
    device = device_for(backend)
    require(backend, device)
    for args in opcheck_calls(device):
        torch.library.opcheck(torch.ops.fastdiff.step.default, args)


@pytest.mark.parametrize("backend", [*FUSED, "reference"])
def test_opcheck_dispatch_op(backend):
    """fastdiff::step_dispatch, the op a compiled graph calls (dispatch inside)."""
    device = device_for(backend)
    require(backend, device)
    for args in opcheck_calls(device):
        torch.library.opcheck(torch.ops.fastdiff.step_dispatch.default, (*args, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_compile_has_no_graph_breaks(backend):
    """A sampler's step (model output in, fused update, counter + 1, as fastdiff.sample's loop)
    compiles into one graph and gives eager's trajectory, history and non-finite flags (a NaN
    in one element of the last row's model output), bit for bit."""
    device = device_for(backend)
    require(backend, device)
    plan = build_plan("dpmpp_3m_sde", Schedule.from_betas("linear"), 4)  # h0, h1 and noise
    table = plan.table.float().to(device)

    last = plan.rows - 1
    nan_at = torch.zeros(2, 3, 5, 7, device=device)
    nan_at[1, 2, 3, 4] = float("nan")

    def one_step(x, h0, h1, counter, flags):
        y = toy(x, counter.reshape(1).float()) + torch.where(counter == last, nan_at, 0.0)
        x = step(
            x,
            y,
            -y,
            h0,
            h1,
            table,
            counter,
            seed=2**64 - 3,
            guidance=2.0,
            clamp=(-1.5, 1.5),
            nonfinite=flags,
            backend=backend,
        )
        counter.add_(1)
        return x

    compiled = torch.compile(one_step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(2, 3, 5, 7, generator=g).to(device)
    states = []
    for fn in (compiled, one_step):
        x, counter = x_T, torch.zeros((), dtype=torch.int64, device=device)
        h0, h1 = torch.zeros_like(x), torch.zeros_like(x)
        flags = torch.zeros(plan.rows, dtype=torch.int32, device=device)
        for _ in range(plan.rows):
            x = fn(x, h0, h1, counter, flags)
        states.append((x, h0, h1, counter, flags))
    for got, expected in zip(*states):
        torch.testing.assert_close(got, expected, atol=0, rtol=0, equal_nan=True)
    assert states[0][1].abs().max() > 0 and int(states[0][3]) == plan.rows
    assert states[0][4].tolist() == [0] * last + [1] and states[0][0].isnan().sum() == 1


def test_layout_conversions_never_give_a_wrong_answer():
    """y in another layout is copied; h0 in another layout refuses the fused kernels (it is
    written in place), so the default falls back to the reference with the same result."""
    require("cpu", "cpu")
    g = torch.Generator().manual_seed(1)
    table, counter = plan_table("dpmpp_2m"), torch.tensor(2)
    x = randn((2, 3, 4, 5), torch.float32, "cpu", g, channels_last=True)
    y = randn((2, 3, 4, 5), torch.float32, "cpu", g)  # contiguous, x is channels_last
    h0 = randn((2, 3, 4, 5), torch.float32, "cpu", g)
    expected_h0 = h0.clone()
    ref = step_reference(x, y, None, expected_h0, None, table, counter, seed=1)
    for backend in ("cpu", None):
        h = h0.contiguous(memory_format=torch.channels_last)
        out = step(x, y, None, h, None, table, counter, seed=1, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(h, expected_h0, atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match=r"h0 \(updated in place\) has strides"):
        step(x, y, None, h0.clone(), None, table, counter, backend="cpu")
    h = h0.clone()
    out = step(x, y, None, h, None, table, counter, seed=1)  # reference: layouts differ
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(h, expected_h0, atol=1e-6, rtol=0)


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """t in NHWC memory with the strides a channels_last convolution gives it, also for one
    channel (where .contiguous(memory_format=torch.channels_last) keeps NCHW strides)."""
    B, C, H, W = t.shape
    return t.new_empty(B, H, W, C).copy_(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", FUSED)
def test_size_one_dims_take_any_stride(backend):
    """(B, 1, H, W) is NCHW and channels_last at once: y, y_uncond and h0 with the other
    format's strides (a channels_last model on grayscale images) are the same memory and are
    taken as they are, with the reference's result, by the kernel too."""
    device = device_for(backend)
    require(backend, device)
    g = torch.Generator().manual_seed(3)
    table, counter = plan_table("dpmpp_2m").to(device), torch.tensor(2, device=device)
    x = randn((2, 1, 5, 7), torch.float32, device, g)
    y, y_uncond, h0 = (nhwc(randn((2, 1, 5, 7), torch.float32, device, g)) for _ in range(3))
    assert y.stride() != x.stride() and y.is_contiguous()
    h0_before, expected_h0 = h0.clone(), h0.clone()
    kwargs = dict(seed=7, guidance=3.0)
    ref = step_reference(x, y, y_uncond, expected_h0, None, table, counter, **kwargs)
    assert step_op.select(x, y, y_uncond, h0, None, table, counter, backend=backend)
    out = step(x, y, y_uncond, h0, None, table, counter, backend=backend, **kwargs)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(h0, expected_h0, atol=1e-6, rtol=0)
    if backend in EXTENSION:  # the op itself, past the Python wrapper's checks
        h = nhwc(h0_before)
        raw = torch.ops.fastdiff.step(
            x, y, y_uncond, h, None, table, counter, 7, 0, 3.0, None, True
        )
        assert torch.equal(raw, out) and torch.equal(h, h0)


def test_channels_last_model_on_one_channel_images():
    """fastdiff.sample with a model whose output has NHWC strides on 1-channel images (what a
    channels_last UNet returns) draws exactly the samples of the NCHW model."""
    require("cpu", "cpu")
    cl = lambda x, t: nhwc(toy(x, t))
    kwargs = dict(sampler="dpmpp_2m_sde", steps=4, seed=2, backend="cpu")
    shape = (3, 1, 6, 6)
    assert torch.equal(fastdiff.sample(cl, shape, **kwargs), fastdiff.sample(toy, shape, **kwargs))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**64), ValueError, "seed"),
        (dict(sample_offset=2**32 - 1), ValueError, "sample indices"),
        (dict(clamp=(1.0,)), ValueError, "clamp"),
        (dict(counter=torch.zeros(2, dtype=torch.int64)), ValueError, "counter"),
        (dict(x=torch.zeros(2, 4, 6)[..., ::2]), RuntimeError, "neither contiguous"),
        (dict(y=torch.zeros(2, 4, 3, dtype=torch.float16)), RuntimeError, "one shape and dtype"),
        (dict(x=torch.zeros(2, 4, 3, dtype=torch.float64)), RuntimeError, "dtype float64"),
        (dict(table=torch.zeros(3, 5)), RuntimeError, "table must be"),
        (dict(counter=torch.tensor(0, dtype=torch.int32)), RuntimeError, "counter must be int64"),
        (dict(nonfinite=torch.zeros(4)), ValueError, "nonfinite must be a contiguous int32"),
        (dict(nonfinite=torch.zeros(3, dtype=torch.int32)), ValueError, r"of shape \(4,\)"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    require("cpu", "cpu")
    args = dict(
        x=torch.zeros(2, 4, 3),
        y=torch.zeros(2, 4, 3),
        y_uncond=None,
        h0=None,
        h1=None,
        table=plan_table("ddim"),
        counter=torch.tensor(0),
    )
    args.update((k, v) for k, v in kwargs.items() if k in args)
    options = {k: v for k, v in kwargs.items() if k not in args}
    if "y" in kwargs:  # x's dtype is fine, y's is not
        args["y"] = kwargs["y"]
    with pytest.raises(error, match=match):
        step(*args.values(), backend="cpu", **options)


def test_extension_op_errors():
    """The op itself checks what the Python wrapper does not (called directly, e.g. by a
    compiled graph)."""
    require("cpu", "cpu")
    op = torch.ops.fastdiff.step
    x, table = torch.zeros(2, 4, 3), plan_table("ddim")
    call = lambda **kw: op(
        *{
            **dict(
                x=x,
                y=x,
                yu=None,
                h0=None,
                h1=None,
                table=table,
                counter=torch.tensor(0),
                seed=0,
                offset=0,
                g=1.0,
                clamp=None,
                stochastic=True,
                nonfinite=None,
            ),
            **kw,
        }.values()
    )
    with pytest.raises(RuntimeError, match="counter is 9 but the table has 4 rows"):
        call(counter=torch.tensor(9))
    with pytest.raises(RuntimeError, match="table must be a plan's coefficient table"):
        call(table=torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="y must have x's shape"):
        call(y=torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="h0 must have x's memory layout"):
        call(h0=torch.zeros(2, 3, 4).transpose(1, 2))
    with pytest.raises(RuntimeError, match="clamp must be"):
        call(clamp=[1.0])
    with pytest.raises(RuntimeError, match="sample indices"):
        call(offset=2**32 - 1)
    h = torch.zeros(2, 4, 3)
    with pytest.raises(RuntimeError, match="single memory location"):
        call(h0=h, h1=h)
    with pytest.raises(RuntimeError, match=r"nonfinite must be a contiguous int32 .* \(4,\)"):
        call(nonfinite=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="nonfinite must be a contiguous int32"):
        call(nonfinite=torch.zeros(4, dtype=torch.int64))


def in_memory_order(t: torch.Tensor) -> torch.Tensor:
    """A flat view of t's elements in memory order (t contiguous or channels_last)."""
    return t.view(-1) if t.is_contiguous() else t.permute(0, 2, 3, 1).view(-1)


def doubling_table(rows: int) -> torch.Tensor:
    """A table whose every row is x_next = 2 x (x0 = x, no history, no noise)."""
    table = torch.zeros(rows, NCOEF, dtype=torch.float64)
    table[:, Col.A], table[:, Col.X_X] = 1.0, 2.0
    return table


@pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy, interpreted Triton
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend", [*FUSED, "reference"])
def test_nonfinite_flag(backend, dtype):
    """nonfinite[counter] is set exactly when the step's x_next, in the state's dtype, holds a
    NaN or an infinity: one bad element in the middle of a state several threads share, or in
    its last element; a NaN model output, an infinite state, and finite inputs whose x_next
    overflows (in fp16 only when stored); never for a finite result. Other rows' flags stay."""
    device = device_for(backend)
    require(backend, device)
    g = torch.Generator().manual_seed(5)
    plan, rows = plan_table("dpmpp_2m").to(device), 4
    big = torch.finfo(dtype).max / 1.5  # 2 big overflows fp32 arithmetic, or fp16 storage
    for shape, channels_last in [((2, 4, 64, 64), False), ((3, 5, 7, 11), True), ((1, 1823), 0)]:
        numel = math.prod(shape)
        for where in (numel // 2 + 3, numel - 1):  # memory positions
            for case in ("finite", "nan", "inf", "overflow"):
                x, y, h0 = (randn(shape, dtype, device, g, channels_last) for _ in range(3))
                table, stochastic = plan, True
                if case == "nan":
                    in_memory_order(y)[where] = float("nan")
                elif case == "inf":
                    in_memory_order(x)[where] = float("-inf")
                elif case == "overflow":
                    table, stochastic, h0 = doubling_table(rows).to(device), False, None
                    in_memory_order(x)[where] = big
                flags = torch.tensor([1, 0, 0, 0], dtype=torch.int32, device=device)
                out = step(
                    x, y, None, h0, None, table, torch.tensor(2, device=device),
                    seed=3, stochastic=stochastic, nonfinite=flags, backend=backend,
                )  # fmt: skip
                bad = case != "finite"
                assert torch.isfinite(out).all() != bad, (shape, where, case)
                assert flags.tolist() == [1, 0, int(bad), 0], (shape, where, case)


def test_cuda_graph_argument_errors():
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        fastdiff.sample(toy, (1, 2, 3), steps=2, cuda_graph=True, device="cpu")
    with pytest.raises(ValueError, match="cuda_graph must be"):
        fastdiff.sample(toy, (1, 2, 3), steps=2, cuda_graph="always")
    # "auto" on CPU samples eagerly, as False does
    a = fastdiff.sample(toy, (1, 2, 3), steps=2, cuda_graph="auto")
    torch.testing.assert_close(a, fastdiff.sample(toy, (1, 2, 3), steps=2), atol=0, rtol=0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("sampler", ["ddim", "heun", "unipc", "dpmpp_3m_sde"])
def test_cuda_graph_equals_eager(backend, sampler):
    """One captured step replayed for every row gives the eager trajectory: the row (and so
    which history slots are written, Heun's stages, UniPC's corrector) comes from the counter."""
    require(backend, "cuda")
    options = {"eta": 1.0} if sampler == "ddim" else {}
    kwargs = dict(sampler=sampler, steps=6, seed=11, device="cuda", backend=backend, **options)
    kwargs.update(
        guidance_scale=3.0,
        cond={"c": torch.ones(1, 4, 8, 8, device="cuda")},
        uncond={"c": torch.zeros(1, 4, 8, 8, device="cuda")},
    )
    seen = []
    graphed = fastdiff.sample(
        toy,
        (2, 4, 8, 8),
        cuda_graph=True,
        callback=lambda i, x, x0: seen.append((i, x, x0)),
        **kwargs,
    )
    eager = fastdiff.sample(toy, (2, 4, 8, 8), cuda_graph=False, **kwargs)
    torch.testing.assert_close(graphed, eager, atol=1e-6, rtol=1e-6)
    assert [i for i, _, _ in seen] == list(range(len(seen))) and seen[-1][1].equal(graphed)


@needs_cuda
def test_cuda_graph_auto_falls_back_for_uncapturable_models():
    def syncing(x, t):
        return x * float(t[0]) / 1000  # .item(): a host sync, not capturable

    stream = torch.cuda.current_stream()
    with pytest.warns(RuntimeWarning, match="sampling eagerly"):
        auto = fastdiff.sample(syncing, (1, 4, 8, 8), steps=3, device="cuda", cuda_graph="auto")
    assert torch.cuda.current_stream() == stream  # not the failed capture's stream
    eager = fastdiff.sample(syncing, (1, 4, 8, 8), steps=3, device="cuda")
    torch.testing.assert_close(auto, eager, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="capturing the sampling step failed"):
        fastdiff.sample(syncing, (1, 4, 8, 8), steps=3, device="cuda", cuda_graph=True)
    assert torch.cuda.current_stream() == stream


@needs_cuda
def test_cuda_and_cpu_draw_the_same_sample():
    require("cuda", "cuda")
    require("cpu", "cpu")
    kwargs = dict(sampler="euler_a", steps=8, seed=2**64 - 5, sample_offset=4)
    gpu = fastdiff.sample(toy, (2, 4, 16, 16), device="cuda", **kwargs)
    cpu = fastdiff.sample(toy, (2, 4, 16, 16), device="cpu", **kwargs)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", EXTENSION)
def test_why_not_with_x_alone(backend):
    """README.md's `step_op.why_not("cuda", x)`: asked about x alone, each backend answers from
    what it declares and what x shows (device, dtype, layout); the other operands go unchecked."""
    device = device_for(backend)
    require(backend, device)
    x = torch.zeros(2, 3, 4, 5, device=device)
    reasons = fastdiff.ops.step.step_op.why_not("cuda", x)
    if device == "cuda":
        assert reasons == []
    else:
        assert "device cpu not in ['cuda']" in reasons
    assert step_op.why_not(backend, x) == step_op.why_not("reference", x) == []
    assert step_op.why_not(backend, x.contiguous(memory_format=torch.channels_last)) == []
    reasons = step_op.why_not(backend, x[..., ::2])
    assert len(reasons) == 1 and "neither contiguous nor channels_last" in reasons[0]
    reasons = step_op.why_not(backend, x.double())
    assert reasons == ["dtype float64 not in ['float32', 'float16', 'bfloat16']"]
    other = "cpu" if backend == "cuda" else "cuda"
    assert f"device {device} not in ['{other}']" in step_op.why_not(other, x)


def test_why_not_gives_every_reason():
    """A backend that cannot run here still says which devices and dtypes it takes."""
    op = fastdiff.ops.Op("toy", lambda x: x)
    op.register(
        fastdiff.ops.Backend(
            "gpu", lambda x: x, ("cuda",), (torch.float16,), ready=lambda: "not built"
        )
    )
    assert op.why_not("gpu", torch.zeros(2)) == [
        "not built",
        "device cpu not in ['cuda']",
        "dtype float32 not in ['float16']",
    ]


def test_backends_are_registered_in_dispatch_order():
    assert step_op.names == ["cuda", "cpu", "triton", "reference"]
    assert step_ops.step_op is step_op


def test_dispatch_is_remembered_per_call_signature(monkeypatch):
    """A sampling loop dispatches once: the choice is kept for calls with the same kind of
    tensors, and made again when a tensor's dtype or layout, or which operands share memory,
    changes (each of those changes the backend here)."""
    require("cpu", "cpu")
    selected = []
    select = step_op.select

    def counted(*args, **kwargs):
        selected.append(select(*args, **kwargs))
        return selected[-1]

    monkeypatch.setattr(step_op, "select", counted)
    step_ops._chosen.clear()
    fastdiff.sample(toy, (2, 3, 4, 4), sampler="dpmpp_2m", steps=6)
    assert [b.name for b in selected] == ["cpu"]

    g = torch.Generator().manual_seed(4)
    table, counter = plan_table("dpmpp_2m"), torch.tensor(1)
    x, y, h0 = (randn((2, 3, 4, 5), torch.float32, "cpu", g) for _ in range(3))

    def run(x, y, h0):
        expected_h0 = h0.clone()
        ref = step_reference(x.clone(), y.clone(), None, expected_h0, None, table, counter)
        out = step(x, y, None, h0, None, table, counter)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(h0, expected_h0, atol=1e-6, rtol=0)
        return selected[-1].name

    selected.clear()
    assert run(x, y, h0.clone()) == "cpu"
    assert run(x, y, h0.clone()) == "cpu" and len(selected) == 1  # remembered
    assert run(x, y.half(), h0.clone()) == "reference"  # y's dtype differs from x's
    h = h0.clone()
    assert run(x, h, h) == "reference"  # h0 (written in place) is y
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    assert run(x, y, cl(h0)) == "reference"  # h0 not in x's layout
    assert run(cl(x), y, cl(h0)) == "cpu"  # both channels_last: fused again (y is copied)
    assert len(selected) == 5
