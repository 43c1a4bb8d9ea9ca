"""The CUDA C++ kernels of fastdiff::step, fastdiff::gaussian_ (csrc/step_kernels.cuh) and
fastdiff::group_norm_silu_fwd (csrc/group_norm_silu_kernels.cuh) compiled for the host under
tests/cuda_emulation.cpp (a thread per CUDA thread; real barriers for __syncthreads, warp shuffles
and cluster.sync; the blocks of a cluster at once, reading each other's shared memory; guard
zones around every operand), against the references: for the step, each kernel (vector, tile,
block) on the layouts it takes, every sampler and dtype, one block looping over the whole grid,
unaligned operands; for GroupNorm+SiLU, one block per group, clusters of 3 and 8 blocks, the
two-launch path, every run length and conditioning. This checks the kernels' logic where no GPU
is at hand; on a GPU test_step_kernels.py and test_group_norm_silu.py run the real ones."""

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from test_group_norm_silu import CONDITIONING, inputs, torch_group_norm_silu
from test_step_kernels import (
    CASES,
    DTYPES,
    NOISE_ATOL,
    NOISE_CASES,
    assert_step_close,
    plan_table,
    randn,
    unit_noise_table,
)
from tolerance import assert_within_tolerance

from fastdiff import noise
from fastdiff.ops import step as step_ops
from fastdiff.ops.group_norm_silu import group_norm_silu_reference
from fastdiff.ops.step import step_reference
from fastdiff.samplers import SAMPLERS, Col

ROOT = Path(__file__).resolve().parent.parent
THREADS = 256  # kThreads of csrc/step_kernels.cuh
TILE = {torch.float32: THREADS * 4, torch.float16: THREADS * 8, torch.bfloat16: THREADS * 8}


