"""The noise of fastdiff/noise.py, drawn by the fused backends: `gaussian_(out, seed, step)`.

    out[b, e] = z(seed, step, sample_offset + b, e) * scale, in fp32 (fp64 for fp64 tensors),
    rounded once to out's dtype; e is the logical NCHW index, whatever out's layout.

A sample's x_T is step 0 (fastdiff.sample draws it here, scale = the plan's init_scale); row r
of a plan draws with step r + 1, as the step op does in its kernel. The reference evaluates the
specification with torch ops (~10 live bytes per element of int64 temporaries and ~100 kernels
per call); the fused backends (torch.ops.fastdiff.gaussian_ on `cuda` and `cpu`, the `triton`
kernel of kernels/step.py) write out once, with the step kernels' Philox and Box-Muller: their
values equal the reference's within 1e-6 in fp32, like the step's noise.
"""

from __future__ import annotations

import operator

import torch

from fastdiff import noise
from fastdiff.ops._dispatch import Op, extension_backend, triton_backend
from fastdiff.ops.step import _FUSED_DTYPES, _fused_check, _int64


def gaussian_reference(
    out: torch.Tensor, seed: int, step: int, *, sample_offset: int = 0, scale: float = 1.0
) -> torch.Tensor:
    """Fill `out` (shape (B, ...)) with the specification's noise times `scale`; returns out."""
    cdt = torch.float64 if out.dtype == torch.float64 else torch.float32
    z = noise.randn_like_batch(
        seed, step, out.shape, sample_offset=sample_offset, device=out.device
    )
    return out.copy_(z.to(cdt) * scale)  # copy_ rounds once, into out's layout


def _extension(out, seed, step, *, sample_offset, scale):
    torch.ops.fastdiff.gaussian_(out, _int64(seed), step, sample_offset, scale)
    return out


def _triton(out, seed, step, *, sample_offset, scale):
    from fastdiff.kernels.step import gaussian_ as triton_gaussian

    return triton_gaussian(out, seed, step, sample_offset, scale)


def _check(out, *args, **options) -> list[str]:
    return _fused_check(out)  # batched, contiguous or channels_last


gaussian_op = Op("gaussian", gaussian_reference)
# cpu before triton: on CPU tensors triton only runs interpreted (TRITON_INTERPRET=1)
for _backend in (
    extension_backend("cuda", "gaussian_", _extension, _FUSED_DTYPES, _check),
    extension_backend("cpu", "gaussian_", _extension, _FUSED_DTYPES, _check),
    triton_backend(_triton, _FUSED_DTYPES, _check),
):
    gaussian_op.register(_backend)


def gaussian_(
    out: torch.Tensor,
    seed: int,
    step: int,
    *,
    sample_offset: int = 0,
    scale: float = 1.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Fill `out` with z(seed, step, sample_offset + b, e) * scale using the first backend that
    can (`backend`: "cuda", "cpu", "triton" or "reference" forces one); returns out. An out in
    another layout than contiguous or channels_last goes to the reference."""
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point or out.dim() < 1:
        got = f"{out.dtype} of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else out
        raise ValueError(f"out must be a batched (B, ...) floating point tensor, got {got!r}")
    seed, step = operator.index(seed), operator.index(step)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}; reduce it mod 2**64")
    if not 0 <= step < 2**32:
        raise ValueError(
            f"step must be in [0, 2**32) (0 draws x_T, row r of a plan draws r + 1), got {step}"
        )
    sample_offset = operator.index(sample_offset)
    if not 0 <= sample_offset <= 2**32 - out.shape[0]:
        raise ValueError(
            f"sample indices {sample_offset}..{sample_offset + out.shape[0] - 1} must lie in "
            "[0, 2**32)"
        )
    options = {"sample_offset": sample_offset, "scale": float(scale)}
    chosen = gaussian_op.select(out, seed, step, backend=backend, **options)
    return chosen.fn(out, seed, step, **options)
