"""The sampler step: one row of a plan's coefficient table applied to the state (samplers.py).

Every backend computes, elementwise and in fp32 (fp64 for fp64 tensors):

    y      = y_u + g (y - y_u)                       (only with guidance: y_uncond given)
    x0     = clamp(A x + B y)                        (clamp optional)
    x_next = X_X x + X_D x0 + X_H0 h0 + X_H1 h1 + X_Z z(seed, step = counter + 1, sample, element)
    h_k    = H_k row . (x, x0, h0, h1)               (in place, only where W_k = 1)

The row is table[counter], read on the device: the loop never syncs with the host.
Memory traffic of the reference: each term is a separate kernel, ~12 reads and writes of the
state per step; the fused backends read x, y (, y_u, h0, h1) once and write x_next (, h) once.
"""

from __future__ import annotations

import torch

from fastdiff import noise
from fastdiff.ops._dispatch import Op
from fastdiff.samplers import Col


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
) -> torch.Tensor:
    """Apply row table[counter] (counter: int64 tensor of shape () on x's device). Returns
    x_next in x's dtype; h0 and h1 are updated in place. `stochastic=False` promises that no
    row of the table injects noise, so none is drawn."""
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
    return x_next.to(x.dtype)


step_op = Op("step", step_reference)


def step(*args, backend: str | None = None, **kwargs) -> torch.Tensor:
    """Apply one plan row with the first backend that can (see step_reference for arguments)."""
    return step_op.select(args[0], backend=backend).fn(*args, **kwargs)
