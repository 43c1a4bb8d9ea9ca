"""one sampler step: the fused step op per backend vs its reference and diffusers' step(); x_T

The x_T cases time a sample's initial noise: the noise kernels against the specification in
torch ops and against torch.randn (what diffusers' pipelines draw)."""

from __future__ import annotations

import itertools

import torch
from harness import Case, Contender, Context, Skip, first_line

from fastdiff.ops import noise as noise_ops
from fastdiff.ops import step as step_ops
from fastdiff.samplers import Col, build_plan
from sections._shared import SCHEDULES, SPACING, dtype_name, scheduler, shape_name

NOTES = (
    "bytes per step = numel x itemsize x (reads + writes), counted from the coefficient row: "
    "reads x, y (and y_uncond with guidance) and h0/h1 where any of their coefficients is "
    "nonzero; writes x_next and h0/h1 where W0/W1 = 1; the fused kernels draw the noise in "
    "registers (0 bytes). DDIM eta=1: 3 tensors (x, y -> x_next); DPM-Solver++ 2M: 5 "
    "(x, y, h0 -> x_next, h0). % roofline = those bytes at the probed copy bandwidth / time.",
    "+graph: K steps on K rotating input sets captured back to back in one CUDA graph; time per "
    "step = replay / K, i.e. what the step costs inside a whole-step graph.",
    "x_T: the initial noise times sigma_max (14.6, Stable Diffusion's), as fastdiff.sample draws "
    "it; bytes = the one write of x_T. torch.randn is diffusers' randn_tensor (a generator, "
    "then the scale); reference is fastdiff/noise.py's specification in torch ops.",
)
# label: fastdiff sampler, its options, steps; the timed step is row ROW of the plan
SAMPLERS = {
    "ddim eta=1": ("ddim", {"eta": 1.0}, 50),
    "dpm++ 2m": ("dpmpp_2m", {}, 20),
}
ROW = 10  # mid-trajectory: noisy for DDIM eta=1, second order for DPM-Solver++ 2M
# latents of diffusion models in the dtypes they are sampled in, and whether channels_last (the
# layout of a channels_last UNet's output, which fastdiff.sample's state then follows)
SHAPES = {
    "cuda": [
        ((2, 4, 64, 64), torch.float16, False),
        ((64, 4, 64, 64), torch.float16, False),
        ((64, 4, 64, 64), torch.float16, True),
        ((256, 3, 32, 32), torch.float32, False),
        ((64, 16, 256, 256), torch.float32, False),
    ],
    "cpu": [
        ((64, 4, 64, 64), torch.float32, False),
        ((16, 3, 256, 256), torch.float32, False),
        ((64, 4, 64, 64), torch.float32, True),
    ],
}
QUICK_CPU_SHAPES = 1  # --quick on a CPU: the first shape only
GRAPH_STEPS = 256  # at most this many steps in one captured graph


def step_bytes(row: torch.Tensor, numel: int, itemsize: int, guided: bool = False) -> int:
    """Bytes one fused step must move (see NOTES)."""
    reads = 2 + guided  # x, y (, y_uncond)
    for k in ("H0", "H1"):
        cols = [Col[f"X_{k}"], Col[f"H0_{k}"], Col[f"H1_{k}"]]
        reads += bool((row[cols] != 0).any())
    writes = 1 + int(row[Col.W0] != 0) + int(row[Col.W1] != 0)
    return numel * itemsize * (reads + writes)


def cases(ctx: Context) -> list[Case]:
    out = []
    shapes = SHAPES[ctx.device.type]
    for shape, dtype, cl in shapes[:QUICK_CPU_SHAPES] if ctx.quick and not ctx.cuda else shapes:
        for label, (sampler, options, steps) in SAMPLERS.items():
            out.append(_case(ctx, label, sampler, options, steps, shape, dtype, cl))
        out.append(_noise_case(ctx, shape, dtype, cl))
    return out


def _layout(channels_last: bool) -> tuple[torch.memory_format, str]:
    """The memory format and the case-name suffix."""
    return (
        (torch.channels_last, " channels_last") if channels_last else (torch.contiguous_format, "")
    )


def _noise_case(ctx, shape, dtype, channels_last=False) -> Case:
    scale = 14.6  # Stable Diffusion's sigma_max: an Euler-type sampler's x_T
    fmt, suffix = _layout(channels_last)
    out = torch.empty(shape, device=ctx.device, dtype=dtype, memory_format=fmt)

    def randn():
        g = torch.Generator(device=ctx.device).manual_seed(0)
        return lambda: torch.randn(shape, generator=g, device=ctx.device, dtype=dtype) * scale

    def fill(backend):
        return lambda: noise_ops.gaussian_(out, 0, 0, scale=scale, backend=backend)

    contenders = [
        Contender("torch.randn", randn, True),
        Contender("reference", lambda: fill("reference"), True),
    ]
    for name in noise_ops.gaussian_op.names:
        if name != "reference" and not noise_ops.gaussian_op.why_not(name, out):
            if name != "triton" or ctx.cuda:  # interpreted Triton is a test vehicle
                contenders.append(Contender(f"fastdiff-{name}", lambda name=name: fill(name)))
    return Case(
        f"x_T {shape_name(shape)} {dtype_name(dtype)}{suffix}",
        contenders,
        params=dict(shape=list(shape), dtype=str(dtype), scale=scale, channels_last=channels_last),
        unit="call",
        bytes=out.numel() * out.element_size(),
    )


