"""fastdiff.ops.noise.gaussian_ (the noise alone: a sample's x_T) on every backend available here
against the specification of fastdiff/noise.py: odd sizes, NCHW and channels_last, fp32/fp16/
bf16, scaled; the same values as the step op's in-kernel noise; batch invariance; opcheck;
errors; and fastdiff.sample drawing x_T with it. The portable CPU loop: test_cpu_portable.py."""

import os

import pytest
import torch
from devices import device_for

import fastdiff
from fastdiff import noise
from fastdiff.ops.noise import gaussian_, gaussian_op, gaussian_reference
from fastdiff.ops.step import step
from fastdiff.samplers import NCOEF, Col

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

FUSED = ["cuda", "cpu", "triton"]
NOISE_ATOL = 1e-6  # noise.py: fp32 noise of two correct backends agrees to 1e-6


def require(backend: str) -> str:
    device = device_for(backend)
    reason = gaussian_op.get(backend).ready()
    if reason:
        pytest.skip(f"{backend}: {reason}")
    return device


def empty(shape, dtype, device, channels_last):
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)  # every element is written
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    "shape, channels_last, seed, offset, step_, scale",
    [
        ((1, 1823), False, 0, 0, 0, 1.0),
        ((3, 5, 7, 11), False, 2**64 - 1, 2**32 - 3, 2**32 - 1, 14.614641),  # top of each range
        ((3, 5, 7, 11), True, 2**63 + 12345, 17, 0, 80.0),
        ((2, 6, 4, 3), True, 1, 0, 9, -0.5),
        ((2, 4, 16, 16), False, 7, 5, 0, 1.0),  # contiguous, 16-byte rows
        ((2, 3, 4, 8), True, 3, 1, 2, 2.0),  # channels_last, a row within one channel
        # channels_last, 2^k channels and whole rows per channel: Triton's TRANSPOSE tiles
        # (interpreted: 2 per sample of 1024 positions, the second partial)
        ((2, 16, 4, 6), True, 4, 3, 1, 1.5),
        ((1, 4, 40, 40), True, 9, 0, 3, 1.0),
        # channels_last, more channels than the CPU kernel interleaves at once (16): 16 + 4,
        # and twice 16 into a wider row
        ((2, 20, 4, 6), True, 6, 0, 1, 1.0),
        ((1, 32, 4, 4), True, 8, 2, 0, 1.0),
    ],
)
def test_matches_spec(backend, shape, channels_last, seed, offset, step_, scale):
    device = require(backend)
    out = empty(shape, torch.float32, device, channels_last)
    strides = out.stride()
    got = gaussian_(out, seed, step_, sample_offset=offset, scale=scale, backend=backend)
    assert got is out and out.stride() == strides
    z = noise.randn_like_batch(seed, step_, shape, sample_offset=offset, device=device)
    torch.testing.assert_close(out, z * scale, atol=NOISE_ATOL * abs(scale), rtol=2.5e-7)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((2, 4, 8, 8), False),
        ((3, 5, 7, 11), False),
        ((2, 6, 4, 3), True),
        ((2, 3, 4, 8), True),
        ((2, 8, 4, 6), True),  # Triton's TRANSPOSE tile (8-element rows)
    ],
)
def test_16_bit_outputs_round_once(backend, dtype, shape, channels_last):
    """z * scale in fp32, rounded once to the output's dtype: the reference's value unless a
    1e-6 difference in z crosses a rounding boundary (none does for these draws)."""
    device = require(backend)
    out = empty(shape, dtype, device, channels_last)
    gaussian_(out, 5, 3, scale=3.0, backend=backend)
    ref = noise.randn_like_batch(5, 3, shape, device=device) * 3.0
    # Triton 3.8's interpreter truncates fp32 to bf16; compiled Triton rounds to nearest
    truncates = (
        backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET")
    )
    if truncates:
        ref = (ref.view(torch.int32) & -(2**16)).view(torch.float32)
    torch.testing.assert_close(out, ref.to(dtype), atol=0, rtol=0)
    if not truncates:  # the reference backend rounds the same product once
        expected = gaussian_reference(empty(shape, dtype, device, channels_last), 5, 3, scale=3.0)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape, channels_last",
    [((3, 5, 7, 11), False), ((2, 6, 4, 3), True), ((2, 8, 4, 6), True), ((1, 20, 4, 6), True)],
)
def test_equals_the_step_ops_noise(backend, dtype, shape, channels_last):
    """gaussian_ at step r + 1 is, bit for bit, the z that the same backend's step op adds at
    row r (a table row x_next = z)."""
    device = require(backend)
    rows = 4
    table = torch.zeros(rows, NCOEF, dtype=torch.float64)
    table[:, Col.X_Z] = 1.0
    x = empty(shape, dtype, device, channels_last).zero_()
    for r in (0, rows - 1):
        counter = torch.tensor(r, device=device)
        z = step(x, x, None, None, None, table.to(device), counter, seed=11, sample_offset=2,
                 backend=backend)  # fmt: skip
        out = gaussian_(torch.empty_like(x), 11, r + 1, sample_offset=2, backend=backend)
        assert torch.equal(out, z)


