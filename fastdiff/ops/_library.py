"""Python-side registrations for the ops of the compiled `fastdiff` torch library.

Every fake (meta) impl of a C++ op is registered here: csrc/ops.cpp names this module with
m.set_python_module, and fastdiff._ext.load() imports it right after the extension."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdiff import _ext


def has_op(name: str) -> bool:
    """Whether torch.ops.fastdiff.<name> exists (the extension is built and defines it)."""
    return _ext.available() and hasattr(torch.ops.fastdiff, name)


def register_fake(name: str) -> Callable[[Callable], Callable]:
    """torch.library.register_fake for fastdiff::<name>, skipped when the op does not exist."""

    def wrap(fn: Callable) -> Callable:
        if has_op(name):
            torch.library.register_fake(f"fastdiff::{name}", fn)
        return fn

    return wrap


@register_fake("axpby")
def _axpby_fake(x: torch.Tensor, y: torch.Tensor, a: float, b: float) -> torch.Tensor:
    torch._check(x.shape == y.shape, lambda: f"fastdiff::axpby: shapes {x.shape} != {y.shape}")
    torch._check(x.dtype == y.dtype, lambda: f"fastdiff::axpby: dtypes {x.dtype} != {y.dtype}")
    return torch.empty_like(x)


@register_fake("step")
def _step_fake(x, y, y_uncond, h0, h1, table, counter, *scalars_and_flags) -> torch.Tensor:
    for name, t in (("y", y), ("y_uncond", y_uncond), ("h0", h0), ("h1", h1)):
        if t is not None:
            torch._check(
                t.shape == x.shape and t.dtype == x.dtype,
                lambda name=name: f"fastdiff::step: {name} must match x ({x.dtype} {x.shape})",
            )
    torch._check(table.dim() == 2, lambda: "fastdiff::step: table must be (rows, NCOEF)")
    return torch.empty_like(x)  # x is dense: its strides are kept


@register_fake("gaussian_")
def _gaussian_fake(out, seed, step, sample_offset, scale) -> None:
    return None  # fills `out` in place; its metadata stays as it is
