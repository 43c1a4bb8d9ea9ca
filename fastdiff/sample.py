"""fastdiff.sample(): the sampling loop, guidance, seeds, CUDA-graph capture and progress."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from fastdiff.ops import noise as noise_ops
from fastdiff.ops import step as step_ops
from fastdiff.samplers import SAMPLERS, Col, Plan, build_plan
from fastdiff.schedules import Schedule


@torch.no_grad()
def sample(
    model: Callable[..., Any],
    shape: tuple[int, ...] | None = None,
    *,
    noise: torch.Tensor | None = None,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    schedule: Schedule | None = None,
    prediction: str = "eps",
    spacing: str = "trailing",
    eta: float | None = None,
    seed: int = 0,
    cond: Mapping[str, torch.Tensor] | None = None,
    uncond: Mapping[str, torch.Tensor] | None = None,
    guidance_scale: float | None = None,
    backend: str | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clamp: tuple[float, float] | None = None,
    sample_offset: int = 0,
    cuda_graph: bool | str = False,
) -> torch.Tensor:
    """Draw samples from a diffusion model.

    `model(x, t, **cond)` returns the network's prediction (`prediction`: "eps", "x0" or "v")
    for inputs x of shape `shape` and t, a float tensor of training timesteps of shape [B].
    The initial noise is either `noise` (unit variance) or drawn from `seed`: sample n of the
    batch uses global sample index `sample_offset + n`, so its image does not depend on the batch
    it is drawn in. With `guidance_scale`, `cond` and `uncond` (keyword tensors for the model)
    are batched into one call and mixed as y_u + w (y_c - y_u). `clamp=(lo, hi)` clamps the x0
    prediction at every step. `callback(i, x, x0)` sees the state after each row.
    `backend` picks the fused step's implementation ("cuda", "cpu", "triton", "reference"; None:
    the fastest that can run). `cuda_graph=True` captures one whole step (model call, fused
    update, step-counter increment) as a CUDA graph once and replays it for every row; "auto"
    does so on CUDA when the capture succeeds (else warns and runs eagerly); the model then runs
    as captured, so it must not depend on Python state that changes between steps.
    Sampling runs under torch.no_grad(), as diffusers' pipelines do (the step op has no
    gradient); a model that needs gradients inside, e.g. for classifier guidance, computes them
    under torch.enable_grad().
    Returns the final sample, shape `shape`, dtype `dtype` (default float32), in the memory
    layout of the model's output (NCHW or channels_last: the state follows it from row 1 on)."""
    schedule = schedule if schedule is not None else Schedule.from_betas("linear")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastdiff.Schedule, got {type(schedule).__name__}")
    options = {} if eta is None else {"eta": eta}
    if eta is not None and sampler not in ("ddim", "euler_a"):
        raise ValueError(f"eta applies to the 'ddim' and 'euler_a' samplers, not {sampler!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {sorted(SAMPLERS)}")
    plan = _plan(sampler, schedule, steps, spacing, prediction, options)
    device = _device(model, noise, device)
    graph = _want_graph(cuda_graph, device)
    dtype = dtype or (noise.dtype if noise is not None else torch.float32)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point dtype, got {dtype}")
    x = _initial(noise, shape, seed, sample_offset, device, dtype, plan.init_scale, backend)
    cond, uncond = _conditioning(cond, uncond, guidance_scale, x.shape[0], device)
    return _run(
        model,
        plan,
        x,
        cond,
        uncond,
        guidance_scale,
        seed,
        sample_offset,
        backend,
        progress,
        callback,
        clamp,
        graph,
    )


def _plan(sampler, schedule: Schedule, steps, spacing, prediction, options: dict) -> Plan:
    """build_plan's plan, kept for later calls with the same sampler, schedule (its betas),
    steps, spacing, prediction and options: drawing batch after batch builds the table once (it
    is float64 Python, milliseconds per call). sample() only reads a plan."""
    try:
        # steps' type too: True == 1, but build_plan refuses a bool
        key = (sampler, schedule.betas.numpy().tobytes(), steps, type(steps), spacing, prediction)
        key += tuple(sorted(options.items()))
        hash(key)
    except TypeError:  # an unhashable argument: build_plan says what is wrong with it
        key = None
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan = build_plan(
            sampler, schedule, steps, spacing=spacing, prediction=prediction, **options
        )
        if key is not None:
            if len(_plans) >= _PLANS_MAX:
                _plans.pop(next(iter(_plans)))  # the oldest
            _plans[key] = plan
    return plan


_plans: dict[tuple, Plan] = {}
_PLANS_MAX = 64


def _want_graph(cuda_graph: bool | str, device: torch.device) -> str | None:
    """None (eager), "auto" or "required", from sample()'s cuda_graph argument."""
    if cuda_graph not in (False, True, "auto"):
        raise ValueError(f"cuda_graph must be False, True or 'auto', got {cuda_graph!r}")
    if cuda_graph is True and device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs a CUDA device, but sampling runs on {device}; pass "
            "cuda_graph=False (or 'auto', which captures only on CUDA)"
        )
    if cuda_graph is False or device.type != "cuda":
        return None
    return "required" if cuda_graph is True else "auto"


