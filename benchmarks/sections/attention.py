"""fastdiff.ops.attention vs every torch SDPA backend"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import torch
import torch.nn.functional as F
from harness import Case, Contender, Context, Skip, first_line

from fastdiff.ops.attention import ATTENTION, BENCH_SHAPES, attention, attention_flops
from sections._shared import dtype_name

NOTES = (
    "FLOPs = 4 x batch*heads x Lq x Lkv x d (two matmuls); % roofline = FLOPs at the probed "
    "matmul peak of the dtype / time. Ratios are against the fastest SDPA backend of the case.",
    "On CUDA, `triton MxN wW sS` rows time the same kernel with the other tilings of "
    "kernels/attention.py's TILE_CANDIDATES (BLOCK_M x BLOCK_N, warps, pipeline stages): the "
    "data for choosing launch_config's defaults.",
)
# name: (batch * heads, Lq, Lkv, head dim). On a GPU: TARGETS.md's shapes; on a CPU: small ones
CPU_SHAPES = {
    "self-d40": (8, 1024, 1024, 40),
    "cross-d40": (8, 1024, 77, 40),
    "ddpm-cifar10-d256": (16, 256, 256, 256),
}
CPU_QUICK_SHAPES = {
    "self-d40": (8, 256, 256, 40),
    "cross-d40": (8, 256, 77, 40),
    "ddpm-cifar10-d256": (4, 64, 64, 256),
}


def _sdpa_backends(cuda: bool) -> dict[str, object]:
    """name -> torch's SDPBackend; the fused ones on CUDA only ("sdpa": torch's own choice)."""
    from torch.nn.attention import SDPBackend

    if not cuda:
        return {"sdpa": None, "sdpa-math": SDPBackend.MATH}
    return {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }


def cases(ctx: Context) -> list[Case]:
    if ctx.cuda:
        shapes, dtype = BENCH_SHAPES, torch.float16
    else:
        shapes, dtype = (CPU_QUICK_SHAPES if ctx.quick else CPU_SHAPES), torch.float32
    return [_case(ctx, name, *shape, dtype) for name, shape in shapes.items()]


def _case(ctx, name, bh, lq, lkv, d, dtype) -> Case:
    set_bytes = (2 * bh * lq * d + 2 * bh * lkv * d) * dtype.itemsize  # q, out; k, v
    n_sets = ctx.rotations(set_bytes)

    def inputs():
        make = lambda L: torch.randn(1, bh, L, d, device=ctx.device, dtype=dtype)  # (B, h, L, d)
        return [(make(lq), make(lkv), make(lkv)) for _ in range(n_sets)]

    contenders = []
    for sdpa, backend in _sdpa_backends(ctx.cuda).items():
        scope = contextlib.nullcontext if backend is None else lambda b=backend: _sdpa_kernel(b)
        contenders.append(Contender(sdpa, lambda: _sdpa(inputs()), baseline=True, scope=scope))
    for backend in _fastdiff_backends(ctx, dtype, d):
        fn = lambda b=backend: _fastdiff(b, inputs())
        contenders.append(Contender(f"fastdiff-{backend}", fn))
    if ctx.cuda and dtype != torch.float32:
        from fastdiff.kernels.attention import TILE_CANDIDATES, _pad

        for cfg in TILE_CANDIDATES[_pad(d)]:
            tag = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
            contenders.append(Contender(f"triton {tag}", lambda c=cfg: _tiled(c, inputs())))
    return Case(
        f"{name} {bh}x{lq}x{lkv}x{d} {dtype_name(dtype)}",
        contenders,
        params=dict(batch_heads=bh, lq=lq, lkv=lkv, head_dim=d, dtype=str(dtype), sets=n_sets),
        unit="call",
        flops=attention_flops(bh, lq, lkv, d),
        dtype=dtype,
        compare="best",
    )


def _fastdiff_backends(ctx, dtype, d) -> list[str]:
    """fastdiff's backends that accept this call; the reference only when nothing else does."""
    q = torch.empty(1, 1, 16, d, device=ctx.device, dtype=dtype)
    ok = [b for b in ATTENTION.names if not ATTENTION.why_not(b, q, q, q, d**-0.5)]
    fused = [b for b in ok if b != "reference"]
    if not fused:
        ctx.note(f"no fused attention backend runs on {ctx.device.type}: fastdiff = the reference")
    return fused or ["reference"]


def _sdpa_kernel(backend):
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backend)


def _sdpa(sets):
    q, k, v = sets[0]
    try:
        with warnings.catch_warnings():  # torch warns at length before refusing
            warnings.simplefilter("ignore")
            F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as e:
        raise Skip(first_line(e)) from None
    nxt = itertools.cycle(sets).__next__
    return lambda: F.scaled_dot_product_attention(*nxt())


def _tiled(config, sets):
    from fastdiff.kernels.attention import attention_fwd

    nxt, scale = itertools.cycle(sets).__next__, sets[0][0].shape[-1] ** -0.5
    return lambda: attention_fwd(*nxt(), scale, config=config)


def _fastdiff(backend, sets):
    nxt = itertools.cycle(sets).__next__
    return lambda: attention(*nxt(), backend=backend)
