"""Drive fastdiff's CUDA C++ kernels over awkward shapes for compute-sanitizer, and check each
result against the reference so that a run is also a correctness check:

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 scripts/sanitize_kernels.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_kernels.py \
        --only group_norm tiles noise                      # the kernels with shared memory
    python3 scripts/sanitize_kernels.py --backend cpu     # the same calls on the C++ CPU kernels

Shapes: 1823 elements (no multiple of any vector width), 3x5x7x11, 2x4x64x64; fp32/fp16/bf16;
NCHW and channels_last; every sampler (with and without history, noise, guidance and clamp);
channels_last tiles of the noise (several per block, and one partial);
the noise alone (gaussian_, also into a view that starts off a 16-byte boundary); GroupNorm+SiLU
on both run paths, with and without thread block clusters.

Inputs are drawn on the CPU and the references computed there, so that the device runs little
besides the kernels under test (each device kernel costs the sanitizer instrumentation and time);
the parts run in the order of --only (default: group_norm tiles noise step, the kernels with
shared memory first), so a run cut short has checked those.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdiff import Schedule
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_reference
from fastdiff.ops.noise import gaussian_, gaussian_reference
from fastdiff.ops.step import step, step_reference
from fastdiff.samplers import SAMPLERS, build_plan

SHAPES = [(1, 1823), (3, 5, 7, 11), (2, 4, 64, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """out (on the device under test) against ref (on the CPU)."""
    atol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    out, ref = out.cpu().float(), ref.float()
    err = (out - ref).abs().max().item()
    if not err <= atol * (1 + ref.float().abs().max().item()):
        raise SystemExit(f"{name}: max |fused - reference| = {err:.3g}")


def rand(shape, dtype, channels_last: bool, g: torch.Generator) -> torch.Tensor:
    """On the CPU, from g (a CPU generator)."""
    t = torch.randn(shape, generator=g).to(dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def on(dev: torch.device, *tensors):
    """CPU tensors on dev, layout kept (None stays None)."""
    return [None if t is None else t.to(dev) for t in tensors]


def run_step(dev: torch.device, backend: str) -> int:
    schedule = Schedule.stable_diffusion()
    kw = dict(seed=7, sample_offset=3, guidance=2.5, clamp=(-1.0, 1.0))
    calls = 0
    for sampler in SAMPLERS:
        plan = build_plan(sampler, schedule, 6)
        table = plan.table.float()
        table_d = table.to(dev)
        for shape in SHAPES:
            for dtype in DTYPES:
                for channels_last in (False, True) if len(shape) == 4 else (False,):
                    g = torch.Generator().manual_seed(calls)
                    x, y, yu = (rand(shape, dtype, channels_last, g) for _ in range(3))
                    hs = [
                        rand(shape, dtype, channels_last, g) if k < plan.n_history else None
                        for k in range(2)
                    ]
                    x_d, y_d, yu_d, *hs_d = on(dev, x, y, yu, *hs)
                    flags = torch.zeros(plan.rows, dtype=torch.int32, device=dev)
                    fused = dict(kw, backend=backend, nonfinite=flags)
                    for row in range(plan.rows):
                        counter = torch.tensor(row)
                        # the reference from the histories as the kernel finds them
                        h_ref = [h.cpu().clone() if h is not None else None for h in hs_d]
                        ref = step_reference(x, y, yu, *h_ref, table, counter, **kw)
                        out = step(x_d, y_d, yu_d, *hs_d, table_d, counter.to(dev), **fused)
                        check(f"step {sampler} {shape} {dtype} row {row}", out, ref, dtype)
                        if flags[row] != (not torch.isfinite(out).all()):
                            raise SystemExit(f"step {sampler} {shape}: flags {flags.tolist()}")
                        for h, hr in zip(hs_d, h_ref):
                            if h is not None:
                                check(f"history {sampler} {shape} {dtype}", h, hr, dtype)
                        calls += 1
                    # a NaN in the model output's last element: the kernel writes the flag
                    y_bad, flags = y_d.clone(), torch.zeros_like(flags)
                    y_bad[(-1,) * y.dim()] = float("nan")
                    hs_bad = [h.clone() if h is not None else None for h in hs_d]
                    counter = torch.tensor(0, device=dev)
                    bad = dict(backend=backend, nonfinite=flags)  # no clamp: the NaN stays
                    step(x_d, y_bad, None, *hs_bad, table_d, counter, **bad)
                    if flags.tolist() != [1] + [0] * (plan.rows - 1):
                        raise SystemExit(f"step {sampler} {shape} NaN: flags {flags.tolist()}")
                    calls += 1
    return calls


# channels_last with noise, 2^k channels (the CUDA tile kernels): more tiles than a wave of
# resident blocks (each block reuses its shared noise buffer: racecheck sees the barriers), and
# a sample smaller than one tile of 16 channels
TILE_SHAPES = [((8, 4, 256, 256), torch.float32), ((2, 16, 6, 10), torch.float16)]


def run_step_tiles(dev: torch.device, backend: str) -> int:
    plan = build_plan("ddpm", Schedule.stable_diffusion(), 6)
    table, counter = plan.table.float(), torch.tensor(2)
    for shape, dtype in TILE_SHAPES:
        g = torch.Generator().manual_seed(1)
        x, y = (rand(shape, dtype, True, g) for _ in range(2))
        x_d, y_d, table_d, counter_d = on(dev, x, y, table, counter)
        out = step(x_d, y_d, None, None, None, table_d, counter_d, seed=5, backend=backend)
        ref = step_reference(x, y, None, None, None, table, counter, seed=5)
        check(f"step tiles {shape} {dtype}", out, ref, dtype)
    return len(TILE_SHAPES)


def run_gaussian(dev: torch.device, backend: str) -> int:
    """x_T of every shape, dtype and layout, the channels_last tile cases, and once into a view
    whose data starts 4 bytes past an aligned address (the 4-value stores must not be taken
    there)."""

    def draw(shape, dtype, channels_last, *args, **kwargs):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.full(shape, float("nan"), dtype=dtype, device=dev)
        out = out.contiguous(memory_format=fmt)
        ref = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
        gaussian_(out, *args, backend=backend, **kwargs)
        return out, gaussian_reference(ref, *args, **kwargs)

    calls = 0
    for shape in SHAPES:
        for dtype in DTYPES:
            for channels_last in (False, True) if len(shape) == 4 else (False,):
                out, ref = draw(shape, dtype, channels_last, 7, 0, sample_offset=3, scale=14.6)
                check(f"gaussian_ {shape} {dtype} channels_last={channels_last}", out, ref, dtype)
                calls += 1
    for shape, dtype in TILE_SHAPES:  # the tile kernel's awkward cases, as for the step
        out, ref = draw(shape, dtype, True, 7, 2, sample_offset=1, scale=-3.0)
        check(f"gaussian_ tiles {shape} {dtype}", out, ref, dtype)
        calls += 1
    storage = torch.full((1 + 2 * 4 * 8 * 8,), float("nan"), device=dev)
    out = storage[1:].view(2, 4, 8, 8)
    gaussian_(out, 7, 5, backend=backend)
    ref = gaussian_reference(torch.empty(2, 4, 8, 8), 7, 5)
    check("gaussian_ unaligned", out, ref, out.dtype)
    return calls + 1


# odd sizes (element-wise path); 16-byte runs in NCHW only, and in both layouts (vector path);
# channels_last runs of 2 and 4 channels (2, 10 and 20 per group); two large groups, each split
# over a cluster of blocks, more runs than the registers hold
GROUP_NORM_SHAPES = [
    ((1, 8, 5, 7), 4),
    ((2, 64, 33, 17), 32),
    ((2, 320, 16, 16), 32),
    ((2, 640, 8, 8), 32),
    ((2, 256, 8, 8), 16),
    ((1, 64, 96, 96), 2),
    ((1, 60, 45, 47), 2),
]


def run_group_norm(dev: torch.device, backend: str, shapes=GROUP_NORM_SHAPES) -> int:
    calls = 0
    for shape, groups in shapes:
        for dtype in DTYPES:
            for channels_last in (False, True):
                g = torch.Generator().manual_seed(calls)
                x = rand(shape, dtype, channels_last, g)
                w, b = (torch.randn(shape[1], generator=g).to(dtype) for _ in range(2))
                ss = torch.randn(shape[0], 2 * shape[1], generator=g).to(dtype)
                args = on(dev, x, w, b)
                out = group_norm_silu(
                    args[0], groups, *args[1:], 1e-5, scale_shift=ss.to(dev), backend=backend
                )
                ref = group_norm_silu_reference(x, groups, w, b, 1e-5, ss)
                check(f"group_norm_silu {shape} {dtype}", out, ref, dtype)
                calls += 1
    return calls


def run_group_norm_without_clusters(dev: torch.device, backend: str) -> int:
    """The two large groups again, as on a GPU before Hopper: the two-launch path."""
    os.environ["FASTDIFF_CUDA_CLUSTERS"] = "0"
    try:
        return run_group_norm(dev, backend, GROUP_NORM_SHAPES[-2:])
    finally:
        del os.environ["FASTDIFF_CUDA_CLUSTERS"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["cuda", "triton", "cpu"], default="cuda")
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(PARTS),
        default=list(PARTS),
        metavar="PART",
        help=f"what to run, in this order (default: {' '.join(PARTS)})",
    )
    args = p.parse_args(argv)
    dev = torch.device("cpu" if args.backend == "cpu" else "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"sanitize_kernels.py: --backend {args.backend} needs a CUDA device", file=sys.stderr)
        return 2
    counts = {}
    for part in args.only:
        op, run = PARTS[part]
        counts[op] = counts.get(op, 0) + sum(f(dev, args.backend) for f in run)
        print(f"{args.backend}: {part} done", file=sys.stderr, flush=True)
    done = ", ".join(f"{op} {n} calls" for op, n in counts.items())
    print(f"{args.backend}: {done}, all equal")
    return 0


# part: (op, what runs it)
PARTS = {
    "group_norm": ("group_norm_silu", (run_group_norm, run_group_norm_without_clusters)),
    "tiles": ("step", (run_step_tiles,)),
    "noise": ("gaussian_", (run_gaussian,)),
    "step": ("step", (run_step,)),
}


if __name__ == "__main__":
    sys.exit(main())