@pytest.mark.parametrize("backend", FUSED)
def test_is_batch_invariant(backend):
    """Sample n's noise does not depend on the batch it is drawn in."""
    device = require(backend)
    big = gaussian_(torch.empty(5, 3, 4, 5, device=device), 9, 0, backend=backend)
    for start in (0, 2, 4):
        part = torch.empty(1, 3, 4, 5, device=device)
        gaussian_(part, 9, 0, sample_offset=start, backend=backend)
        assert torch.equal(part, big[start : start + 1])


def test_cpu_noise_in_bulk():
    """A million normals through the OpenMP tiles (several tiles per sample, channels_last
    runs) against the reference, and their moments."""
    require("cpu")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        out = torch.empty(4, 4, 256, 256).contiguous(memory_format=memory_format)
        gaussian_(out, 123, 0, backend="cpu")
        ref = noise.randn_like_batch(123, 0, out.shape)
        torch.testing.assert_close(out, ref, atol=NOISE_ATOL, rtol=2.5e-7)
        assert abs(float(out.mean())) < 5e-3 and abs(float(out.var()) - 1) < 5e-3


@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_opcheck(backend):
    device = require(backend)
    calls = [
        (torch.empty(2, 3, 5, 7, device=device), 2**63 - 1, 0, 3, 2.5),
        (torch.empty(2, 3, 5, 7, device=device, dtype=torch.float16), -5, 4, 0, 1.0),
        (
            torch.empty(2, 6, 4, 3, device=device, dtype=torch.bfloat16).contiguous(
                memory_format=torch.channels_last
            ),
            1,
            2**32 - 1,
            9,
            -3.0,
        ),
    ]
    for args in calls:
        torch.library.opcheck(torch.ops.fastdiff.gaussian_.default, args)


