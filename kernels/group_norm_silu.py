"""GroupNorm + SiLU in Triton, with the optional pre-norm residual and post-norm scale/shift of
a diffusion UNet's residual block fused in:

    h = x + residual                    (residual: x-shaped, or (B, C) broadcast over space)
    y = (h - mean_g) * rstd_g * w + b   (statistics per (batch, group), in fp32)
    y = y * (1 + scale) + shift         (scale_shift: (B, 2C) = [scale | shift], ADM)
    out = y * sigmoid(y)

One program per (batch, group). A group that fits one tile is read once; a bigger one is read
twice: a statistics pass combining per-tile (count, mean, M2) with Chan et al.'s parallel update
(no E[x^2] - E[x]^2 cancellation), then the normalise-and-write pass. Traffic: 2 (or 3) passes
over x, one write: 2-3 x numel x itemsize bytes (plus the residual's reads). A group of more
than four tiles (SD1.5's 41k elements; at batch 2 there are only 64 groups) has its positions
split over several programs in two launches: partial statistics into a small workspace, then
merge and write. The split depends on the group's size, never the batch.

The spatial dims are flattened to one strided axis S, and the tile is (BLOCK_C, BLOCK_S) with
explicit channel and spatial strides, so NCHW (spatial stride 1) and channels_last (channel
stride 1) are both read along their contiguous axis without a copy.
"""

import os

import torch
import triton
import triton.language as tl