def _run(
    model,
    plan: Plan,
    x,
    cond,
    uncond,
    guidance_scale,
    seed,
    sample_offset,
    backend,
    progress,
    callback,
    clamp,
    graph=None,
) -> torch.Tensor:
    device, B = x.device, x.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    tdt = cdt  # timesteps reach the model in float32 (float64 when sampling in float64)
    table = plan.table.to(device, cdt)
    guided = guidance_scale is not None
    nb = 2 * B if guided else B  # the model's batch
    # every row's timesteps, one row per model call (a fresh row per step: a model that writes
    # into t harms no later step)
    t_rows = table[:, Col.T].to(tdt).reshape(-1, 1).expand(plan.rows, nb).contiguous()
    # h0, h1: zeros in x's layout (replaced when row 0 changes x's layout)
    history = [torch.zeros_like(x) for _ in range(plan.n_history)] + [None, None]
    # nonfinite[i] = 1 once row i's x_next holds a NaN or an infinity: the step op sets it
    nonfinite = torch.zeros(plan.rows, dtype=torch.int32, device=device)
    model_cond = _batched(cond, uncond) if guided else cond
    noisy = plan.noisy_rows  # from the host table: no device sync
    rows = range(plan.rows)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=plan.sampler, unit="step")

    def one_step(x, i: int, stochastic: bool, counter: torch.Tensor, t: torch.Tensor, first=False):
        """Row `counter` (a device tensor holding i) on x at timesteps t: the model call and the
        fused update, which also flags a non-finite result. Reads no device value on the host,
        so it can be captured as a CUDA graph. `first` (row 0, eager): x and the histories take
        the memory layout of the model's output, so that no later step copies it."""
        if guided:
            y = _call(model, torch.cat([x, x]), t, model_cond, i)
            y, y_u = y.chunk(2)
        else:
            y = _call(model, x, t, model_cond, i)
            y_u = None
        if y.shape != x.shape:
            raise ValueError(
                f"model output has shape {tuple(y.shape)} but the sample has shape "
                f"{tuple(x.shape)}; models with learned variance must return only the "
                "prediction channels"
            )
        if first:
            x = _follow_layout(x, y, history)
        x0 = None
        if callback is not None:
            row = torch.index_select(table, 0, counter.reshape(1))[0]
            yg = y if y_u is None else y_u + guidance_scale * (y - y_u)
            x0 = row[Col.A] * x.to(cdt) + row[Col.B] * yg.to(cdt)
            x0 = x0.clamp(*clamp) if clamp is not None else x0
        x_next = step_ops.step(
            x,
            y,
            y_u,
            history[0],
            history[1],
            table,
            counter,
            seed=seed,
            sample_offset=sample_offset,
            guidance=1.0 if guidance_scale is None else float(guidance_scale),
            clamp=clamp,
            stochastic=stochastic,
            nonfinite=nonfinite,
            backend=backend,
        )
        return x_next, x0

    # row 0 eagerly (it fixes the state's layout); the rows after it eagerly too, or replayed
    # as one captured step
    rows = iter(rows)
    counters = torch.arange(plan.rows, dtype=torch.int64, device=device)
    x, x0 = one_step(x, next(rows), noisy[0], counters[0], t_rows[0], first=True)
    if callback is not None:
        callback(0, x, x0)
    captured = None
    if graph is not None and plan.rows > 1:
        counter = torch.ones((), dtype=torch.int64, device=device)

        def graph_step(x, stochastic: bool):
            """one_step on the row that `counter` names, then counter + 1: replayed as is (the
            warm-up and the capture run row 1)."""
            t = torch.index_select(t_rows, 0, counter.reshape(1))[0]
            out = one_step(x, 1, stochastic, counter, t)
            counter.add_(1)
            return out

        state = [t for t in (counter, nonfinite, *history) if t is not None]
        captured = _capture(graph_step, x, any(noisy[1:]), state, graph == "required")
    if captured is not None:
        cuda_graph, x, x0 = captured  # static buffers, rewritten by every replay
        for i in rows:
            cuda_graph.replay()
            if callback is not None:
                callback(i, x.clone(), None if x0 is None else x0.clone())
    else:
        # eagerly, row i's counter and timesteps are views: no kernel besides the model's and
        # the step's
        for i in rows:
            x, x0 = one_step(x, i, noisy[i], counters[i], t_rows[i])
            if callback is not None:
                callback(i, x, x0)
    # the one host sync, after the loop: the first flagged row, or -1
    first_bad = int(torch.where(nonfinite.any(), nonfinite.argmax(), -1))
    if first_bad >= 0:
        raise FloatingPointError(
            f"{plan.sampler}: non-finite values first appeared at step {first_bad} of "
            f"{plan.rows} (timestep {float(plan.timesteps[first_bad]):g}); check the "
            "model's output and dtype (fp16 overflow?) and the prediction type"
        )
    return x


