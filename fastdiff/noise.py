"""fastdiff's Gaussian noise: the written specification and its vectorised PyTorch reference.

Every backend (this file, CPU C++, Triton, CUDA C++) draws noise from exactly this definition, so
a sample's noise depends only on (seed, step, sample index, element index).

Specification
-------------
Philox4x32-10 (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"), with the
round function and key schedule of Random123's philox4x32 and Triton's tl.random.philox:
    key     (k0, k1) = (seed & 0xFFFFFFFF, seed >> 32),  0 <= seed < 2**64
    round   (hi0, lo0) = mulhilo32(0xD2511F53, c0);  (hi1, lo1) = mulhilo32(0xCD9E8D57, c2)
            (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    10 rounds; between consecutive rounds k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2**32).
Counter of element e of global sample n at step s:
    (c0, c1, c2, c3) = (e // 4, n, s, 0); element e takes normal number e % 4 of that block.
    e is the logical C-order (NCHW) index within one sample, whatever the memory layout
    (a channels-last tensor uses the same e as its NCHW view). Step 0 draws x_T; the sampler
    row r (coefficient-table row) draws with step r + 1. n, s < 2**32 and e < 2**34.
Words to normals, all in fp32 (the 4 words (w0, w1, w2, w3) give two Box-Muller pairs):
    u(w)    = float(w >> 9) + 0.5f, then * 2**-23        (both exact: u in [2**-24, 1 - 2**-24])
    r       = sqrtf(-2.0f * logf(u(wa)))                 (the * -2 is exact)
    theta   = (u(wb) - 0.5f) * 6.2831855f               (subtraction exact; one rounding)
    (z0, z1) = (r * cosf(theta), r * sinf(theta))  from (wa, wb) = (w0, w1)
    (z2, z3) = (r * cosf(theta), r * sinf(theta))  from (wa, wb) = (w2, w3)
6.2831855f is float32(2*pi) = 6.2831854820251465. theta is bit-identical on every backend:
fmaf(u, 6.2831855f, -3.1415927f) gives the same bits (both halves exact), u * 2pi - pi with two
roundings does not. r, cos and sin differ between backends only by their libm: use correctly
rounded sqrt and <= 2 ulp logf/sinf/cosf (never __logf/__sinf/__cosf, --use_fast_math, or
Triton's tl.log/tl.sin/tl.cos, which are approximate on NVIDIA: use libdevice). Against float64
the fp32 result is within 1e-6 (<= 9e-7 worst case, at r near its maximum 5.77).
"""

import math
import operator

import torch

PHILOX_M0 = 0xD2511F53  # multiplier applied to c0
PHILOX_M1 = 0xCD9E8D57  # multiplier applied to c2
PHILOX_W0 = 0x9E3779B9  # Weyl increment of k0 (golden ratio)
PHILOX_W1 = 0xBB67AE85  # Weyl increment of k1 (sqrt(3) - 1)
PHILOX_ROUNDS = 10
TWO_PI_F32 = 6.2831854820251465  # exactly float32(2*pi), written 6.2831855f in C
U_SCALE = 2.0**-23  # u = ((w >> 9) + 0.5) * U_SCALE
MASK32 = 0xFFFFFFFF


def philox_key(seed: int) -> tuple[int, int]:
    seed = operator.index(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}; reduce it mod 2**64")
    return seed & MASK32, seed >> 32


