"""end to end: fastdiff.sample vs a diffusers scheduler loop (eager, torch.compile, stable-fast),
same weights"""

from __future__ import annotations

import inspect

import torch
from harness import Case, Contender, Context

import fastdiff
from sections._shared import (
    DIFFUSERS_TWINS,
    SCHEDULES,
    dtype_name,
    models,
    scheduler,
    shape_name,
    stable_fast,
    stable_fast_scope,
    unet_class,
)
from sections.unet import CONTEXT_LEN, call_diffusers, forward_flops

NOTES = (
    "One run = noise to images: `steps` network evaluations and sampler updates, initial noise "
    "included. The diffusers loop is its pipelines' loop (scheduler.timesteps on the device, "
    "scheduler.step after each UNet call); with guidance both run the cond/uncond pair as one "
    "batch of 2. Presets without a diffusers twin (digits) run fastdiff's UNet inside the "
    "diffusers loop: the ratio is then the sampler loop's alone.",
    "diffusers+stable-fast: the same loop around diffusers' UNet compiled by stable-fast 1.0.5 "
    "(as in the unet section), when it is installed.",
    "fastdiff.sample is timed as a user calls it: with cuda_graph=True it captures the step "
    "graph in every call, and that capture is part of its time.",
    "% roofline = the UNet FLOPs of a run at the probed matmul peak of the dtype / time.",
    "loop: the sampler loop's own cost per step, with a model that returns its input (no "
    "kernel): what a step costs around the network, host time included (diffusers: "
    "scheduler.step; fastdiff: the step op plus the loop).",
)
# (latent, sampler, steps, dtype) per device: the loop's own cost per step
LOOP_CASES = {
    "cuda": [
        ((2, 4, 64, 64), "ddim", 50, torch.float16),
        ((2, 4, 64, 64), "dpmpp_2m", 50, torch.float16),
    ],
    "cpu": [
        ((2, 4, 64, 64), "ddim", 50, torch.float32),
        ((2, 4, 8, 8), "dpmpp_2m", 50, torch.float32),
    ],
}
GUIDANCE = 7.5
# (preset, images, sampler, steps, guided, dtype) per device
CASES = {
    "cuda": [
        ("ddpm-cifar10", 1, "ddim", 50, False, torch.float16),
        ("ddpm-cifar10", 1, "dpmpp_2m", 20, False, torch.float16),
        ("ddpm-cifar10", 256, "ddim", 50, False, torch.float16),
        ("ddpm-cifar10", 256, "dpmpp_2m", 20, False, torch.float16),
        ("sd-like", 1, "ddim", 50, True, torch.float16),  # the UNet runs at batch 2
    ],
    "cpu": [
        ("digits", 64, "ddim", 50, False, torch.float32),
        ("digits", 64, "dpmpp_2m", 20, False, torch.float32),
        ("ddpm-cifar10", 4, "ddim", 10, False, torch.float32),
        ("ddpm-cifar10", 4, "dpmpp_2m", 10, False, torch.float32),
    ],
    "cpu-quick": [
        ("digits", 8, "ddim", 4, False, torch.float32),
        ("digits", 8, "dpmpp_2m", 4, False, torch.float32),
        ("ddpm-cifar10", 1, "ddim", 2, False, torch.float32),
    ],
}
SCHEDULE = {"digits": "linear", "ddpm-cifar10": "linear", "sd-like": "sd"}


def cases(ctx: Context) -> list[Case]:
    unet_class()  # Skip the section while fastdiff.models is missing
    graphs = "cuda_graph" in inspect.signature(fastdiff.sample).parameters
    if ctx.cuda:
        ctx.note(
            "fastdiff.sample runs with cuda_graph=True (fastdiff-eager: cuda_graph=False)"
            if graphs
            else "fastdiff.sample has no cuda_graph option yet: eager loop (no CUDA graph)"
        )
    key = "cpu-quick" if ctx.quick and not ctx.cuda else ctx.device.type
    loops = [_loop_case(ctx, *c, graphs=graphs and ctx.cuda) for c in LOOP_CASES[ctx.device.type]]
    return loops + [_case(ctx, *c, graphs=graphs and ctx.cuda) for c in CASES[key]]


def _identity(x, t, **cond):
    return x


def _loop_case(ctx, shape, sampler, steps, dtype, graphs) -> Case:
    """The loop around a model that costs nothing: per step, diffusers' scheduler.step and
    pipeline loop vs fastdiff's step op and loop."""
    run = dict(ctx=ctx, shape=shape, sampler=sampler, steps=steps, dtype=dtype)
    contenders = [
        Contender("diffusers", lambda: _diffusers_loop(**run, net=_identity), True, per_call=steps)
    ]
    contenders.append(
        Contender(
            "fastdiff", lambda: _fastdiff(**run, model=_identity, graphs=False), per_call=steps
        )
    )
    if graphs:
        graph = lambda: _fastdiff(**run, model=_identity, graphs=True)
        contenders.append(Contender("fastdiff+graph", graph, per_call=steps))
    return Case(
        f"loop {shape_name(shape)} {sampler}-{steps} {dtype_name(dtype)}",
        contenders,
        params=dict(model="identity", sampler=sampler, steps=steps, dtype=str(dtype)),
        unit="step",
        dtype=dtype,
    )