def _case(ctx, label, sampler, options, steps, shape, dtype, channels_last=False) -> Case:
    schedule = SCHEDULES["sd"][0]
    plan = build_plan(sampler, schedule, steps, spacing=SPACING, **options)
    numel, itemsize = torch.Size(shape).numel(), dtype.itemsize
    nbytes = step_bytes(plan.table[ROW], numel, itemsize)
    n_sets = ctx.rotations(nbytes, limit=GRAPH_STEPS)

    def inputs():
        """(x, y, h0, h1) sets to rotate through."""
        fmt = _layout(channels_last)[0]
        make = lambda: torch.randn(shape, device=ctx.device, dtype=dtype).contiguous(
            memory_format=fmt
        )
        hs = [make() for _ in range(plan.n_history)] + [None, None]
        return [(make(), make(), hs[0], hs[1]) for _ in range(n_sets)]

    table = plan.table.to(ctx.device, torch.float32)
    counter = torch.tensor(ROW, device=ctx.device)
    flags = torch.zeros(plan.rows, dtype=torch.int32, device=ctx.device)
    kwargs = dict(seed=0, stochastic=plan.noisy_rows[ROW], nonfinite=flags)  # as sample() calls

    def call(backend, x, y, h0, h1):
        return step_ops.step(x, y, None, h0, h1, table, counter, backend=backend, **kwargs)

    fused, refused = [], {}
    for name in step_ops.step_op.names:
        if name != "reference":
            reason = _refusal(ctx, name, plan.n_history, dtype, call)
            (refused.__setitem__(name, reason) if reason else fused.append(name))
    if not fused:
        why = "; ".join(f"{n}: {r}" for n, r in refused.items()) or "none is registered"
        ctx.note(f"no fused step backend runs here ({why}): the reference stands for fastdiff")
    contenders = [
        Contender("diffusers", lambda: _diffusers(ctx, sampler, steps, options, inputs()), True),
        Contender("reference", lambda: _eager(call, "reference", inputs()), bool(fused)),
    ]
    for name in fused:
        eager = lambda name=name: _eager(call, name, inputs())
        contenders.append(Contender(f"fastdiff-{name}", eager))
    for name in ["reference", *fused] if ctx.cuda else []:
        graph = lambda name=name: _graph(call, name, inputs())
        who = "reference" if name == "reference" else f"fastdiff-{name}"
        contenders.append(Contender(f"{who}+graph", graph, per_call=n_sets))
    return Case(
        f"{label} {shape_name(shape)} {dtype_name(dtype)}{_layout(channels_last)[1]}",
        contenders,
        params=dict(
            sampler=sampler,
            options=options,
            steps=steps,
            row=ROW,
            shape=list(shape),
            dtype=str(dtype),
            channels_last=channels_last,
            sets=n_sets,
            refused=refused,
        ),
        unit="step",
        bytes=nbytes,
    )


def _refusal(ctx, name, n_history, dtype, call) -> str | None:
    """Why backend `name` cannot run a step on a small tensor of this dtype here, or None."""
    small = [torch.randn(2, 4, 8, 8, device=ctx.device, dtype=dtype) for _ in range(2 + n_history)]
    x, y, *hs = [*small, None, None]
    try:
        call(name, x, y, hs[0], hs[1])
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        return first_line(e, 160)
    return None


def _eager(call, name, sets):
    nxt = itertools.cycle(sets).__next__
    return lambda: call(name, *nxt())


def _graph(call, name, sets):
    """One CUDA graph holding a step on each input set, back to back."""
    body = lambda: [call(name, *s) for s in sets]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()  # warm-up outside the capture (allocations, lazy initialisation)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            body()
    except RuntimeError as e:
        raise Skip(f"{name} cannot be captured in a CUDA graph: {first_line(e)}") from e

    def replay():  # holds the sets: the graph reads and writes their memory at every replay
        graph.replay()
        return sets

    return replay


def _diffusers(ctx, sampler, steps, options, sets):
    """diffusers' step() at the same row, as its pipelines call it (timestep from
    scheduler.timesteps on the device, noise from torch.randn)."""
    s = scheduler(sampler, "sd", ctx.device)
    s.set_timesteps(steps, device=ctx.device)
    t = s.timesteps[ROW]
    nxt = itertools.cycle(sets).__next__

    def step():
        x, y, _, _ = nxt()
        if sampler == "ddim":
            return s.step(y, t, x, eta=options["eta"]).prev_sample
        s._step_index = ROW  # step() advances it; stay mid-trajectory (second order)
        return s.step(y, t, x).prev_sample

    return step