def _mulhilo32(a, m: int):
    # Exact 32x32->64 product in int64 without overflow: split the constant into 16-bit halves,
    # a * m = t + u * 2**16 with t, u < 2**48.
    t = a * (m & 0xFFFF)
    u = a * (m >> 16)
    mid = t + ((u & 0xFFFF) << 16)  # < 2**49
    return (u >> 16) + (mid >> 32), mid & MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on broadcastable int64 tensors or Python ints holding uint32 values.

    Inputs are taken mod 2**32 (as a kernel's cast to uint32 would); outputs lie in [0, 2**32).
    Python ints stay host scalars (no host-to-device copy, so no sync in a CUDA-graph loop).
    """
    c0, c1, c2, c3, k0, k1 = (x & MASK32 for x in (c0, c1, c2, c3, k0, k1))
    for i in range(PHILOX_ROUNDS):
        if i:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    out = (c0, c1, c2, c3)
    if any(isinstance(w, torch.Tensor) for w in out):
        out = torch.broadcast_tensors(*(torch.as_tensor(w) for w in out))
    return tuple(out)


def _unit(w: torch.Tensor) -> torch.Tensor:
    return ((w >> 9).to(torch.float32) + 0.5) * U_SCALE


def box_muller(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 unit normals from two uint32 words, exactly as in the specification above."""
    r = torch.sqrt(-2.0 * torch.log(_unit(wa)))
    theta = (_unit(wb) - 0.5) * TWO_PI_F32
    return r * torch.cos(theta), r * torch.sin(theta)


def gaussian(seed: int, step, sample_index: torch.Tensor, numel: int, *, device=None):
    """Noise z(seed, step, n, e) for n in sample_index and e < numel: float32 (B, numel).

    `step` is an int or a 0-d integer tensor (kept on the device: read without a host sync).
    """
    k0, k1 = philox_key(seed)
    numel = operator.index(numel)
    if not 0 <= numel <= 2**34:
        raise ValueError(f"numel must be in [0, 2**34] (block counter is 32-bit), got {numel}")
    if sample_index.ndim != 1 or sample_index.dtype.is_floating_point:
        raise ValueError(
            f"sample_index must be a 1-d integer tensor of global sample indices, got "
            f"{sample_index.dtype} of shape {tuple(sample_index.shape)}"
        )
    device = sample_index.device if device is None else torch.device(device)
    n = sample_index.to(device=device, dtype=torch.int64)
    if isinstance(step, torch.Tensor):
        if step.ndim != 0 or step.dtype.is_floating_point:
            raise ValueError(f"step must be an int or a 0-d integer tensor, got {step!r}")
        s = step.to(torch.int64)
        if s.device.type != "cpu":  # a 0-d CPU tensor acts as a host scalar on any device
            s = s.to(device)
    else:
        s = operator.index(step)
        if not 0 <= s < 2**32:
            raise ValueError(f"step must be in [0, 2**32), got {s}")
    # One Philox block per 4 elements: about 5 live int64 (B, blocks) temporaries per round,
    # i.e. ~10 bytes per element, plus the fp32 output.
    blocks = (numel + 3) // 4
    c0 = torch.arange(blocks, dtype=torch.int64, device=device)  # (blocks,)
    w = philox4x32_10(c0, n[:, None], s, 0, k0, k1)  # 4 x (B, blocks)
    z0, z1 = box_muller(w[0], w[1])
    z2, z3 = box_muller(w[2], w[3])
    z = torch.stack((z0, z1, z2, z3), dim=-1)  # (B, blocks, 4)
    return z.reshape(n.shape[0], 4 * blocks)[:, :numel]


def randn_like_batch(
    seed: int, step, shape, *, sample_offset: int = 0, device=None, dtype=torch.float32
):
    """Noise of shape (B, ...) for samples sample_offset .. sample_offset + B - 1.

    Elements follow the C-order of the per-sample shape and the result is contiguous (for
    channels-last, convert it: element indices stay the logical NCHW ones). The fp32 noise is
    cast to `dtype`.
    """
    shape = tuple(shape)
    if not shape:
        raise ValueError("shape must have a leading batch dimension, got ()")
    start = operator.index(sample_offset)
    if not 0 <= start <= 2**32 - shape[0]:
        raise ValueError(f"sample indices {start}..{start + shape[0] - 1} must lie in [0, 2**32)")
    n = torch.arange(start, start + shape[0], dtype=torch.int64, device=device)
    return gaussian(seed, step, n, math.prod(shape[1:])).reshape(shape).to(dtype)
