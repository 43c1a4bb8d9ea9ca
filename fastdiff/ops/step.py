"""The sampler step: one row of a plan's coefficient table applied to the state (samplers.py).

Every backend computes, elementwise and in fp32 (fp64 for fp64 tensors):

    y      = y_u + g (y - y_u)                       (only with guidance: y_uncond given)
    x0     = clamp(A x + B y)                        (clamp optional)
    x_next = X_X x + X_D x0 + X_H0 h0 + X_H1 h1 + X_Z z(seed, step = counter + 1, sample, element)
    h_k    = H_k row . (x, x0, h0, h1)               (in place, only where W_k = 1)
    nonfinite[counter] = 1 if x_next (in x's dtype) holds a NaN or an infinity (optional)

The row is table[counter], read on the device: the loop never syncs with the host, and learns
whether a step went non-finite from the flags, read once after the last step.
Memory traffic of the reference: each term is a separate kernel, ~12 reads and writes of the
state per step; the fused backends read x, y (, y_u, h0, h1) once and write x_next (, h) once.

Backends, in order of preference for each device: `cuda` (csrc/step_cuda.cu) and `cpu`
(csrc/step.cpp), both torch.ops.fastdiff.step; `triton` (kernels/step.py: compiled on CUDA,
interpreted on CPU under TRITON_INTERPRET=1, so after `cpu`); the reference. The fused backends
take fp32/fp16/bf16 states, contiguous or channels_last, with y, y_uncond, h0, h1 of x's shape and
dtype; a y or y_uncond in another layout is copied into x's, while h0/h1 (updated in place) must
share x's layout and overlap nothing else, else the call goes to the next backend. Under
torch.compile, `step` is one op, fastdiff::step_dispatch, that dispatches when it runs.
"""

from __future__ import annotations

import operator
import os

import torch

from fastdiff import noise
from fastdiff.ops._dispatch import Backend, Op, extension_backend, requested, triton_backend
from fastdiff.samplers import NCOEF, Col