@pytest.fixture(scope="module")
def emulation():
    """torch.ops.fastdiff_emulation, built once into build/cuda-emulation (ninja rebuilds it
    when a source changes)."""
    from torch.utils.cpp_extension import load

    # torch runs the first `ninja` on PATH: this environment's
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    build = ROOT / "build" / "cuda-emulation"
    build.mkdir(parents=True, exist_ok=True)
    load(
        name="fastdiff_cuda_emulation",
        sources=[
            str(ROOT / "tests" / "cuda_emulation.cpp"),
            str(ROOT / "csrc" / "step_checks.cpp"),
        ],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-ffp-contract=off", "-fno-math-errno"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.fastdiff_emulation


def kernel_for(shape, channels_last, dtype, noise_drawn=True) -> str:
    """The kernel step_cuda.cu launches for an aligned state (the rule of step_kernel_for)."""
    per_sample = math.prod(shape[1:])
    vector = 128 // torch.finfo(dtype).bits  # 16 bytes
    if not noise_drawn:  # one flat sample
        per_sample *= shape[0]
    if not (channels_last and noise_drawn and shape[1] > 1):
        return "vector" if per_sample % vector == 0 else "block"
    c, positions = shape[1], shape[2] * shape[3]
    pow2 = c & (c - 1) == 0
    return "tile" if pow2 and c <= TILE[dtype] // 4 and positions % 4 == 0 else "block"


# (shape, channels_last, guided, clamp), with the kernels they reach: CASES (block, and the tile
# kernel for 2^k channels) and shapes for the vector kernel and for several tiles per sample,
# the last one partial (16 channels: 64 positions per fp32 tile, 128 per 16-bit one)
EMULATED = {
    **CASES,
    "2x4x6x8": ((2, 4, 6, 8), False, True, None),
    "3x16x10x12-cl": ((3, 16, 10, 12), True, True, (-1.0, 1.0)),
    "1x512x2x2-cl": ((1, 512, 2, 2), True, False, None),  # 16-bit tiles; fp32: block
}


def run_step(emulation, dtype, x, y, yu, h0, h1, table, counter, *, kernel, grid=0, offset=0, **kw):
    cast = lambda t: None if t is None else t.to(dtype)
    hs = [cast(h0).clone(), cast(h1).clone()]
    out = emulation.step(
        cast(x),
        cast(y),
        cast(yu),
        *hs,
        table,
        counter,
        step_ops._int64(kw.get("seed", 0)),
        kw.get("sample_offset", 0),
        kw.get("guidance", 1.0),
        kw.get("clamp"),
        kw.get("stochastic", True),
        kw.get("nonfinite"),
        kernel,
        grid,
        offset,
    )
    return out, hs


def check(emulation, table, row, dtype, case, kernel, grid=0, offset=0, stochastic=True):
    """One row on one case: x_next and both histories within the tolerance rule."""
    shape, channels_last, guided, clamp = case
    g = torch.Generator().manual_seed(1000 * row + 11)
    x, y, yu, h0, h1 = (randn(shape, torch.float64, "cpu", g, channels_last) for _ in range(5))
    yu = yu if guided else None
    counter = torch.tensor(row)
    kw = dict(
        seed=2**64 - 1 - row,
        sample_offset=5,
        guidance=2.5 if guided else 1.0,
        clamp=clamp,
        stochastic=stochastic,
    )
    out, hs = run_step(
        emulation,
        dtype,
        x,
        y,
        yu,
        h0,
        h1,
        table,
        counter,
        kernel=kernel,
        grid=grid,
        offset=offset,
        **kw,
    )
    assert out.dtype == dtype and out.stride() == x.to(dtype).stride()

    def reference(dt):
        cast = lambda t: None if t is None else t.to(dt)
        hs_ref = [cast(h0).clone(), cast(h1).clone()]
        return step_reference(cast(x), cast(y), cast(yu), *hs_ref, table, counter, **kw), hs_ref

    (ref64, hs64), (ref, hs_ref) = reference(torch.float64), reference(dtype)
    coef = float(table[row, Col.X_Z]) if stochastic else 0.0
    assert_step_close(out, ref64, ref, coef)
    for h, h64, h_same in zip(hs, hs64, hs_ref):
        assert_step_close(h, h64, h_same, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_row_matches_reference(emulation, sampler, dtype):
    """Each row of every sampler's plan through the kernel step_cuda.cu picks, the cases taken
    in turn."""
    table = plan_table(sampler)
    cases = list(EMULATED.values())
    for row in range(table.shape[0]):
        for case in cases[row % len(cases) :: 3]:
            kernel = kernel_for(case[0], case[1], dtype)
            check(emulation, table, row, dtype, case, kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", sorted(EMULATED))
def test_kernels_and_grids(emulation, name, dtype):
    """Every case through its kernel with one thread per unit and with a single block striding
    over all of them, through the block kernel (which takes any layout), and unaligned (by one
    element: only the block kernel takes it), for a plan with two histories and noise; and with
    the noise off, where a channels_last state runs as one flat array."""
    case = EMULATED[name]
    shape, channels_last = case[0], case[1]
    table = plan_table("dpmpp_3m_sde")
    kernel = kernel_for(shape, channels_last, dtype)
    for row, kernel_, grid, offset in [
        (1, kernel, 0, 0),
        (2, kernel, 1, 0),
        (3, "block", 0, 0),
        (2, "block", 3, 1),
    ]:
        check(emulation, table, row, dtype, case, kernel_, grid, offset)
    flat = kernel_for(shape, channels_last, dtype, noise_drawn=False)
    check(emulation, table, 2, dtype, case, flat, stochastic=False)
    check(emulation, table, 2, dtype, case, flat, grid=1, stochastic=False)


def test_auto_picks_the_kernel_named(emulation):
    """`auto` is step_kernel_for's choice, which kernel_for() mirrors: a kernel that does not take
    a problem is refused, naming the one that does."""
    table = unit_noise_table(2)
    x = torch.zeros(2, 4, 6, 8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match=r"the vector kernel does not take this problem.*tile"):
        run_step(
            emulation, torch.float32, x, x, None, x, x, table, torch.tensor(0), kernel="vector"
        )
    with pytest.raises(RuntimeError, match=r"does not take this problem.*picks the block"):
        run_step(
            emulation,
            torch.float32,
            x,
            x,
            None,
            x,
            x,
            table,
            torch.tensor(0),
            kernel="tile",
            offset=1,
        )
    for kernel in ("auto", "tile"):
        run_step(emulation, torch.float32, x, x, None, x, x, table, torch.tensor(0), kernel=kernel)


@pytest.mark.parametrize("kernel", ["auto", "block"])
@pytest.mark.parametrize(
    "shape, channels_last, seed, offset, counter",
    [*NOISE_CASES, ((2, 8, 20, 18), True, 9, 0, 1)],  # the last: 3 fp32 tiles per sample
)
def test_noise_matches_spec(emulation, kernel, shape, channels_last, seed, offset, counter):
    x = torch.zeros(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    table = unit_noise_table(counter + 1)
    c = torch.tensor(counter)
    kw = dict(seed=seed, sample_offset=offset)
    z, _ = run_step(emulation, torch.float32, x, x, None, x, x, table, c, kernel=kernel, **kw)
    ref = noise.randn_like_batch(seed, counter + 1, shape, sample_offset=offset)
    torch.testing.assert_close(z, ref, atol=NOISE_ATOL, rtol=2.5e-7)
    assert z.stride() == x.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((1, 1823), False),
        ((2, 4, 6, 8), False),  # 4 values per store
        ((3, 5, 7, 11), True),
        ((2, 4, 6, 8), True),  # tiles
        ((3, 16, 10, 12), True),  # tiles, several per sample
        ((1, 512, 2, 2), True),  # 16-bit: one tile; fp32: too many channels for one
    ],
)
def test_gaussian_matches_spec(emulation, dtype, shape, channels_last):
    """gaussian_ (x_T) on each of its kernels, one thread per unit and one block for all, and
    unaligned (the per-element stores)."""
    ref = noise.randn_like_batch(21, 0, shape, sample_offset=2) * 1.5
    for grid, offset in [(0, 0), (1, 0), (0, 1)]:
        out = torch.empty(shape, dtype=dtype)
        if channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        emulation.gaussian_(out, 21, 0, 2, 1.5, "auto", grid, offset)
        torch.testing.assert_close(out, ref.to(dtype), atol=1.5 * NOISE_ATOL, rtol=2.5e-7)
    x = torch.empty(shape, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tiled = kernel_for(shape, channels_last, dtype) == "tile"
    emulation.gaussian_(x, 21, 0, 2, 1.5, "tile" if tiled else "block", 0, 0)
    with pytest.raises(RuntimeError, match="kernel does not take this output"):
        emulation.gaussian_(x, 21, 0, 2, 1.5, "block" if tiled else "tile", 0, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", ["2x4x6x8", "2x4x6x8-cl", "3x5x7x11-cl"])
def test_nonfinite_flag(emulation, name, dtype):
    """The row's flag is set by whichever thread stores a non-finite x_next (the last element
    of the last sample: the last thread of the grid), and only that row's."""
    shape, channels_last = EMULATED[name][:2]
    table = unit_noise_table(3)
    table[:, Col.X_X] = 1.0
    x = torch.zeros(shape).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    kernel = kernel_for(shape, channels_last, dtype)
    for bad, expect in [(None, [0, 0, 0]), (float("nan"), [0, 1, 0]), (float("inf"), [0, 1, 0])]:
        xb = x.clone()
        if bad is not None:
            xb[(-1,) * xb.dim()] = bad  # the last element in memory, either layout
        flags = torch.zeros(3, dtype=torch.int32)
        for grid in (0, 1):
            run_step(
                emulation,
                dtype,
                xb,
                x,
                None,
                x,
                x,
                table,
                torch.tensor(1),
                kernel=kernel,
                grid=grid,
                nonfinite=flags,
            )
        assert flags.tolist() == expect


@pytest.mark.parametrize(
    "fault, error",
    [
        (1, "never reach"),
        (2, "divergent barrier"),
        (3, "wrote outside out"),
        (4, "device assertion"),
    ],
)
def test_emulation_reports_faults(emulation, fault, error):
    """The emulation's own checks fail where they must: a kernel with each fault is reported;
    without one, a value read through shared memory after the barrier is the neighbour's."""
    with pytest.raises(RuntimeError, match=error):
        emulation.fault(fault, 600)
    assert torch.equal(
        emulation.fault(0, 600), ((torch.arange(600) % THREADS + 1) % THREADS).float()
    )


def test_guards_poison_reads_past_the_end(emulation):
    """Inputs sit between NaN guards: a value read outside an input reaches the output as NaN."""
    out = emulation.fault(5, 600)
    assert out[-1].isnan() and not out[:-1].isnan().any()


def test_row_out_of_range_trips_the_device_assertion(emulation):
    table = unit_noise_table(2)
    x = torch.ones(3, 5, 7, 11)
    with pytest.raises(
        RuntimeError, match=re.escape("device assertion `index >= 0 && index < a.rows`")
    ):
        run_step(emulation, torch.float32, x, x, None, x, x, table, torch.tensor(2), kernel="block")


# GroupNorm+SiLU: (shape, groups, channels_last, clusters, offset, the plan's blocks per group)
GN_CASES = {
    "block-per-group": ((2, 32, 8, 8), 4, False, True, 0, 1),
    "block-per-group-cl": ((2, 32, 8, 8), 4, True, True, 0, 1),
    "cluster-3": ((1, 16, 24, 28), 1, False, True, 0, 3),
    "cluster-3-cl": ((1, 16, 24, 28), 1, True, True, 0, 3),
    "cluster-8": ((1, 16, 48, 48), 1, False, True, 0, 8),  # more runs per thread than cached
    "cluster-8-cl": ((1, 16, 48, 48), 1, True, True, 0, 8),
    "two-launch": ((1, 16, 48, 48), 1, False, False, 0, 9),
    "two-launch-cl": ((1, 16, 48, 48), 1, True, False, 0, 9),
    "odd-cluster-8": ((1, 60, 45, 47), 2, False, True, 0, 8),  # 2115 positions: runs of 1
    "odd-two-launch-cl": ((1, 60, 45, 47), 2, True, False, 0, 16),  # 30 per group: runs of 2
    "10-per-group-cl": ((1, 40, 8, 8), 4, True, True, 0, 1),  # SD1.5's: runs of 2
    "20-per-group-cl": ((1, 80, 8, 8), 4, True, True, 0, 1),  # runs of 4
    "unaligned-cluster-3": ((1, 16, 24, 28), 1, False, True, 1, 3),  # runs of 1
    "unaligned-cl": ((2, 32, 8, 8), 4, True, True, 1, 1),
}


def expected_run(shape, groups, channels_last, offset, dtype) -> int:
    """group_norm_silu_kernels.cuh's run_length."""
    vector = 128 // torch.finfo(dtype).bits
    if offset:
        return 1
    if not channels_last:
        return vector if (shape[2] * shape[3]) % vector == 0 else 1
    run = vector
    while run > 1 and (shape[1] % run or (shape[1] // groups) % run):
        run //= 2
    return run


def check_group_norm(emulation, name, dtype, conditioning):
    shape, groups, channels_last, clusters, offset, splits = GN_CASES[name]
    (x, _, w, b), cond = inputs(shape, groups, dtype, conditioning, channels_last)
    out, (run, planned, _, cache) = emulation.group_norm_silu(
        x,
        groups,
        w.float(),  # the op's affine parameters are fp32 (fastdiff.ops.group_norm_silu converts)
        b.float(),
        1e-5,
        cond.get("scale_shift"),
        cond.get("residual"),
        clusters,
        offset,
    )
    assert (planned, run) == (splits, expected_run(shape, groups, channels_last, offset, dtype))
    assert (cache == 0) == (not clusters and splits > 1)  # the two-launch path
    assert out.shape == x.shape and out.dtype == dtype and out.stride() == x.stride()
    as64 = lambda t: t.double() if torch.is_tensor(t) else t
    ref = group_norm_silu_reference(
        as64(x), groups, as64(w), as64(b), **{k: as64(v) for k, v in cond.items()}
    )
    assert_within_tolerance(out, ref, torch_group_norm_silu(x, groups, w, b, **cond))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", sorted(GN_CASES))
def test_group_norm_silu_plans(emulation, name, dtype):
    """Each plan and run length against the fp64 reference, the conditionings taken in turn."""
    conditioning = CONDITIONING[sorted(GN_CASES).index(name) % len(CONDITIONING)]
    check_group_norm(emulation, name, dtype, conditioning)


@pytest.mark.parametrize("conditioning", CONDITIONING)
@pytest.mark.parametrize("name", ["cluster-3-cl", "two-launch", "10-per-group-cl"])
def test_group_norm_silu_conditioning(emulation, name, conditioning):
    """Every conditioning (scale-shift, a per-channel residual loaded as vectors of channels, a
    full residual) on a cluster, the two-launch path and short channels_last runs."""
    check_group_norm(emulation, name, torch.float16, conditioning)


def test_group_norm_silu_sample_is_independent_of_its_batch(emulation):
    """The plan depends on the group's size only: a sample's output is the same bits whatever
    the batch it is in, on the cluster path too."""
    (x, groups, w, b), _ = inputs((3, 16, 24, 28), 1, torch.float32, "none", True)
    whole, plan = emulation.group_norm_silu(x, groups, w, b, 1e-5, None, None, True, 0)
    assert plan[1] == 3
    one, _ = emulation.group_norm_silu(x[1:2], groups, w, b, 1e-5, None, None, True, 0)
    assert torch.equal(one, whole[1:2])
