"""Flash-attention forward in Triton: softmax(q k^T * scale) v without the Lq x Lkv matrix.

Dao et al. 2022 (FlashAttention), Algorithm 1, with the online softmax of Milakov & Gimelshein
2018: each program owns BLOCK_M query rows, streams K/V in BLOCK_N blocks, keeps the running
row max m, row sum l and the unnormalised output in registers, and rescales them by
exp(m_old - m_new) whenever the max grows. Exponentials are base 2 (scale folded with log2 e).

Traffic: q, o once and K, V once per query block: (Lq + 2 Lkv * ceil(Lq / BLOCK_M)) * d
elements per (batch, head); FLOPs 4 * Lq * Lkv * d. Head dims that are not powers of two
(40, 72, 80, 160) are padded to D_PAD in registers only; the padding is masked on load/store.
"""

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# read when the kernels are defined, as triton.jit does
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    # the Triton 3.8 interpreter multiplies bfloat16 blocks as their uint16 bit patterns, so
    # interpreted bf16 runs upcast the (exactly representable) operands to fp32 first
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, k_base, v_base, start_n, LKV,
    skn, skd, svn, svd, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    kv_mask = offs_n < LKV if MASK_N else offs_n >= 0
    # K^T block (D_PAD, BLOCK_N) and V block (BLOCK_N, DV_PAD)
    kt = tl.load(
        k_base + offs_d[:, None] * skd + offs_n[None, :] * skn,
        mask=(offs_d[:, None] < D) & kv_mask[None, :],
        other=0.0,
    )
    s = _dot(q, kt, DOT_PRECISION, DOT_UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASK_N:
        s = tl.where(kv_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
        mask=kv_mask[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return acc, m_new, l_i


@triton.jit
def attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    H, LQ, LKV, qk_scale,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    # the batch, head and row strides arrive divided by ALIGN (elements): multiplied back by a
    # constexpr, the compiler knows every row starts 16-byte aligned and vectorises the loads
    sqb, sqh, sqm = sqb * ALIGN, sqh * ALIGN, sqm * ALIGN
    skb, skh, skn = skb * ALIGN, skh * ALIGN, skn * ALIGN
    svb, svh, svn = svb * ALIGN, svh * ALIGN, svn * ALIGN
    sob, soh, som = sob * ALIGN, soh * ALIGN, som * ALIGN
    # one program per (batch * head, query block); query blocks of one head are neighbours so
    # they share K/V in L2
    num_m = tl.cdiv(LQ, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
        mask=(offs_m[:, None] < LQ) & (offs_d[None, :] < D),
        other=0.0,
    )
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    n_full = (LKV // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, start_n, LKV, skn, skd, svn, svd,
            qk_scale, D, DV, D_PAD, DV_PAD, BLOCK_N, False, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    if n_full < LKV:
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, k_base, v_base, n_full, LKV, skn, skd, svn, svd,
            qk_scale, D, DV, D_PAD, DV_PAD, BLOCK_N, True, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    acc = acc / l_i[:, None]
    tl.store(
        o_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
        acc.to(o_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < LQ) & (offs_dv[None, :] < DV),
    )


def _pad(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _row_alignment(tensors: tuple[torch.Tensor, ...]) -> int:
    """The largest power of two (elements, at most 16 bytes' worth) that divides every batch,
    head and row stride; 1 unless the head dim is contiguous."""
    if any(t.stride(3) != 1 for t in tensors):
        return 1
    align = 16 // tensors[0].element_size()
    strides = [s for t in tensors for s in t.stride()[:3]]
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


def launch_config(d_pad: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes (untuned starting points for sm_90; the interpreter wants few, big blocks)."""
    if interpret:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=1)
    wide = dtype == torch.float32
    if d_pad <= 64:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    elif d_pad <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if wide:
        cfg["BLOCK_M"], cfg["BLOCK_N"] = cfg["BLOCK_M"] // 2, max(16, cfg["BLOCK_N"] // 2)
    return cfg


def _tile(m: int, n: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


# Other 16-bit tilings per padded head dim, for benchmarks/run.py to time against the default on
# a GPU: each compiles for sm_90 without spills and within its shared memory, with HGMMA
# (tests/test_compile_kernels.py)
TILE_CANDIDATES = {
    64: [_tile(128, 128, 8, 2), _tile(128, 64, 8, 3), _tile(64, 64, 4, 3)],
    128: [_tile(128, 128, 8, 2), _tile(64, 64, 4, 3)],
    256: [_tile(128, 32, 8, 2), _tile(64, 32, 4, 2)],
}


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, config: dict | None = None
) -> torch.Tensor:
    """q (B, H, Lq, d), k (B, H, Lkv, d), v (B, H, Lkv, dv), any strides -> o (B, H, Lq, dv).
    `config` (BLOCK_M, BLOCK_N, num_warps, num_stages) replaces launch_config's choice."""
    B, H, LQ, D = q.shape
    LKV, DV = k.shape[2], v.shape[3]
    o = torch.empty((B, H, LQ, DV), dtype=q.dtype, device=q.device)
    if o.numel() == 0:
        return o
    d_pad, dv_pad = _pad(D), _pad(DV)
    cfg = config or launch_config(max(d_pad, dv_pad), q.dtype, INTERPRET)
    grid = (triton.cdiv(LQ, cfg["BLOCK_M"]) * B * H,)
    align = _row_alignment((q, k, v, o))
    strides = [s // align if i < 3 else s for t in (q, k, v, o) for i, s in enumerate(t.stride())]
    attention_fwd_kernel[grid](
        q, k, v, o, *strides, H, LQ, LKV, scale * LOG2E,
        D=D, DV=DV, D_PAD=d_pad, DV_PAD=dv_pad, ALIGN=align,
        # fp32 inputs keep fp32 products: TF32 would break the tolerance rule (DESIGN.md)
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        **cfg,
    )  # fmt: skip
    return o
