"""GroupNorm followed by SiLU, with a UNet residual block's timestep conditioning fused in:

    h   = x + residual                  residual: x-shaped, or (B, C) added per channel
    y   = group_norm(h) * weight + bias statistics per (batch, group) in fp32
    y   = y * (1 + scale) + shift       scale_shift: (B, 2C) = [scale | shift] (ADM)
    out = silu(y)

for x of shape (B, C, *spatial), NCHW or channels_last; the output keeps x's layout.
Backends: `cuda` and `cpu` (csrc/group_norm_silu.*, torch.ops.fastdiff.group_norm_silu_fwd),
`triton` (kernels/group_norm_silu.py) and the reference. The op itself is
`torch.ops.fastdiff.group_norm_silu` (torch.library.custom_op: one opaque node for
torch.compile, backend chosen when it runs); gradients come from the reference formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.ops._dispatch import Op, beyond_32_bit_offsets, extension_backend, triton_backend

# TARGETS.md shapes (B, C, H, W) with 32 groups, for benchmarks/run.py (GB/s: 2 x numel x itemsize
# is the byte floor: read x once, write once)
BENCH_SHAPES = {
    "cifar-256x128x32x32": (256, 128, 32, 32),
    "sd15-2x320x64x64": (2, 320, 64, 64),
    "sd15-2x640x32x32": (2, 640, 32, 32),
    "sd15-2x1280x16x16": (2, 1280, 16, 16),
}


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, C[, ...]) -> broadcastable against like (B, C, *spatial)."""
    return t.view(*t.shape, *[1] * (like.dim() - t.dim()))


def _affine(t: torch.Tensor | None, like: torch.Tensor, default: float, dtype) -> torch.Tensor:
    """weight or bias in `dtype`; `default` everywhere when absent (GroupNorm without affine)."""
    if t is None:
        return torch.full((like.shape[1],), default, dtype=dtype, device=like.device)
    return t.to(dtype)


def _normalized(x, num_groups, eps, residual):
    """h = x + residual in fp32 (fp64) and xhat = (h - mean) * rstd, with rstd per group."""
    acc = _acc_dtype(x)
    h = x.to(acc)
    if residual is not None:
        h = h + _per_channel(residual.to(acc), h)
    hg = h.reshape(h.shape[0], num_groups, -1)
    var, mean = torch.var_mean(hg, dim=-1, correction=0, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    return h, ((hg - mean) * rstd).view(h.shape), rstd


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    scale_shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The definition, in fp32 (fp64 for fp64 x). Traffic in eager: ~6 full-size passes."""
    acc = _acc_dtype(x)
    h = x.to(acc)
    if residual is not None:
        h = h + _per_channel(residual.to(acc), h)
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.group_norm(h, num_groups, w, b, eps)
    if scale_shift is not None:
        scale, shift = _per_channel(scale_shift.to(acc), h).chunk(2, dim=1)
        y = y * (1 + scale) + shift
    out = torch.empty_like(x)
    return out.copy_(F.silu(y))


def group_norm_silu_backward_reference(
    x, num_groups, weight, bias, eps, scale_shift, residual, grad
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (x, weight, bias, scale_shift, residual), None where the input is None."""
    h, xhat, rstd = _normalized(x, num_groups, eps, residual)
    acc = h.dtype
    spatial = tuple(range(2, x.dim()))
    w = _per_channel(_affine(weight, h, 1.0, acc)[None], h)
    y = xhat * w + _per_channel(_affine(bias, h, 0.0, acc)[None], h)
    z, dscale_shift = y, None
    if scale_shift is not None:
        scale, shift = _per_channel(scale_shift.to(acc), h).chunk(2, dim=1)
        z = y * (1 + scale) + shift
    sig = torch.sigmoid(z)
    dz = grad.to(acc) * sig * (1 + z * (1 - sig))  # silu'(z)
    dy = dz
    if scale_shift is not None:
        dscale_shift = torch.cat([(dz * y).sum(spatial), dz.sum(spatial)], dim=1)
        dy = dz * (1 + scale)
    dweight = None if weight is None else (dy * xhat).sum((0, *spatial))
    dbias = None if bias is None else dy.sum((0, *spatial))
    dxhat = (dy * w).reshape(rstd.shape[0], num_groups, -1)
    xh = xhat.reshape(dxhat.shape)
    dh = rstd * (dxhat - dxhat.mean(-1, keepdim=True) - xh * (dxhat * xh).mean(-1, keepdim=True))
    dh = dh.view(h.shape)
    dresidual = None
    if residual is not None:
        dresidual = dh if residual.dim() == x.dim() else dh.sum(spatial)
    grads = (dh, dweight, dbias, dscale_shift, dresidual)
    inputs = (x, weight, bias, scale_shift, residual)
    return tuple(None if t is None else g.to(t.dtype) for g, t in zip(grads, inputs))


def _flattens(t: torch.Tensor) -> bool:
    """Whether t's spatial dims merge into one strided axis (true for NCHW and channels_last)."""
    try:
        t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return False
    return True


def _triton_check(
    x, num_groups=None, weight=None, bias=None, eps=None, scale_shift=None, residual=None
) -> list[str]:
    if not all(_flattens(t) for t in (x, residual) if t is not None and t.dim() > 2):
        return ["x or residual has spatial dims that do not merge into one axis; use .contiguous()"]
    return beyond_32_bit_offsets(x, residual)


def _triton_group_norm_silu(x, num_groups, weight, bias, eps, scale_shift, residual):
    from fastdiff.kernels.group_norm_silu import group_norm_silu_fwd

    w, b = _affine(weight, x, 1.0, torch.float32), _affine(bias, x, 0.0, torch.float32)
    return group_norm_silu_fwd(x, num_groups, w, b, eps, scale_shift, residual)


def _extension_check(
    x, num_groups=None, weight=None, bias=None, eps=None, scale_shift=None, residual=None
) -> list[str]:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    if not (x.is_contiguous() or channels_last):
        return ["x is neither contiguous nor channels_last; call .contiguous()"]
    return []  # a residual in another layout is copied into x's by the kernel's wrapper


def _cuda_check(
    x, num_groups=None, weight=None, bias=None, eps=None, scale_shift=None, residual=None
) -> list[str]:
    reasons = _extension_check(x, num_groups, weight, bias, eps, scale_shift, residual)
    if num_groups is not None and x.numel() // max(1, x.shape[0] * num_groups) >= 2**31:
        reasons.append(
            "a group of 2^31 or more elements (the CUDA kernel indexes groups in 32 bits)"
        )
    return reasons


def _extension_group_norm_silu(x, num_groups, weight, bias, eps, scale_shift, residual):
    # the C++ kernels take fp32 affine parameters and conditioning in x's dtype
    w, b = _affine(weight, x, 1.0, torch.float32), _affine(bias, x, 0.0, torch.float32)
    ss = None if scale_shift is None else scale_shift.to(x.dtype)
    r = None if residual is None else residual.to(x.dtype)
    return torch.ops.fastdiff.group_norm_silu_fwd(x, num_groups, w, b, eps, ss, r)


GROUP_NORM_SILU = Op("group_norm_silu", group_norm_silu_reference)
for _backend in (
    extension_backend("cuda", "group_norm_silu_fwd", _extension_group_norm_silu, check=_cuda_check),
    triton_backend(_triton_group_norm_silu, check=_triton_check),
    extension_backend(
        "cpu", "group_norm_silu_fwd", _extension_group_norm_silu, check=_extension_check
    ),
):
    GROUP_NORM_SILU.register(_backend)


@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale_shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    backend: str | None,
) -> torch.Tensor:
    args = (x, num_groups, weight, bias, eps, scale_shift, residual)
    return GROUP_NORM_SILU.select(*args, backend=backend).fn(*args)