def test_dispatch():
    require("cpu")
    x = torch.empty(2, 3, 4, 5)
    assert gaussian_op.select(x, 0, 0).name == "cpu"  # not triton: interpreted on CPU tensors
    assert gaussian_op.names == ["cuda", "cpu", "triton", "reference"]
    # float64 and non-dense layouts go to the reference, with the reasons when forced
    assert gaussian_op.select(x.double(), 0, 0).name == "reference"
    strided = torch.empty(2, 5, 4, 3).transpose(1, 3)
    assert gaussian_op.select(strided, 0, 0).name == "reference"
    gaussian_(strided, 4, 1, scale=2.0)
    torch.testing.assert_close(strided, 2.0 * noise.randn_like_batch(4, 1, strided.shape))
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run.*neither contiguous nor"):
        gaussian_(strided, 4, 1, backend="cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run.*dtype float64"):
        gaussian_(x.double(), 4, 1, backend="cpu")
    out = gaussian_(x.double(), 4, 1, scale=3.0)
    ref = noise.randn_like_batch(4, 1, x.shape).double() * 3.0
    assert torch.equal(out, ref)  # fp64: the fp32 noise times the scale in fp64


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: gaussian_(torch.empty(2, 3), -1, 0), ValueError, r"seed must be .*\[0, 2\*\*64\)"),
        (
            lambda: gaussian_(torch.empty(2, 3), 0, 2**32),
            ValueError,
            r"step must be in \[0, 2\*\*32",
        ),
        (lambda: gaussian_(torch.empty(2, 3), 0, -1), ValueError, "step must be"),
        (
            lambda: gaussian_(torch.empty(2, 3), 0, 0, sample_offset=2**32 - 1),
            ValueError,
            r"sample indices 4294967295..4294967296 must lie",
        ),
        (lambda: gaussian_(torch.empty(2, 3, dtype=torch.int32), 0, 0), ValueError, "floating"),
        (lambda: gaussian_(torch.empty(()), 0, 0), ValueError, r"batched \(B, ...\)"),
        (lambda: gaussian_(torch.empty(2, 3), 0, 0, backend="tpu"), ValueError, "unknown backend"),
    ],
)
def test_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_extension_op_errors():
    """The op itself checks what the Python wrapper does (called directly, e.g. by a graph)."""
    require("cpu")
    op = torch.ops.fastdiff.gaussian_
    with pytest.raises(RuntimeError, match=r"step must be in \[0, 2\*\*32\)"):
        op(torch.empty(2, 3), 0, 2**32, 0, 1.0)
    with pytest.raises(RuntimeError, match="out must be a float32, float16 or bfloat16"):
        op(torch.empty(2, 3, dtype=torch.float64), 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="out must be contiguous or channels_last"):
        op(torch.empty(3, 2).t(), 0, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="sample indices"):
        op(torch.empty(2, 3), 0, 0, 2**32 - 1, 1.0)
    with pytest.raises(RuntimeError, match="out must be batched"):
        op(torch.empty(()), 0, 0, 0, 1.0)


def test_sample_draws_x_T_with_the_fused_kernel(monkeypatch):
    """With a fused backend, fastdiff.sample evaluates no noise with torch ops (neither x_T nor
    a step's): the spec's torch implementation can be switched off and sampling still runs, and
    gives the reference backend's sample to within the noise tolerance."""
    require("cpu")

    def model(x, t):
        return 0.5 * x

    kw = dict(sampler="euler_a", steps=6, seed=3, sample_offset=4)
    ref = fastdiff.sample(model, (2, 3, 8, 8), backend="reference", **kw)

    def unavailable(*args, **kwargs):
        raise AssertionError("the torch-ops noise ran")

    monkeypatch.setattr(noise, "randn_like_batch", unavailable)
    monkeypatch.setattr(noise, "gaussian", unavailable)
    got = fastdiff.sample(model, (2, 3, 8, 8), backend="cpu", **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="torch-ops noise"):
        fastdiff.sample(model, (2, 3, 8, 8), backend="reference", **kw)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("sampler", ["heun", "euler_a", "ddim"])
def test_a_seeded_sample_starts_from_the_kernels_x_T(backend, sampler):
    """sample(seed=s) is, bit for bit, sample(noise=gaussian_(s, step 0)) on the same backend:
    x_T is the kernel's noise (which test_matches_spec holds to the specification) and the rest
    of the trajectory is the step op's (test_step_kernels.py)."""
    device = require(backend)

    def model(x, t):
        return 0.6 * x * torch.cos(t.view(-1, 1, 1, 1) / 1000) + 0.1

    kw = dict(sampler=sampler, steps=4, seed=5, sample_offset=2, device=device, backend=backend)
    seeded = fastdiff.sample(model, (2, 3, 5, 7), **kw)
    x_T = gaussian_(torch.empty(2, 3, 5, 7, device=device), 5, 0, sample_offset=2, backend=backend)
    assert torch.equal(fastdiff.sample(model, noise=x_T, **kw), seeded)
    assert not torch.equal(fastdiff.sample(model, noise=x_T.roll(1, -1), **kw), seeded)