def _follow_layout(x: torch.Tensor, y: torch.Tensor, history: list) -> torch.Tensor:
    """x in the memory layout of the model's output y when that is the other dense layout
    (a channels_last UNet's output for an NCHW x_T, or the reverse), with the histories
    (still zeros: row 0) reallocated like it; else x as it is. The fused step takes x, y and
    the histories in one layout: it would copy y into x's at every step."""
    layout = step_ops._layout(y)
    if layout is None or layout == step_ops._layout(x):
        return x
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    history[:] = [None if h is None else torch.zeros_like(x) for h in history]
    return x


def _capture(one_step, x, stochastic: bool, state: list[torch.Tensor], required: bool):
    """Capture one_step on a static copy of x as a CUDA graph. Returns (graph, x, x0): each
    replay advances the state by one row, writing the new state into x (and the row's x0 into
    x0, when one_step computes it); or None when the capture failed and `required` is False (the
    state is then as it was)."""
    static_x = x.clone()
    saved = [t.clone() for t in state]

    def restore():
        for t, v in zip(state, saved):
            t.copy_(v)

    # Warm-up on a side stream (lazy initialisation, Triton compilation, allocator), undone after.
    side = torch.cuda.Stream(device=x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        one_step(static_x, stochastic)
    torch.cuda.current_stream(x.device).wait_stream(side)
    restore()
    cuda_graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(x.device)
    try:
        with torch.cuda.graph(cuda_graph):
            out, x0 = one_step(static_x, stochastic)
            static_x.copy_(out)
    except Exception as e:  # any failure to capture: a sync, a CPU op, an uncapturable kernel
        # torch.cuda.graph leaves its capture stream current when ending the capture raises
        torch.cuda.set_stream(stream)
        if required:
            raise RuntimeError(
                f"cuda_graph=True: capturing the sampling step failed ({e}); the model must be "
                "capturable (no host syncs or CPU work). Use cuda_graph='auto' to fall back to "
                "eager sampling"
            ) from e
        warnings.warn(
            f"cuda_graph='auto': capturing the sampling step failed ({e}); sampling eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        torch.cuda.synchronize(x.device)
        restore()
        return None

    return cuda_graph, static_x, x0


def _call(model, x, t, cond, i) -> torch.Tensor:
    out = model(x, t, **cond)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(getattr(out, "sample", None), torch.Tensor):  # diffusers' output classes
        return out.sample
    raise TypeError(
        f"model returned {type(out).__name__} at step {i}; expected a tensor (or a tuple or an "
        "object with .sample holding one)"
    )


def _device(model, noise, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _initial(noise, shape, seed, sample_offset, device, dtype, scale, backend) -> torch.Tensor:
    """x_T: the given unit noise times `scale`, or the noise of `seed` at step 0 times `scale`,
    drawn by the fused kernels (the product in fp32, rounded once to dtype)."""
    if noise is None and shape is None:
        raise ValueError("give either shape=(B, C, H, W) or noise=tensor of that shape")
    if noise is not None:
        if shape is not None and tuple(noise.shape) != tuple(shape):
            raise ValueError(
                f"noise has shape {tuple(noise.shape)} but shape={tuple(shape)}; pass one of them"
            )
        if noise.ndim < 2:
            raise ValueError(f"noise must be batched (B, ...), got shape {tuple(noise.shape)}")
        return noise.to(device, dtype) * scale
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or math.prod(shape) == 0:
        raise ValueError(f"shape must be (B, ...) with no zero dimension, got {shape}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    x = torch.empty(shape, dtype=dtype, device=device)
    return noise_ops.gaussian_(
        x, seed, 0, sample_offset=sample_offset, scale=scale, backend=backend
    )


def _conditioning(cond, uncond, guidance_scale, B, device):
    cond = dict(cond or {})
    uncond = dict(uncond) if uncond is not None else None
    if guidance_scale is None:
        if uncond is not None:
            raise ValueError("uncond is only used with guidance_scale; pass guidance_scale=w")
        return _expand(cond, B, device, "cond"), None
    if not cond or uncond is None:
        raise ValueError(
            "guidance_scale needs both cond and uncond (dicts of model keyword tensors), e.g. "
            "cond={'context': emb}, uncond={'context': empty_emb}"
        )
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}"
        )
    return _expand(cond, B, device, "cond"), _expand(uncond, B, device, "uncond")


def _expand(d: dict, B: int, device, name: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            if v.ndim == 0 or v.shape[0] not in (1, B):
                raise ValueError(
                    f"{name}[{k!r}] has shape {tuple(v.shape)}; its first dimension must be "
                    f"the batch size {B} or 1"
                )
            v = v.to(device).expand(B, *v.shape[1:])
        out[k] = v
    return out


def _batched(cond: dict, uncond: dict) -> dict:
    return {
        k: torch.cat([cond[k], uncond[k]]) if isinstance(cond[k], torch.Tensor) else cond[k]
        for k in cond
    }