def step_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    y_uncond: torch.Tensor | None,
    h0: torch.Tensor | None,
    h1: torch.Tensor | None,
    table: torch.Tensor,
    counter: torch.Tensor,
    *,
    seed: int = 0,
    sample_offset: int = 0,
    guidance: float = 1.0,
    clamp: tuple[float, float] | None = None,
    stochastic: bool = True,
    nonfinite: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply row table[counter] (counter: int64 tensor of shape () on x's device). Returns
    x_next in x's dtype; h0 and h1 are updated in place. `stochastic=False` promises that no
    row of the table injects noise, so none is drawn. `nonfinite` (int32, shape (rows,)): its
    element `counter` is set to 1 when x_next holds a NaN or an infinity, else left as it is."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    row = torch.index_select(table, 0, counter.reshape(1))[0].to(cdt)
    c = {col: row[col] for col in Col}
    xf, yf = x.to(cdt), y.to(cdt)
    if y_uncond is not None:
        yu = y_uncond.to(cdt)
        yf = yu + guidance * (yf - yu)
    x0 = c[Col.A] * xf + c[Col.B] * yf
    if clamp is not None:
        x0 = x0.clamp(*clamp)
    hs = [h.to(cdt) if h is not None else None for h in (h0, h1)]
    operands = {"X": xf, "D": x0, "H0": hs[0], "H1": hs[1]}

    def combo(prefix: str) -> torch.Tensor:
        out = torch.zeros_like(xf)
        for name, t in operands.items():
            if t is not None:
                out = out + c[Col[f"{prefix}_{name}"]] * t
        return out

    x_next = combo("X")
    if stochastic:
        z = noise.randn_like_batch(
            seed, counter + 1, x.shape, sample_offset=sample_offset, device=x.device
        )
        x_next = x_next + c[Col.X_Z] * z.to(cdt)
    # every new history value is computed before any is written (h may alias hs)
    new = [
        torch.where(c[Col[f"W{k}"]] != 0, combo(f"H{k}"), h) if h is not None else None
        for k, h in enumerate(hs)
    ]
    for h, v in zip((h0, h1), new):
        if h is not None:
            h.copy_(v)
    x_next = x_next.to(x.dtype)
    if nonfinite is not None:
        index = counter.reshape(1)
        bad = (~torch.isfinite(x_next).all()).to(nonfinite.dtype).reshape(1)
        nonfinite.index_copy_(0, index, torch.maximum(nonfinite.index_select(0, index), bad))
    return x_next


def _layout(t: torch.Tensor) -> str | None:
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _fused_check(
    x, y=None, y_uncond=None, h0=None, h1=None, table=None, counter=None, nonfinite=None, **options
) -> list[str]:
    """Why the fused kernels (cuda, triton, cpu) cannot take this call; [] when they can.
    Operands left out (`step_op.why_not("cpu", x)`) are not checked."""
    reasons = []
    if x.dim() < 1:
        reasons.append("x must be batched (B, ...)")
    layout = _layout(x)
    if layout is None:
        reasons.append(
            f"x is neither contiguous nor channels_last (strides {x.stride()}); pass x.contiguous()"
        )
    operands = {"y": y, "y_uncond": y_uncond, "h0": h0, "h1": h1}
    for name, t in operands.items():
        if t is None:
            continue
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            reasons.append(
                f"{name} is {t.dtype} {tuple(t.shape)} on {t.device}, x is {x.dtype} "
                f"{tuple(x.shape)} on {x.device}: the fused kernels read one shape and dtype"
            )
    for name, h in (("h0", h0), ("h1", h1)):
        if h is None:
            continue
        if not _same_layout(h, x):
            reasons.append(
                f"{name} (updated in place) has strides {h.stride()} but x has {x.stride()}; "
                "allocate the history like x (torch.zeros_like(x))"
            )
        others = [t for k, t in operands.items() if t is not None and k != name] + [x]
        if any(_shares_memory(h, t) for t in others):
            reasons.append(f"{name} shares memory with another operand")
    if table is not None and (
        table.dim() != 2 or table.shape[1] != NCOEF or table.dtype not in _TABLE_DTYPES
    ):
        reasons.append(
            f"table must be float32/float64 of shape (rows, {NCOEF}), got {table.dtype} "
            f"{tuple(table.shape)}"
        )
    if counter is not None and counter.dtype != torch.int64:
        reasons.append(f"counter must be int64, got {counter.dtype}")
    for name, t in (("table", table), ("counter", counter), ("nonfinite", nonfinite)):
        if t is not None and t.device != x.device:
            reasons.append(f"{name} is on {t.device} but x is on {x.device}")
    return reasons


_TABLE_DTYPES = (torch.float32, torch.float64)


def _same_layout(t: torch.Tensor, x: torch.Tensor) -> bool:
    """t (of x's shape) in x's memory order: equal strides wherever a dimension has more than
    one element. A size-1 dimension's stride is never used: (B, 1, H, W) is NCHW and
    channels_last at once, with either stride for its channels."""
    return all(a == b for a, b, n in zip(t.stride(), x.stride(), x.shape) if n > 1)


def _like_x(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """t in x's memory layout (a copy only when it differs)."""
    if t is None or t.stride() == x.stride() or _same_layout(t, x):
        return t
    fmt = torch.channels_last if _layout(x) == "channels_last" else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


def _int64(seed: int) -> int:
    """A uint64 seed as the two's-complement int64 that an op schema's `int` holds."""
    return seed - 2**64 if seed >= 2**63 else seed


def _operands(x, y, y_uncond, h0, h1, table, counter) -> tuple:
    """The tensors as the fused kernels take them: y and y_uncond in x's layout, the table
    contiguous, the counter 0-d."""
    return (
        x,
        _like_x(y, x),
        _like_x(y_uncond, x),
        h0,
        h1,
        table.contiguous(),
        counter if counter.dim() == 0 else counter.reshape(()),
    )


def _extension_step(*tensors, seed, sample_offset, guidance, clamp, stochastic, nonfinite=None):
    clamp = None if clamp is None else list(clamp)
    return torch.ops.fastdiff.step(
        *_operands(*tensors), _int64(seed), sample_offset, guidance, clamp, stochastic, nonfinite
    )


def _triton_step(*tensors, **options):
    from fastdiff.kernels.step import step as triton_step

    return triton_step(*_operands(*tensors), **options)


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

step_op = Op("step", step_reference)
# cpu before triton: on CPU tensors triton only runs interpreted (TRITON_INTERPRET=1), far slower
for _backend in (
    extension_backend("cuda", "step", _extension_step, _FUSED_DTYPES, _fused_check),
    extension_backend("cpu", "step", _extension_step, _FUSED_DTYPES, _fused_check),
    triton_backend(_triton_step, _FUSED_DTYPES, _fused_check),
):
    step_op.register(_backend)


def _options(
    x, table, counter, seed, sample_offset, guidance, clamp, stochastic, nonfinite
) -> dict:
    """The arguments after counter, validated (errors a user can hit, whatever the backend)."""
    seed = operator.index(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}; reduce it mod 2**64")
    sample_offset = operator.index(sample_offset)
    batch = x.shape[0] if x.dim() else 0
    if not 0 <= sample_offset <= 2**32 - batch:
        raise ValueError(
            f"sample indices {sample_offset}..{sample_offset + batch - 1} must lie in [0, 2**32)"
        )
    if not isinstance(counter, torch.Tensor) or counter.numel() != 1:
        raise ValueError(
            f"counter must be a one-element int64 tensor on x's device holding the row index, "
            f"got {counter!r}"
        )
    if clamp is not None:
        if len(clamp) != 2:
            raise ValueError(f"clamp must be (lo, hi), got {clamp!r}")
        clamp = (float(clamp[0]), float(clamp[1]))
    if nonfinite is not None and (
        not isinstance(nonfinite, torch.Tensor)
        or nonfinite.dtype != torch.int32
        or nonfinite.shape != table.shape[:1]
        or not nonfinite.is_contiguous()
    ):
        got = (
            f"{nonfinite.dtype} of shape {tuple(nonfinite.shape)}"
            if isinstance(nonfinite, torch.Tensor)
            else repr(nonfinite)
        )
        raise ValueError(
            f"nonfinite must be a contiguous int32 tensor of shape ({table.shape[0]},), one flag "
            f"per table row (torch.zeros(rows, dtype=torch.int32)), got {got}"
        )
    return {
        "seed": seed,
        "sample_offset": sample_offset,
        "guidance": float(guidance),
        "clamp": clamp,
        "stochastic": bool(stochastic),
        "nonfinite": nonfinite,
    }


def step(
    x: torch.Tensor,
    y: torch.Tensor,
    y_uncond: torch.Tensor | None,
    h0: torch.Tensor | None,
    h1: torch.Tensor | None,
    table: torch.Tensor,
    counter: torch.Tensor,
    *,
    seed: int = 0,
    sample_offset: int = 0,
    guidance: float = 1.0,
    clamp: tuple[float, float] | None = None,
    stochastic: bool = True,
    nonfinite: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Apply one plan row with the first backend that can (see step_reference for arguments);
    `backend` ("cuda", "cpu", "triton", "reference") forces one."""
    args = (x, y, y_uncond, h0, h1, table, counter)
    options = _options(
        x, table, counter, seed, sample_offset, guidance, clamp, stochastic, nonfinite
    )
    if torch.compiler.is_compiling():
        # dispatch asks whether h0/h1 share storage with another operand, which traced (fake)
        # tensors cannot answer: it runs inside one opaque op, on the real tensors
        clamp = options["clamp"]
        schema_options = {
            **options,
            "seed": _int64(options["seed"]),
            "clamp": clamp and list(clamp),
        }
        return _step_op(*args, **schema_options, backend=backend)
    return _dispatched(args, options, backend)


def _dispatched(args: tuple, options: dict, backend: str | None) -> torch.Tensor:
    """The chosen backend's result. A sampling loop makes the same call at every step, with new
    tensors of the same kind: the choice is remembered per call signature (what the backends'
    checks read: each tensor's device, dtype, shape and strides, which operands share storage,
    the requested backend), so that only the first step pays for dispatch."""
    key = _signature(args, options["nonfinite"], backend)
    chosen = _chosen.get(key)
    if chosen is None:
        chosen = step_op.select(*args, backend=backend, **options)
        if len(_chosen) >= _CHOSEN_MAX:
            _chosen.clear()
        _chosen[key] = chosen
    return chosen.fn(*args, **options)


_chosen: dict[tuple, Backend] = {}
_CHOSEN_MAX = 256


def _signature(args: tuple, nonfinite: torch.Tensor | None, backend: str | None) -> tuple:
    wanted = requested(backend)
    # TRITON_INTERPRET decides only whether triton, asked for by name, takes CPU tensors
    # (automatic dispatch passes interpreted triton over): read only then (~1 us)
    interpret = os.environ.get("TRITON_INTERPRET") if wanted == "triton" else None
    key = [wanted, interpret]
    key += [None if t is None else (t.device, t.dtype, t.shape, t.stride()) for t in args]
    key.append(None if nonfinite is None else (nonfinite.device, nonfinite.dtype, nonfinite.shape))
    if args[3] is not None or args[4] is not None:
        # only h0/h1 (written in place) must share storage with no other operand: each of x,
        # y, y_uncond, h0, h1 as the index of the first one with its storage (-1: none before)
        ptrs = [None if t is None else t.untyped_storage().data_ptr() for t in args[:5]]
        key += [ptrs.index(p) if p is not None else -1 for p in ptrs]
    return tuple(key)


@torch.library.custom_op("fastdiff::step_dispatch", mutates_args=("h0", "h1", "nonfinite"))
def _step_op(
    x: torch.Tensor,
    y: torch.Tensor,
    y_uncond: torch.Tensor | None,
    h0: torch.Tensor | None,
    h1: torch.Tensor | None,
    table: torch.Tensor,
    counter: torch.Tensor,
    seed: int,
    sample_offset: int,
    guidance: float,
    clamp: list[float] | None,
    stochastic: bool,
    nonfinite: torch.Tensor | None,
    backend: str | None,
) -> torch.Tensor:
    options = dict(
        seed=seed % 2**64,
        sample_offset=sample_offset,
        guidance=guidance,
        clamp=clamp and tuple(clamp),
        stochastic=stochastic,
        nonfinite=nonfinite,
    )
    return _dispatched((x, y, y_uncond, h0, h1, table, counter), options, backend)


@_step_op.register_fake
def _step_fake(x, y, y_uncond, h0, h1, table, counter, *scalars) -> torch.Tensor:
    return torch.empty_like(x)  # every backend returns x_next in x's dtype and layout
