"""Scaled dot-product attention, softmax(q k^T * scale) v, in SDPA's (B, heads, L, d) layout.

Backends, in order: `triton` (kernels/attention.py, flash-attention forward with the online
softmax; automatic dispatch gives it 16-bit CUDA tensors, fp32 only by name), `sdpa` (torch's
scaled_dot_product_attention: fp32 on CUDA, and where Triton cannot run, e.g. on a CPU without
TRITON_INTERPRET) and the reference. A CUDA C++ kernel is its own issue:
it goes first, `ATTENTION.backends.insert(0, Backend("cuda", ..., ("cuda",), ready=...))`.

The op is `torch.ops.fastdiff.attention` (torch.library.custom_op): torch.compile and
torch.export see one opaque node with a fake impl, and the backend is chosen when it runs.
Gradients come from the reference formulas (materialising the Lq x Lkv probabilities), enough
to train the small models; a flash backward kernel is future work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdiff.ops._dispatch import Backend, Op, beyond_32_bit_offsets, triton_backend

MAX_HEAD_DIM = 256

# TARGETS.md shapes (batch * heads, Lq, Lkv, head dim) for benchmarks/run.py
BENCH_SHAPES = {
    "sd15-self-d40": (16, 4096, 4096, 40),
    "self-d64": (16, 4096, 4096, 64),
    "ddpm-cifar10-d256": (256, 256, 256, 256),
    "sd15-cross-d40": (16, 4096, 77, 40),
}


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """The definition, in fp32 (fp64 for fp64 inputs). Traffic: reads q, k, v and writes and
    re-reads the (B, heads, Lq, Lkv) scores and probabilities in fp32 (8 Lq Lkv bytes each)."""
    acc = _acc_dtype(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, heads, Lq, Lkv)
    return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)


def attention_backward_reference(q, k, v, grad, scale):
    """d(q, k, v) of attention_reference for the output gradient `grad`, in fp32 (fp64)."""
    acc = _acc_dtype(q)
    qf, kf, vf, gf = (t.to(acc) for t in (q, k, v, grad))
    p = torch.softmax(torch.matmul(qf, kf.transpose(-1, -2)) * scale, dim=-1)
    dp = torch.matmul(gf, vf.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale  # softmax Jacobian, then the scale
    dq = torch.matmul(ds, kf)
    dk = torch.matmul(ds.transpose(-1, -2), qf)
    dv = torch.matmul(p.transpose(-1, -2), gf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _triton_check(q, k=None, v=None, scale=None) -> list[str]:
    reasons = []
    head_dim = max(t.shape[-1] for t in (q, v) if t is not None)
    if head_dim > MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} > {MAX_HEAD_DIM}")
    if k is not None and k.shape[-2] == 0:
        reasons.append("no keys (Lkv = 0)")
    return reasons + beyond_32_bit_offsets(q, k, v)


def _triton_by_name_only(q, k, v, scale) -> str | None:
    if q.dtype == torch.float32:
        # fp32 products run on FMA units, whose dot lowering needs the whole head dim of q and
        # K^T per thread: ptxas spills registers at every tile size (scripts/compile_kernels.py)
        return "float32 (its dots spill registers; sdpa's fp32 kernel is faster)"
    return None


def _triton_attention(q, k, v, scale):
    from fastdiff.kernels.attention import attention_fwd

    return attention_fwd(q, k, v, scale)


def _sdpa_attention(q, k, v, scale):
    # PyTorch's own best kernel (flash / memory-efficient / cuDNN / math), made contiguous: the
    # op promises a contiguous output and some SDPA kernels return a permuted one
    return F.scaled_dot_product_attention(q, k, v, scale=scale).contiguous()


ATTENTION = Op("attention", attention_reference)
ATTENTION.register(
    triton_backend(_triton_attention, check=_triton_check, by_name_only=_triton_by_name_only)
)
ATTENTION.register(Backend("sdpa", _sdpa_attention, ("cpu", "cuda")))


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str | None
) -> torch.Tensor:
    return ATTENTION.select(q, k, v, scale, backend=backend).fn(q, k, v, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, scale, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, scale, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale = scale


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    return (*attention_backward_reference(q, k, v, grad, ctx.scale), None, None)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(
            f"attention: q, k, v must be 4-D (B, heads, L, d), got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}; for (B, L, heads, d) pass .transpose(1, 2)"
        )
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "attention: expected q (B, heads, Lq, d), k (B, heads, Lkv, d), v (B, heads, Lkv, dv);"
            f" got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"attention: q, k, v must share dtype and device, got {q.dtype}/{q.device}, "
            f"{k.dtype}/{k.device}, {v.dtype}/{v.device}; convert them with .to(...)"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, heads, Lq, d), k (B, heads, Lkv, d), v (B, heads,
    Lkv, dv), any strides; scale defaults to d ** -0.5. Returns (B, heads, Lq, dv), contiguous.
    `backend` ("triton", "sdpa", "reference") forces one; None picks the first that can run."""
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_op(q, k, v, scale, backend)


def attention_flops(batch_heads: int, lq: int, lkv: int, head_dim: int) -> int:
    """Forward FLOPs (two matmuls of 2 Lq Lkv d each), for TFLOP/s figures."""
    return 4 * batch_heads * lq * lkv * head_dim
