"""The fused sampler step in Triton (fastdiff/ops/step.py defines it; samplers.py its table):

    y      = y_u + g (y - y_u)                                        (GUIDED)
    d      = clamp(A x + B y)                                         (CLAMP)
    x_next = X_X x + X_D d [+ X_H0 h0] [+ X_H1 h1] + X_Z z(seed, counter + 1, sample, e)
    h_k    = Hk_X x + Hk_D d [+ Hk_H0 h0] [+ Hk_H1 h1]                 (stored where W_k != 0)

The row is table[counter], loaded by the kernel (no host sync; CUDA-graph safe). One program
handles BLOCK logical elements of one sample, as BLOCK // 4 Philox blocks: each block's four
normals (tl.random.philox with the counter (e // 4, sample, step, 0), Box-Muller with libdevice's
log/sin/cos and sqrt_rn, as fastdiff/noise.py specifies) land on its four consecutive logical
elements. The tile is (BLOCK // VEC, VEC), VEC = 16 bytes of the state's dtype (4 fp32, 8
fp16/bf16; a row is VEC // 4 Philox blocks), so contiguous states load and store 16 bytes per
access (scripts/compile_kernels.py shows the LDG.E.128). channels_last states map logical
e = c * HW + p to memory p * C + c: without noise the order does not matter and the state runs
as the flat array it is; with noise, for 2^k channels and HW a multiple of VEC, a program takes
BLOCK // C positions of all channels (a contiguous range of memory, 16-byte accesses again) and
transposes the noise, drawn per channel along logical e, into that order (TRANSPOSE); otherwise
it takes BLOCK logical elements, each loaded from its own address (GATHER). Traffic: the
reference makes ~12 passes over the state; this kernel reads x, y (, y_u, h0, h1) and writes
x_next (, h) once: 12 B/element for DDIM in fp32, 20 for DPM-Solver++(2M). _gaussian_kernel is
the same tiling and noise alone (a sample's x_T): out = z * scale, written once.
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fastdiff.samplers import NCOEF as _NCOEF
from fastdiff.samplers import Col

# libdevice has no interpreter implementation: under TRITON_INTERPRET=1 (CPU tensors) the math
# comes from numpy instead, still float32 and within the noise tolerance.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
NCOEF = tl.constexpr(_NCOEF)
A, B = tl.constexpr(int(Col.A)), tl.constexpr(int(Col.B))
X_X, X_Z = tl.constexpr(int(Col.X_X)), tl.constexpr(int(Col.X_Z))
H0_X, H1_X = tl.constexpr(int(Col.H0_X)), tl.constexpr(int(Col.H1_X))
W0, W1 = tl.constexpr(int(Col.W0)), tl.constexpr(int(Col.W1))
# _tile's layouts. MEMORY: rows along memory, which is logical order (NCHW, or a step without
# noise, where order does not matter). GATHER (channels_last): rows along logical e, each element
# loaded from its own address. TRANSPOSE (channels_last): rows along memory, the noise drawn in
# logical order and transposed into the tile.
MEMORY, GATHER, TRANSPOSE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _box_muller(wa, wb):
    """Two fp32 normals from two uint32 words (fastdiff/noise.py)."""
    ua = ((wa >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # exact: * 2**-23
    ub = ((wb >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    theta = (ub - 0.5) * 6.2831854820251465  # float32(2 pi), one rounding
    # cos and sin before the log: the other order kept log(ua) live across sin/cos's (never
    # taken) large-argument paths, which Triton 3.6's ptxas spilled in the heaviest configs
    if _INTERPRETED:
        c, s = tl.cos(theta), tl.sin(theta)
        r = tl.sqrt_rn(-2.0 * tl.log(ua))
    else:
        c, s = libdevice.cos(theta), libdevice.sin(theta)
        r = libdevice.sqrt_rn(-2.0 * libdevice.log(ua))
    return r * c, r * s


@triton.jit
def _block_normals(seed, q, n, s):
    """The four normals of each Philox block q[i] of sample n at step s."""
    c0 = q.to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, w2, w3 = tl.random.philox(seed, c0, zero + n.to(tl.uint32), zero + s.to(tl.uint32),
                                      zero, 10)  # fmt: skip
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def _normals(seed, rows, n, s, VEC: tl.constexpr):
    """(len(rows), VEC) normals: row i holds the VEC logical elements from VEC * rows[i] on,
    i.e. VEC // 4 consecutive Philox blocks. Built by joins, which keep each row in one thread's
    registers (a reshape of a (len * VEC // 4, 4) tile would go through shared memory)."""
    tl.static_assert(VEC == 4 or VEC == 8, "VEC: 16 bytes of fp32, fp16 or bf16")
    if VEC == 4:
        z0, z1, z2, z3 = _block_normals(seed, rows, n, s)
        z = tl.join(tl.join(z0, z2), tl.join(z1, z3))  # [i, a, b] = z_{2a+b}
    else:  # VEC == 8: blocks 2 rows[i] (a = 0) and 2 rows[i] + 1 (a = 1)
        e0, e1, e2, e3 = _block_normals(seed, 2 * rows, n, s)
        o0, o1, o2, o3 = _block_normals(seed, 2 * rows + 1, n, s)
        # [i, a, b, c] = block a's z_{2b+c}: join first on a, then b, then c
        z = tl.join(
            tl.join(tl.join(e0, o0), tl.join(e2, o2)), tl.join(tl.join(e1, o1), tl.join(e3, o3))
        )
    return tl.reshape(z, (rows.shape[0], VEC))


@triton.jit
def _coef(row_ptr, col: tl.constexpr):
    return tl.load(row_ptr + col).to(tl.float32)


@triton.jit
def _combo(row_ptr, col: tl.constexpr, x, d, h0, h1, HAS_H0: tl.constexpr, HAS_H1: tl.constexpr):
    """0 + c x + c d [+ c h0] [+ c h1] with the coefficients at columns col .. col + 3."""
    v = 0.0 + _coef(row_ptr, col) * x + _coef(row_ptr, col + 1) * d
    if HAS_H0:
        v = v + _coef(row_ptr, col + 2) * h0
    if HAS_H1:
        v = v + _coef(row_ptr, col + 3) * h1
    return v


@triton.jit
def _tile(blocks_per_sample, per_sample, positions, channels, LAYOUT: tl.constexpr,
          BLOCK: tl.constexpr, VEC: tl.constexpr):  # fmt: skip
    """This program's BLOCK elements of sample b, as (BLOCK // VEC, VEC): the program's index j
    within the sample, the rows' indices (rows of VEC elements), their memory offsets and their
    mask. The rows run along memory, except for GATHER, where they run along logical e."""
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    j = (pid % blocks_per_sample).to(tl.int64)
    rows = j * (BLOCK // VEC) + tl.arange(0, BLOCK // VEC)
    e = VEC * rows[:, None] + tl.arange(0, VEC)[None, :]
    mask = e < per_sample
    if LAYOUT == GATHER:
        off = (e % positions) * channels + e // positions
    else:
        off = e
    return b, j, rows, off + b.to(tl.int64) * per_sample, mask


@triton.jit
def _tile_normals(seed, j, rows, positions, n, s, LAYOUT: tl.constexpr, BLOCK: tl.constexpr,
                  VEC: tl.constexpr, CHANNELS: tl.constexpr):  # fmt: skip
    """The noise of _tile's elements, in the tile's (BLOCK // VEC, VEC) order. A TRANSPOSE tile
    holds positions [j PB, (j + 1) PB) of all CHANNELS channels (PB = BLOCK // CHANNELS, a
    multiple of VEC, as is P): channel c's PB logical elements start at c P + j PB, a row
    boundary. Their normals are drawn as (CHANNELS, PB), rows along positions, and transposed
    to memory order (through shared memory, compiled)."""
    if LAYOUT == TRANSPOSE:
        PB: tl.constexpr = BLOCK // CHANNELS
        k = tl.arange(0, BLOCK // VEC)
        c = k // (PB // VEC)
        logical = c * (positions // VEC) + j * (PB // VEC) + (k - c * (PB // VEC))
        z = tl.reshape(_normals(seed, logical, n, s, VEC), (CHANNELS, PB))
        z = tl.reshape(tl.trans(z), (BLOCK // VEC, VEC))
    else:
        z = _normals(seed, rows, n, s, VEC)
    return z


@triton.jit(do_not_specialize=["seed", "sample_offset"])
def _step_kernel(
    x_ptr, y_ptr, yu_ptr, h0_ptr, h1_ptr, out_ptr, table_ptr, counter_ptr, nonfinite_ptr,
    seed, sample_offset, guidance, lo, hi, blocks_per_sample, per_sample, positions, channels,
    GUIDED: tl.constexpr, HAS_H0: tl.constexpr, HAS_H1: tl.constexpr, CLAMP: tl.constexpr,
    NOISE: tl.constexpr, LAYOUT: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr,
    CHANNELS: tl.constexpr, FLAG: tl.constexpr,
):  # fmt: skip
    b, j, rows, off, mask = _tile(
        blocks_per_sample, per_sample, positions, channels, LAYOUT, BLOCK, VEC
    )
    r = tl.load(counter_ptr)
    row = table_ptr + r * NCOEF
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        yu = tl.load(yu_ptr + off, mask=mask, other=0.0).to(tl.float32)
        y = yu + guidance * (y - yu)
    d = _coef(row, A) * x + _coef(row, B) * y
    if CLAMP:
        d = tl.where(d < lo, lo, d)  # torch.clamp: NaN passes through
        d = tl.where(d > hi, hi, d)
    h0 = tl.load(h0_ptr + off, mask=mask, other=0.0).to(tl.float32) if HAS_H0 else x
    h1 = tl.load(h1_ptr + off, mask=mask, other=0.0).to(tl.float32) if HAS_H1 else x

    x_next = _combo(row, X_X, x, d, h0, h1, HAS_H0, HAS_H1)
    if NOISE:
        z = _tile_normals(
            seed, j, rows, positions, sample_offset + b, r + 1, LAYOUT, BLOCK, VEC, CHANNELS
        )
        x_next = x_next + _coef(row, X_Z) * z
    out = x_next.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + off, out, mask=mask)
    if FLAG:  # NaN or infinite once stored: every such row of the tile sets the step's flag
        stored = out.to(tl.float32)
        bad = mask & ((stored != stored) | (tl.abs(stored) == float("inf")))
        # reduced along VEC only: a row is one thread's 16 bytes (no shared memory, no barrier)
        bad_rows = tl.max(bad.to(tl.int32), axis=1)
        tl.store(nonfinite_ptr + r + tl.zeros_like(rows), bad_rows, mask=bad_rows > 0)
    if HAS_H0:
        if _coef(row, W0) != 0:  # uniform: the whole grid reads the same row
            new = _combo(row, H0_X, x, d, h0, h1, HAS_H0, HAS_H1)
            tl.store(h0_ptr + off, new.to(h0_ptr.dtype.element_ty), mask=mask)
    if HAS_H1:
        if _coef(row, W1) != 0:
            new = _combo(row, H1_X, x, d, h0, h1, HAS_H0, HAS_H1)
            tl.store(h1_ptr + off, new.to(h1_ptr.dtype.element_ty), mask=mask)


def step(
    x: torch.Tensor,
    y: torch.Tensor,
    y_uncond: torch.Tensor | None,
    h0: torch.Tensor | None,
    h1: torch.Tensor | None,
    table: torch.Tensor,
    counter: torch.Tensor,
    *,
    seed: int,
    sample_offset: int,
    guidance: float,
    clamp: tuple[float, float] | None,
    stochastic: bool,
    nonfinite: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Launch the kernel: x contiguous or channels_last; y, y_uncond, h0, h1 in x's layout,
    table (rows, NCOEF) contiguous and counter (int64, 0-d) on x's device; nonfinite, when
    given, int32 of shape (rows,): its element `counter` is set to 1 if x_next is not finite.
    Returns x_next."""
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    # without noise the update is elementwise in any order: the state runs as the flat array it
    # is in memory, channels_last or not (16-byte accesses either way)
    grid, layout = _layout(x, block, flat=not stochastic)
    lo, hi = clamp if clamp is not None else (0.0, 0.0)
    _step_kernel[grid](
        x, y, x if y_uncond is None else y_uncond, x if h0 is None else h0,
        x if h1 is None else h1, out, table, counter,
        counter if nonfinite is None else nonfinite,
        seed, sample_offset, float(guidance), float(lo), float(hi), *layout["sizes"],
        GUIDED=y_uncond is not None, HAS_H0=h0 is not None, HAS_H1=h1 is not None,
        CLAMP=clamp is not None, NOISE=stochastic, **layout["constexprs"],
        FLAG=nonfinite is not None,
        enable_fp_fusion=False,  # no FMA contraction: the reference's roundings, as in csrc/
    )  # fmt: skip
    return out


@triton.jit(do_not_specialize=["seed", "step", "sample_offset"])
def _gaussian_kernel(
    out_ptr, seed, step, sample_offset, scale, blocks_per_sample, per_sample, positions, channels,
    LAYOUT: tl.constexpr, BLOCK: tl.constexpr, VEC: tl.constexpr, CHANNELS: tl.constexpr,
):  # fmt: skip
    b, j, rows, off, mask = _tile(
        blocks_per_sample, per_sample, positions, channels, LAYOUT, BLOCK, VEC
    )
    z = _tile_normals(seed, j, rows, positions, sample_offset + b, step, LAYOUT, BLOCK, VEC,
                      CHANNELS) * scale  # fmt: skip
    tl.store(out_ptr + off, z.to(out_ptr.dtype.element_ty), mask=mask)


def gaussian_(
    out: torch.Tensor,
    seed: int,
    step: int,
    sample_offset: int,
    scale: float,
    block: int | None = None,
) -> torch.Tensor:
    """Fill out (contiguous or channels_last) with z(seed, step, sample_offset + b, e) * scale,
    the product in fp32 rounded once to out's dtype (fastdiff/ops/noise.py). Returns out."""
    if out.numel() == 0:
        return out
    # compiled: one 16-byte row per thread of the default 4 warps (at two rows, ptxas holds the
    # fp32 kernel to 32 registers and spills; scripts/compile_kernels.py)
    block = block or (None if _INTERPRETED else 4 * 32 * (16 // out.element_size()))
    grid, layout = _layout(out, block)
    _gaussian_kernel[grid](
        out, seed, step, sample_offset, float(scale), *layout["sizes"], **layout["constexprs"],
        num_warps=4,
    )  # fmt: skip
    return out


def _layout(x: torch.Tensor, block: int | None, flat: bool = False) -> tuple[tuple[int], dict]:
    """The grid and the layout arguments of _tile for a dense state x: one program per BLOCK
    elements of a sample; `flat`: x as one sample of its elements in memory order."""
    batch, vec = x.shape[0], 16 // x.element_size()
    layout, channels = MEMORY, 1
    if flat:
        batch, positions = 1, x.numel()
    elif x.is_contiguous():
        positions = x.numel() // batch
    else:
        positions, channels = x.shape[2] * x.shape[3], x.shape[1]
        # a tile in memory order whose noise is transposed into it: every channel's run of
        # logical elements must start on a row of VEC (P a multiple of VEC) and the tile hold
        # whole rows of every channel (C a power of two, C * VEC <= BLOCK)
        tile = block or (4096 if _INTERPRETED else 1024)
        pow2 = channels & (channels - 1) == 0
        layout = (
            TRANSPOSE if pow2 and positions % vec == 0 and tile % (channels * vec) == 0 else GATHER
        )
    # interpreted, a program costs the same whatever its size: fewer, bigger ones. Compiled,
    # a GATHER program loads and stores element by element, each with its own address: one
    # 16-byte row per thread of 4 warps there (two fp32 rows took up to 150 registers).
    block = block or (4096 if _INTERPRETED else 4 * 32 * vec if layout == GATHER else 1024)
    per_sample = positions * channels
    blocks_per_sample = triton.cdiv(per_sample, block)
    return (batch * blocks_per_sample,), {
        "sizes": (blocks_per_sample, per_sample, positions, channels),
        "constexprs": dict(
            LAYOUT=layout, BLOCK=block, VEC=vec, CHANNELS=channels if layout == TRANSPOSE else 1
        ),
    }