def _case(ctx, preset, images, sampler, steps, guided, dtype, graphs) -> Case:
    from fastdiff.models import PRESETS

    cfg = PRESETS[preset]
    shape = (images, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    batch = 2 * images if guided else images
    cond = {}
    if guided:
        g = torch.Generator(device="cpu").manual_seed(1)
        emb = lambda: torch.randn(images, CONTEXT_LEN, cfg.context_dim, generator=g)
        cond = {"cond": {"context": emb()}, "uncond": {"context": emb()}}
    run = dict(
        ctx=ctx, preset=preset, shape=shape, sampler=sampler, steps=steps, dtype=dtype, cond=cond
    )
    contenders = [Contender("diffusers", lambda: _diffusers_loop(**run), True, profile_steps=steps)]
    if (ctx.cuda or not ctx.quick) and preset in DIFFUSERS_TWINS:
        contenders.append(
            Contender(
                "diffusers+compile",
                lambda: _diffusers_loop(**run, compiled=True),
                True,
                warmup=2,
            )
        )
        sfast = lambda: _diffusers_loop(**run, compiled="stable-fast")
        contenders.append(
            Contender("diffusers+stable-fast", sfast, True, warmup=2, scope=stable_fast_scope)
        )
    contenders.append(
        Contender("fastdiff", lambda: _fastdiff(**run, graphs=graphs), profile_steps=steps)
    )
    if graphs:  # what the CUDA graph buys
        contenders.append(Contender("fastdiff-eager", lambda: _fastdiff(**run, graphs=False)))
    name = f"{preset} {shape_name(shape)} {sampler}-{steps}{' cfg' if guided else ''}"
    return Case(
        f"{name} {dtype_name(dtype)}",
        contenders,
        params=dict(
            preset=preset,
            images=images,
            unet_batch=batch,
            sampler=sampler,
            steps=steps,
            guidance=GUIDANCE if guided else None,
            dtype=str(dtype),
            schedule=SCHEDULE[preset],
        ),
        unit="run",
        flops=steps * forward_flops(preset, batch),
        dtype=dtype,
        items=images,
    )


def _on(ctx, cond, dtype) -> dict:
    return {k: {n: t.to(ctx.device, dtype) for n, t in v.items()} for k, v in cond.items()}


def _fastdiff(ctx, shape, sampler, steps, dtype, graphs, preset="", cond=None, model=None):
    model = model or models(preset, ctx.device, dtype)[0]
    schedule = SCHEDULES[SCHEDULE.get(preset, "linear")][0]
    extra = {"cuda_graph": True} if graphs else {}
    if cond:
        extra.update(_on(ctx, cond, dtype), guidance_scale=GUIDANCE)
    return lambda: fastdiff.sample(
        model,
        shape,
        sampler=sampler,
        steps=steps,
        schedule=schedule,
        seed=0,
        device=ctx.device,
        dtype=dtype,
        **extra,
    )


def _diffusers_loop(
    ctx, shape, sampler, steps, dtype, preset="", cond=None, compiled=False, net=None
):
    """diffusers' pipeline loop around the twin (or fastdiff's UNet where there is none, or
    `net`); compiled: True for torch.compile, "stable-fast" for the twin compiled by it."""
    if net is None:
        ours, twin = models(preset, ctx.device, dtype)
        if compiled == "stable-fast":
            twin, compiled = stable_fast(twin, ctx.device), False
        if twin is None:
            net = lambda x, t, context=None: ours(x, t)
        else:
            net = lambda x, t, context=None: call_diffusers(twin, x, t, context)
    if compiled:
        torch._dynamo.reset()
        net = torch.compile(net, mode="reduce-overhead" if ctx.cuda else None)
    sched = scheduler(sampler, SCHEDULE.get(preset, "linear"), ctx.device)
    context = None
    if cond:
        on = _on(ctx, cond, dtype)
        context = torch.cat([on["cond"]["context"], on["uncond"]["context"]])
    gen = torch.Generator(device=ctx.device)

    def run():
        sched.set_timesteps(steps, device=ctx.device)
        gen.manual_seed(0)
        x = torch.randn(shape, generator=gen, device=ctx.device, dtype=dtype)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            if compiled and ctx.cuda:
                torch.compiler.cudagraph_mark_step_begin()
            if context is None:
                y = net(x, t)
            else:
                y_c, y_u = net(torch.cat([x, x]), t, context).chunk(2)
                y = y_u + GUIDANCE * (y_c - y_u)
            x = sched.step(y, t, x).prev_sample
        return x

    return run
