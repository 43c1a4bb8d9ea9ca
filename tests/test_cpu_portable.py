"""The C++ CPU kernels' portable loops, which every CPU without AVX2 and F16C (aarch64, older
x86) runs, and the AVX2 paths that an AVX2-only CPU runs, give the same bits as the intrinsics
paths this machine takes: the AVX-512 (or AVX2) Philox words, and F16C's fp16 conversions
(c10::Half's scalar ones round to nearest even too). FASTDIFF_CPU_KERNELS=portable forces the
portable loops, =avx2 passes over the AVX-512 ones; it is read once per process, so each path
runs in a subprocess."""

import os
import subprocess
import sys

import pytest
import torch

from fastdiff import noise
from fastdiff.ops.group_norm_silu import GROUP_NORM_SILU
from fastdiff.ops.noise import gaussian_op
from fastdiff.ops.step import step_op

NOISE_ATOL = 1e-6  # noise.py: fp32 noise of two correct backends agrees to 1e-6
NOISE_CASE = dict(seed=2**64 - 5, step=2**32 - 2, sample_offset=2**32 - 7)

# Every CPU kernel on inputs that leave 8-lane tails (3x5x7x11) and several chunks of 64 Philox
# blocks with a partial one (3x5x7x737); fp32, fp16 and bf16; NCHW and channels_last.
RUN = """
import sys, torch
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.noise import gaussian_
from fastdiff.ops.step import step
from fastdiff.samplers import build_plan
from fastdiff.schedules import Schedule

seed, s, offset = (int(v) for v in sys.argv[2:5])
x_T = gaussian_(torch.empty(3, 5, 7, 737), seed, s, sample_offset=offset, backend="cpu")
results = {"x_T": x_T}
g = torch.Generator().manual_seed(0)
plan = build_plan("dpmpp_3m_sde", Schedule.from_betas("linear"), 5)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for fmt in (torch.contiguous_format, torch.channels_last):
        name = f"{dtype} {fmt}"
        make = lambda shape: torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
        results[f"x_T {name}"] = gaussian_(make((2, 3, 5, 9)), 3, 0, scale=14.6, backend="cpu")
        x, y, yu, h0, h1 = (make((3, 5, 7, 11)) for _ in range(5))
        for row in range(plan.rows):  # noisy rows, both histories read and written
            out = step(x, y, yu, h0, h1, plan.table, torch.tensor(row), seed=7, guidance=3.0,
                       clamp=(-2.0, 2.0), backend="cpu")
            results[f"step {name} {row}"] = torch.stack([out, h0, h1])
        if dtype != torch.bfloat16:
            x, res = make((2, 64, 7, 9)) + 2, make((2, 64, 7, 9))
            w, b = torch.randn(64, generator=g).to(dtype), torch.randn(64, generator=g).to(dtype)
            results[f"gn {name}"] = group_norm_silu(x, 32, w, b, 1e-5, residual=res, backend="cpu")
torch.save(results, sys.argv[1])
"""


def run(tmp_path, choice: str | None):
    env = {k: v for k, v in os.environ.items() if k != "FASTDIFF_CPU_KERNELS"}
    if choice is not None:
        env["FASTDIFF_CPU_KERNELS"] = choice
    path = tmp_path / f"{choice}.pt"
    args = [str(v) for v in NOISE_CASE.values()]
    proc = subprocess.run(
        [sys.executable, "-c", RUN, path, *args], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return proc, path


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def test_portable_loops_give_the_same_bits(tmp_path):
    for op in (step_op, gaussian_op, GROUP_NORM_SILU):
        reason = op.get("cpu").ready()
        if reason:
            pytest.skip(f"cpu: {reason}")
    results = []
    for choice in (None, "avx2", "portable"):
        proc, path = run(tmp_path, choice)
        assert proc.returncode == 0, proc.stderr
        results.append(torch.load(path))
    default, *others = results
    assert len(default) == 1 + 6 + 6 * 5 + 4
    for other in others:
        assert default.keys() == other.keys()
        for key, value in default.items():
            assert torch.equal(bits(value), bits(other[key])), key
    x_T = default["x_T"]
    ref = noise.randn_like_batch(
        NOISE_CASE["seed"], NOISE_CASE["step"], x_T.shape, sample_offset=NOISE_CASE["sample_offset"]
    )
    torch.testing.assert_close(x_T, ref, atol=NOISE_ATOL, rtol=2.5e-7)


def test_bad_choice_is_an_error(tmp_path):
    reason = step_op.get("cpu").ready()
    if reason:
        pytest.skip(f"cpu: {reason}")
    proc, _ = run(tmp_path, "fast")
    assert proc.returncode != 0
    assert 'FASTDIFF_CPU_KERNELS must be unset, "avx2" (no AVX-512 paths) or "portable"' in (
        proc.stderr
    )
    assert 'got "fast"' in proc.stderr