@_group_norm_silu_op.register_fake
def _group_norm_silu_fake(x, num_groups, weight, bias, eps, scale_shift, residual, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, scale_shift, residual, _ = inputs
    ctx.save_for_backward(x, weight, bias, scale_shift, residual)
    ctx.num_groups, ctx.eps = num_groups, eps


def _backward(ctx, grad):
    x, weight, bias, scale_shift, residual = ctx.saved_tensors
    dx, dw, db, dss, dr = group_norm_silu_backward_reference(
        x, ctx.num_groups, weight, bias, ctx.eps, scale_shift, residual, grad
    )
    return dx, None, dw, db, None, dss, dr, None


_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(x, num_groups, weight, bias, scale_shift, residual) -> None:
    if x.dim() < 3:
        raise ValueError(f"group_norm_silu: x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    B, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(
            f"group_norm_silu: {C} channels do not split into num_groups={num_groups} groups; "
            "pass a divisor of the channel count"
        )
    expected = {
        "weight": (weight, [(C,)]),
        "bias": (bias, [(C,)]),
        "scale_shift": (scale_shift, [(B, 2 * C)]),
        "residual": (residual, [tuple(x.shape), (B, C)]),
    }
    for name, (t, shapes) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) not in shapes:
            raise ValueError(
                f"group_norm_silu: {name} must have shape {' or '.join(map(str, shapes))} for x of "
                f"shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {t.device} but x is on {x.device}")


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    scale_shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """silu(group_norm(x + residual) * (1 + scale) + shift) in one pass (see module docstring).
    `backend` ("cuda", "triton", "cpu", "reference") forces one; None picks the first that can."""
    _check_inputs(x, num_groups, weight, bias, scale_shift, residual)
    return _group_norm_silu_op(
        x, num_groups, weight, bias, float(eps), scale_shift, residual, backend
    )


def group_norm_silu_bytes(x: torch.Tensor) -> int:
    """The byte floor of one call without residual: read x once, write the output once."""
    return 2 * x.numel() * x.element_size()
