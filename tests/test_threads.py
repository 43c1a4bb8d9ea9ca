"""The C++ CPU kernels give the same bits whatever the thread count. OpenMP splits their work
(the step's and the noise's tiles, GroupNorm's groups and batch elements) over the threads, and
no result may depend on the split (DESIGN.md: a seed gives the same sample, bit for bit). The
suite's workers run one thread each (conftest.py), so these tests set the count themselves:
1, 2 and 3 threads (3 does not divide the tiles evenly on any of these shapes)."""

import contextlib

import pytest
import torch

import fastdiff
from fastdiff.ops import noise as noise_ops
from fastdiff.ops.group_norm_silu import GROUP_NORM_SILU, group_norm_silu
from fastdiff.ops.step import step, step_op
from fastdiff.samplers import build_plan
from fastdiff.schedules import Schedule

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

THREADS = (1, 2, 3)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# more than 2**15 elements (the kernels' threshold for threads); 3x5x47x53 leaves partial tiles
SHAPES = {"5x4x40x44": (5, 4, 40, 44), "3x5x47x53": (3, 5, 47, 53)}


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        assert torch.get_num_threads() == n
        yield
    finally:
        torch.set_num_threads(before)


def per_thread_count(fn) -> list:
    """fn() under each of THREADS, its results as CPU tensors."""
    results = []
    for n in THREADS:
        with threads(n):
            results.append(fn())
    return results


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns: NaNs compare equal to themselves."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def assert_bitwise(results, what):
    first = results[0]
    for n, other in zip(THREADS[1:], results[1:]):
        for a, b in zip(first, other):
            assert a.dtype == b.dtype and a.stride() == b.stride(), what
            assert torch.equal(bits(a), bits(b)), f"{what}: {n} threads differ from 1 thread"


def require(op, backend):
    reason = op.get(backend).ready()
    if reason:
        pytest.skip(f"{backend}: {reason}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_step_is_independent_of_thread_count(shape, dtype, channels_last):
    """The cpu step on a guided, noisy DPM-Solver++ 3M SDE row that reads both histories, and a
    DDIM eta=1 row: x_next, the history written in place and the non-finite
    flags, for one NaN in the last tile (another thread's under 2 or 3 threads)."""
    require(step_op, "cpu")
    g = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    make = lambda: torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    x, y, yu, h0, h1 = (make() for _ in range(5))
    y_nan = y.clone()
    y_nan[-1, -1, -1, -2] = float("nan")  # in the last tile, in either layout
    schedule = Schedule.from_betas("linear")
    for sampler, options in (("dpmpp_3m_sde", {}), ("ddim", {"eta": 1.0})):
        plan = build_plan(sampler, schedule, 6, **options)
        row = 3
        for model_out in (y, y_nan):

            def run(plan=plan, row=row, model_out=model_out):
                hs = [h0.clone(), h1.clone()][: plan.n_history]
                hs += [None] * (2 - len(hs))
                flags = torch.zeros(plan.rows, dtype=torch.int32)
                out = step(
                    x, model_out, yu, hs[0], hs[1], plan.table, torch.tensor(row),
                    seed=2**63 + 5, sample_offset=7, guidance=4.0, stochastic=True,
                    nonfinite=flags, backend="cpu",
                )  # fmt: skip
                return [out, flags, *(h for h in hs if h is not None)]

            results = per_thread_count(run)
            bad = model_out is y_nan
            assert results[0][1][row].item() == int(bad), (sampler, bad)
            assert_bitwise(results, f"{sampler} step{' with a NaN' if bad else ''}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_noise_is_independent_of_thread_count(dtype, channels_last):
    """The cpu kernel's x_T: every element's z depends on (seed, step, sample, element) only."""
    require(noise_ops.gaussian_op, "cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shape = SHAPES["3x5x47x53"]

    def run():
        out = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        return [noise_ops.gaussian_(out, 11, 0, sample_offset=2, scale=14.6, backend="cpu")]

    assert_bitwise(per_thread_count(run), "x_T")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("conditioning", ["none", "scale_shift", "residual"])
def test_group_norm_silu_is_independent_of_thread_count(conditioning, dtype, channels_last):
    """The cpu GroupNorm+SiLU splits (batch, group) pairs (NCHW) or batch elements
    (channels_last) over the threads; each one's statistics are summed in a fixed order."""
    require(GROUP_NORM_SILU, "cpu")
    g = torch.Generator().manual_seed(4)
    B, C, H, W = 5, 64, 13, 11
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(B, C, H, W, generator=g) + 2).to(dtype).contiguous(memory_format=fmt)
    weight, bias = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    cond = {}
    if conditioning == "scale_shift":
        cond["scale_shift"] = torch.randn(B, 2 * C, generator=g).to(dtype)
    elif conditioning == "residual":
        cond["residual"] = torch.randn(x.shape, generator=g).to(dtype).contiguous(memory_format=fmt)

    def run():
        return [group_norm_silu(x, 32, weight, bias, 1e-5, **cond, backend="cpu")]

    assert_bitwise(per_thread_count(run), f"group_norm_silu {conditioning}")


def test_sample_is_independent_of_thread_count():
    """fastdiff.sample on the CPU, end to end (x_T, noisy steps, histories): the same image
    whatever torch.get_num_threads() is."""
    require(step_op, "cpu")
    weight = torch.linspace(0.5, 1.5, 4).reshape(1, 4, 1, 1)
    model = lambda x, t: torch.tanh(x * weight) * (t.reshape(-1, 1, 1, 1) / 1000)

    def run():
        x = fastdiff.sample(model, (8, 4, 32, 40), sampler="dpmpp_3m_sde", steps=5, seed=9)
        return [x]

    assert_bitwise(per_thread_count(run), "sample")