# read when the kernels are defined, as triton.jit does
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _load_tile(
    x_base, r_base, c0, s0, CPG, S, sxc, sxs, src, srs,
    RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    mask = (offs_c[:, None] < CPG) & (offs_s[None, :] < S)
    h = tl.load(x_base + offs_c[:, None] * sxc + offs_s[None, :] * sxs, mask=mask, other=0.0)
    h = h.to(tl.float32)
    if RESIDUAL == 1:
        r = tl.load(r_base + offs_c[:, None] * src + offs_s[None, :] * srs, mask=mask, other=0.0)
        h += r.to(tl.float32)
    elif RESIDUAL == 2:
        # (B, C): one value per channel, broadcast over the positions (masked ones stay 0)
        r = tl.load(r_base + offs_c * src, mask=offs_c < CPG, other=0.0)
        h = tl.where(mask, h + r.to(tl.float32)[:, None], 0.0)
    return h, mask


@triton.jit
def _write_tile(
    h, mask, mean, rstd, w_base, b_base, ss_base, y_base, c0, s0, C, CPG, S, ssc, syc, sys,
    HAS_SCALE_SHIFT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    offs_c = c0 + tl.arange(0, BLOCK_C)
    offs_s = s0 + tl.arange(0, BLOCK_S)
    c_mask = offs_c < CPG
    a = tl.load(w_base + offs_c, mask=c_mask, other=0.0).to(tl.float32) * rstd
    bias = tl.load(b_base + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    y = (h - mean) * a[:, None] + bias[:, None]
    if HAS_SCALE_SHIFT:
        scale = tl.load(ss_base + offs_c * ssc, mask=c_mask, other=0.0).to(tl.float32)
        shift = tl.load(ss_base + (offs_c + C) * ssc, mask=c_mask, other=0.0).to(tl.float32)
        y = y * (1.0 + scale[:, None]) + shift[:, None]
    y = y * tl.sigmoid(y)
    ptrs = y_base + offs_c[:, None] * syc + offs_s[None, :] * sys
    tl.store(ptrs, y.to(y_base.dtype.element_ty), mask=mask)


@triton.jit
def _slice_pass(
    x_base, r_base, w_base, b_base, ss_base, y_base, mean_in, rstd, s_lo, s_hi, C, CPG,
    sxc, sxs, src, srs, ssc, syc, sys,
    RESIDUAL: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, WRITE: tl.constexpr,
):  # fmt: skip
    """One pass, tile by tile, over positions [s_lo, s_hi) of a group's channels: WRITE the
    output with (mean_in, rstd), or return the slice's (count, mean, M2)."""
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        for s0 in range(s_lo, s_hi, BLOCK_S):
            h, mask = _load_tile(
                x_base, r_base, c0, s0, CPG, s_hi, sxc, sxs, src, srs,
                RESIDUAL, BLOCK_C, BLOCK_S,
            )  # fmt: skip
            if WRITE:
                _write_tile(
                    h, mask, mean_in, rstd, w_base, b_base, ss_base, y_base, c0, s0, C, CPG,
                    s_hi, ssc, syc, sys, HAS_SCALE_SHIFT, BLOCK_C, BLOCK_S,
                )  # fmt: skip
            else:
                # the mask as 0/1 floats: predicates kept live across the reductions spill
                valid = mask.to(tl.float32)
                n = tl.sum(tl.sum(valid, 1), 0)
                tile_mean = tl.sum(tl.sum(h, 1), 0) / n
                d = (h - tile_mean) * valid
                tile_m2 = tl.sum(tl.sum(d * d, 1), 0)
                # Chan, Golub & LeVeque 1979: merge (count, mean, m2) with the tile's statistics
                total = count + n
                delta = tile_mean - mean
                f = n / total
                mean += delta * f
                m2 += tile_m2 + delta * delta * count * f
                count = total
    return count, mean, m2


@triton.jit
def _group_bases(
    pid, G, CPG, x_ptr, r_ptr, y_ptr, w_ptr, b_ptr, ss_ptr, sxb, sxc, srb, src, ssb, ssc, syb, syc
):
    """Pointers to the first element of group pid = batch * G + group in every operand."""
    b = pid // G
    c_start = (pid % G) * CPG
    return (
        x_ptr + b * sxb + c_start * sxc,
        r_ptr + b * srb + c_start * src,
        y_ptr + b * syb + c_start * syc,
        w_ptr + c_start,
        b_ptr + c_start,
        ss_ptr + b * ssb + c_start * ssc,
    )


@triton.jit
def group_norm_silu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, ss_ptr, r_ptr, y_ptr,
    sxb, sxc, sxs, srb, src, srs, ssb, ssc, syb, syc, sys,
    C, S, G, CPG, eps,
    RESIDUAL: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr,
):  # fmt: skip
    """One program per (batch, group)."""
    x_base, r_base, y_base, w_base, b_base, ss_base = _group_bases(
        tl.program_id(0), G, CPG, x_ptr, r_ptr, y_ptr, w_ptr, b_ptr, ss_ptr,
        sxb, sxc, srb, src, ssb, ssc, syb, syc,
    )  # fmt: skip
    if ONE_TILE:
        h, mask = _load_tile(
            x_base, r_base, 0, 0, CPG, S, sxc, sxs, src, srs, RESIDUAL, BLOCK_C, BLOCK_S
        )
        n = tl.sum(tl.sum(mask.to(tl.float32), 1), 0)
        mean = tl.sum(tl.sum(h, 1), 0) / n
        d = tl.where(mask, h - mean, 0.0)
        var = tl.sum(tl.sum(d * d, 1), 0) / n
        rstd = 1.0 / tl.sqrt(var + eps)
        _write_tile(
            h, mask, mean, rstd, w_base, b_base, ss_base, y_base, 0, 0, C, CPG, S, ssc, syc, sys,
            HAS_SCALE_SHIFT, BLOCK_C, BLOCK_S,
        )  # fmt: skip
    else:
        count, mean, m2 = _slice_pass(
            x_base, r_base, w_base, b_base, ss_base, y_base, 0.0, 0.0, 0, S, C, CPG,
            sxc, sxs, src, srs, ssc, syc, sys, RESIDUAL, HAS_SCALE_SHIFT, BLOCK_C, BLOCK_S,
            False,
        )  # fmt: skip
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        _slice_pass(
            x_base, r_base, w_base, b_base, ss_base, y_base, mean, rstd, 0, S, C, CPG,
            sxc, sxs, src, srs, ssc, syc, sys, RESIDUAL, HAS_SCALE_SHIFT, BLOCK_C, BLOCK_S,
            True,
        )  # fmt: skip


# A group of more than four tiles: its positions are split over SPLITS programs, in two
# launches: partial statistics into a (B * G, SPLITS, 3) fp32 workspace, then each program
# merges its group's partials and writes its slice.


@triton.jit
def group_norm_silu_stats_kernel(
    x_ptr, r_ptr, part_ptr, sxb, sxc, sxs, srb, src, srs, S, G, CPG, SLICE,
    RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    pid, split = tl.program_id(0), tl.program_id(1)
    x_base, r_base, _, _, _, _ = _group_bases(
        pid, G, CPG, x_ptr, r_ptr, x_ptr, x_ptr, x_ptr, x_ptr, sxb, sxc, srb, src, 0, 0, 0, 0
    )
    s_lo = split * SLICE
    s_hi = tl.minimum(s_lo + SLICE, S)
    count, mean, m2 = _slice_pass(
        x_base, r_base, x_ptr, x_ptr, x_ptr, x_ptr, 0.0, 0.0, s_lo, s_hi, 0, CPG,
        sxc, sxs, src, srs, 0, 0, 0, RESIDUAL, False, BLOCK_C, BLOCK_S, False,
    )  # fmt: skip
    out = part_ptr + (pid * tl.num_programs(1) + split) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def group_norm_silu_apply_kernel(
    x_ptr, w_ptr, b_ptr, ss_ptr, r_ptr, y_ptr, part_ptr,
    sxb, sxc, sxs, srb, src, srs, ssb, ssc, syb, syc, sys,
    C, S, G, CPG, SLICE, eps,
    RESIDUAL: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS_P2: tl.constexpr,
):  # fmt: skip
    pid, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    # the group's partials, merged at once: n = sum n_i, mean = sum n_i mean_i / n,
    # M2 = sum M2_i + sum n_i (mean_i - mean)^2
    i = tl.arange(0, SPLITS_P2)
    parts = part_ptr + (pid * splits + i) * 3
    n_i = tl.load(parts, mask=i < splits, other=0.0)
    mean_i = tl.load(parts + 1, mask=i < splits, other=0.0)
    m2_i = tl.load(parts + 2, mask=i < splits, other=0.0)
    n = tl.sum(n_i, 0)
    mean = tl.sum(n_i * mean_i, 0) / n
    m2 = tl.sum(m2_i + n_i * (mean_i - mean) * (mean_i - mean), 0)
    rstd = 1.0 / tl.sqrt(m2 / n + eps)
    x_base, r_base, y_base, w_base, b_base, ss_base = _group_bases(
        pid, G, CPG, x_ptr, r_ptr, y_ptr, w_ptr, b_ptr, ss_ptr,
        sxb, sxc, srb, src, ssb, ssc, syb, syc,
    )  # fmt: skip
    s_lo = split * SLICE
    s_hi = tl.minimum(s_lo + SLICE, S)
    _slice_pass(
        x_base, r_base, w_base, b_base, ss_base, y_base, mean, rstd, s_lo, s_hi, C, CPG,
        sxc, sxs, src, srs, ssc, syc, sys, RESIDUAL, HAS_SCALE_SHIFT, BLOCK_C, BLOCK_S,
        True,
    )  # fmt: skip


def launch_config(channels_per_group: int, spatial: int, interpret: bool) -> dict:
    """Tile shape: all of a group's channels (up to 64) by as many positions as fill the tile."""
    tile = 16384 if interpret else 4096
    block_c = min(triton.next_power_of_2(channels_per_group), 64)
    block_s = min(max(1, tile // block_c), triton.next_power_of_2(spatial))
    one_tile = channels_per_group <= block_c and spatial <= block_s
    num_warps = 4 if block_c * block_s <= 2048 else 8
    return dict(BLOCK_C=block_c, BLOCK_S=block_s, ONE_TILE=one_tile, num_warps=num_warps)


def split_positions(
    group_elements: int, spatial: int, block_c: int, block_s: int
) -> tuple[int, int]:
    """(splits, positions per split): a program per four tiles' worth of a group's elements, in
    whole tiles of positions, at most 32. It depends on the group's size alone, so a sample's
    output does not depend on the batch it is in."""
    tiles = triton.cdiv(spatial, block_s)
    splits = max(1, min(tiles, 32, triton.cdiv(group_elements, 4 * block_c * block_s)))
    per_split = triton.cdiv(tiles, splits) * block_s
    return triton.cdiv(spatial, per_split), per_split


def group_norm_silu_fwd(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    scale_shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (B, C, *spatial) whose spatial dims flatten to one strided axis (NCHW, channels_last);
    weight/bias (C,); scale_shift (B, 2C); residual x-shaped or (B, C). Output has x's layout."""
    B, C = x.shape[:2]
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    x3, y3 = x.view(B, C, -1), y.view(B, C, -1)
    S = x3.shape[2]
    # RESIDUAL: 0 none, 1 x-shaped, 2 (B, C) (read once per channel, not per position)
    if residual is None:
        kind, r_strides = 0, (0, 0, 0)
    elif residual.dim() == 2:
        kind, r_strides = 2, (*residual.stride(), 0)
    else:
        kind, r_strides = 1, residual.view(B, C, -1).stride()
    ss_strides = (0, 0) if scale_shift is None else scale_shift.stride()
    ss = x if scale_shift is None else scale_shift
    r = x if residual is None else residual
    cpg = C // num_groups
    cfg = launch_config(cpg, S, INTERPRET)
    flags = dict(RESIDUAL=kind, HAS_SCALE_SHIFT=scale_shift is not None)
    programs = B * num_groups
    splits, per_split = split_positions(cpg * S, S, cfg["BLOCK_C"], cfg["BLOCK_S"])
    if cfg["ONE_TILE"] or splits == 1:
        group_norm_silu_fwd_kernel[(programs,)](
            x, weight, bias, ss, r, y,
            *x3.stride(), *r_strides, *ss_strides, *y3.stride(),
            C, S, num_groups, cpg, eps, **flags, **cfg,
        )  # fmt: skip
        return y
    partial = torch.empty(programs * splits * 3, dtype=torch.float32, device=x.device)
    tile = dict(BLOCK_C=cfg["BLOCK_C"], BLOCK_S=cfg["BLOCK_S"], num_warps=cfg["num_warps"])
    group_norm_silu_stats_kernel[(programs, splits)](
        x, r, partial, *x3.stride(), *r_strides, S, num_groups, cpg, per_split,
        RESIDUAL=kind, **tile,
    )  # fmt: skip
    group_norm_silu_apply_kernel[(programs, splits)](
        x, weight, bias, ss, r, y, partial,
        *x3.stride(), *r_strides, *ss_strides, *y3.stride(),
        C, S, num_groups, cpg, per_split, eps,
        **flags, **tile, SPLITS_P2=triton.next_power_of_2(splits),
    )  # fmt: skip
    return y
