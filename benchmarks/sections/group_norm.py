"""fused GroupNorm(32)+SiLU: fastdiff.ops.group_norm_silu vs torch (eager, torch.compile)"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from harness import Case, Contender, Context

from fastdiff.ops.group_norm_silu import (
    BENCH_SHAPES,
    GROUP_NORM_SILU,
    group_norm_silu,
    group_norm_silu_bytes,
)
from sections._shared import dtype_name

NOTES = (
    "bytes = 2 x numel x itemsize (read x once, write the output once); % roofline = those "
    "bytes at the probed copy bandwidth / time. Ratios are against the fastest torch baseline.",
)
GROUPS, EPS = 32, 1e-5
CPU_SHAPES = {"cifar-64x128x32x32": (64, 128, 32, 32), "sd15-2x320x64x64": (2, 320, 64, 64)}
CPU_QUICK_SHAPES = {"small-8x128x32x32": (8, 128, 32, 32), "sd15-2x320x16x16": (2, 320, 16, 16)}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def torch_group_norm_silu(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def cases(ctx: Context) -> list[Case]:
    if ctx.cuda:
        shapes, dtype = BENCH_SHAPES, torch.float16
    else:
        shapes, dtype = (CPU_QUICK_SHAPES if ctx.quick else CPU_SHAPES), torch.float32
    compile_too = ctx.cuda or not ctx.quick
    return [
        _case(ctx, name, shape, layout, dtype, compile_too)
        for name, shape in shapes.items()
        for layout in LAYOUTS
    ]


def _case(ctx, name, shape, layout, dtype, compile_too) -> Case:
    fmt = LAYOUTS[layout]
    numel = torch.Size(shape).numel()
    n_sets = ctx.rotations(2 * numel * dtype.itemsize)

    def inputs():
        make = lambda: torch.randn(shape, device=ctx.device, dtype=dtype).to(memory_format=fmt)
        w = 1 + 0.1 * torch.randn(shape[1], device=ctx.device, dtype=dtype)
        b = 0.1 * torch.randn(shape[1], device=ctx.device, dtype=dtype)
        return [(make(), w, b) for _ in range(n_sets)]

    contenders = [Contender("torch", lambda: _cycle(torch_group_norm_silu, inputs()), True)]
    if compile_too:
        contenders.append(Contender("torch.compile", lambda: _compiled(inputs()), True, warmup=2))
    probe = torch.empty(shape[0], shape[1], 4, 4, device=ctx.device, dtype=dtype)
    probe = probe.to(memory_format=fmt)
    ok = [
        b
        for b in GROUP_NORM_SILU.names
        if not GROUP_NORM_SILU.why_not(b, probe, GROUPS, None, None, EPS, None, None)
    ]
    fused = [b for b in ok if b != "reference"]
    if not fused:
        ctx.note(f"no fused GroupNorm+SiLU backend runs on {ctx.device.type}: fastdiff = reference")
    for backend in fused or ["reference"]:
        op = lambda x, w, b, backend=backend: group_norm_silu(x, GROUPS, w, b, EPS, backend=backend)
        contenders.append(Contender(f"fastdiff-{backend}", lambda op=op: _cycle(op, inputs())))
    return Case(
        f"{name} {layout} {dtype_name(dtype)}",
        contenders,
        params=dict(shape=list(shape), layout=layout, dtype=str(dtype), sets=n_sets),
        bytes=group_norm_silu_bytes(torch.empty(shape, dtype=dtype, device="meta")),
        compare="best",
    )


def _cycle(op, sets):
    nxt = itertools.cycle(sets).__next__
    return lambda: op(*nxt())


def _compiled(sets):
    torch._dynamo.reset()  # a fresh cache: one compilation per shape and layout
    return _cycle(torch.compile(torch_group_norm_silu, dynamic=False), sets)
