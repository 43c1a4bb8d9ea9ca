"""one UNet forward: fastdiff's UNet vs the same weights in diffusers (eager, torch.compile,
stable-fast)"""

from __future__ import annotations

import copy

import torch
from harness import Case, Contender, Context, Skip

from fastdiff.ops import use
from sections._shared import (
    DIFFUSERS_TWINS,
    diffusers,
    dtype_name,
    models,
    stable_fast,
    stable_fast_scope,
    unet_class,
)

NOTES = (
    "FLOPs per forward counted by torch.utils.flop_counter on the reference path (convolutions, "
    "matmuls, attention); % roofline = FLOPs at the probed matmul peak of the dtype / time.",
    "diffusers+fastdiff: diffusers' own model with fastdiff.adapters.diffusers.accelerate() "
    "(fused attention and GroupNorm+SiLU). Presets without a diffusers twin (digits) are "
    "compared with fastdiff's UNet on the reference ops.",
    "diffusers+stable-fast: diffusers' model compiled by stable-fast 1.0.5 (compile_unet, "
    "CompilationConfig.Default(); on CUDA with its CUDA graphs and Triton kernels), when it is "
    "installed (benchmarks/README.md).",
    "fastdiff channels_last: the same UNet with weights and input in channels_last (NHWC) "
    "memory order, which cuDNN's tensor-core (and oneDNN's) convolutions use natively.",
)
CONTEXT_LEN = 77  # CLIP text tokens, for the cross-attention preset
# (preset, batch, dtype) per device
CASES = {
    "cuda": [
        ("ddpm-cifar10", 1, torch.float16),
        ("ddpm-cifar10", 256, torch.float16),
        ("sd-like", 2, torch.float16),
    ],
    "cpu": [("digits", 64, torch.float32), ("ddpm-cifar10", 8, torch.float32)],
    "cpu-quick": [("digits", 16, torch.float32), ("ddpm-cifar10", 1, torch.float32)],
}


def cases(ctx: Context) -> list[Case]:
    unet_class()  # Skip the section while fastdiff.models is missing
    key = "cpu-quick" if ctx.quick and not ctx.cuda else ctx.device.type
    return [_case(ctx, *c) for c in CASES[key]]


def inputs(preset: str, batch: int, device, dtype, seed: int = 0) -> dict:
    """Keyword inputs of one forward: x (B, C, H, W), t (B,) and, for cross-attention, context."""
    unet_class()
    from fastdiff.models import PRESETS

    c = PRESETS[preset]
    g = torch.Generator(device="cpu").manual_seed(seed)
    randn = lambda *shape: torch.randn(shape, generator=g, device="cpu").to(device, dtype)
    out = {
        "x": randn(batch, c.in_channels, c.sample_size, c.sample_size),
        "t": torch.full((batch,), 500.0, device=device),
    }
    if c.context_dim is not None:
        out["context"] = randn(batch, CONTEXT_LEN, c.context_dim)
    return out


def forward_flops(preset: str, batch: int) -> int:
    """FLOPs of one forward, counted on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = unet_class().from_preset(preset)
        kw = inputs(preset, batch, "meta", torch.float32)
        with use("reference"), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(kw.pop("x"), kw.pop("t"), **kw)
    return counter.get_total_flops()


def call_diffusers(twin, x, t, context=None):
    kw = {} if context is None else {"encoder_hidden_states": context}
    return twin(x, t, return_dict=False, **kw)[0]


def _case(ctx, preset, batch, dtype) -> Case:
    kw = lambda: inputs(preset, batch, ctx.device, dtype)
    ours = lambda: models(preset, ctx.device, dtype)[0]
    twin = lambda: models(preset, ctx.device, dtype)[1]
    contenders = []
    if preset in DIFFUSERS_TWINS:
        contenders.append(Contender("diffusers", lambda: _bind(call_diffusers, twin(), kw()), True))
        if ctx.cuda or not ctx.quick:
            contenders.append(
                Contender("diffusers+compile", lambda: _compiled(ctx, twin(), kw()), True, warmup=3)
            )
            sfast = lambda: _bind(call_diffusers, stable_fast(twin(), ctx.device), kw())
            contenders.append(
                Contender("diffusers+stable-fast", sfast, True, warmup=3, scope=stable_fast_scope)
            )
    else:
        on_reference = lambda: use("reference")
        fn = lambda: _bind(_call, ours(), kw())
        contenders.append(Contender("fastdiff-reference-ops", fn, True, scope=on_reference))
    contenders.append(Contender("fastdiff", lambda: _bind(_call, ours(), kw())))
    # cuDNN's tensor-core convolutions work in NHWC (NCHW costs transposes); oneDNN's too
    contenders.append(
        Contender("fastdiff channels_last", lambda: _bind(_call, *_channels_last(ours(), kw())))
    )
    if preset in DIFFUSERS_TWINS and not ctx.quick:
        contenders.append(Contender("diffusers+fastdiff", lambda: _accelerated(twin(), kw())))
    return Case(
        f"{preset} batch {batch} {dtype_name(dtype)}",
        contenders,
        params=dict(preset=preset, batch=batch, dtype=str(dtype)),
        unit="forward",
        flops=forward_flops(preset, batch),
        dtype=dtype,
    )


def _call(model, x, t, context=None):
    return model(x, t) if context is None else model(x, t, context=context)


def _channels_last(model, kw):
    """A channels_last copy of the model (Module.to converts in place: the cached model the
    other contenders and cases share stays NCHW) and its input."""
    x = kw["x"].contiguous(memory_format=torch.channels_last)
    return copy.deepcopy(model).to(memory_format=torch.channels_last), dict(kw, x=x)


def _bind(fn, model, kw):
    return lambda: fn(model, **kw)


def _compiled(ctx, twin, kw):
    torch._dynamo.reset()
    mode = "reduce-overhead" if ctx.cuda else None  # CUDA graphs on a GPU
    compiled = torch.compile(twin, mode=mode)

    def forward():
        if ctx.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return call_diffusers(compiled, **kw)

    return forward


def _accelerated(twin, kw):
    try:
        from fastdiff.adapters.diffusers import accelerate
    except ImportError as e:
        raise Skip(f"fastdiff.adapters.diffusers is not available ({e})") from None
    diffusers()
    model = accelerate(copy.deepcopy(twin))
    return _bind(call_diffusers, model, kw)
