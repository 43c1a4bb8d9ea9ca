import math
import os
import random

import numpy as np
import pytest
import torch
from scipy import stats

from fastdiff import noise
from fastdiff.noise import box_muller, gaussian, philox4x32_10, philox_key, randn_like_batch

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

if not torch.cuda.is_available():  # DESIGN.md: without a GPU, Triton runs under its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

M32 = 0xFFFFFFFF

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter (4), key (2), expected (4).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are small: one thread is as fast and does not collapse on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def philox_scalar(ctr, key):
    """Philox4x32-10 on Python ints, written from the SC'11 paper independently of fastdiff."""
    c, (k0, k1) = list(ctr), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
    return tuple(c)


def normal64(wa, wb):
    """The spec's Box-Muller in float64; theta is the spec's fp32 value (one rounding of an
    exact product), so the only differences from fp32 are the libm and final roundings."""
    ua = ((wa >> 9).double() + 0.5) * 2.0**-23
    ub = ((wb >> 9).double() + 0.5) * 2.0**-23
    theta = ((ub - 0.5) * float(np.float32(2 * math.pi))).float().double()
    r = torch.sqrt(-2.0 * torch.log(ua))
    return r * torch.cos(theta), r * torch.sin(theta)


def corr(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack((a, b)))[0, 1]), a.numel()


def test_constants():
    assert (noise.PHILOX_M0, noise.PHILOX_M1) == (0xD2511F53, 0xCD9E8D57)
    assert (noise.PHILOX_W0, noise.PHILOX_W1) == (0x9E3779B9, 0xBB67AE85)
    assert noise.TWO_PI_F32 == float(np.float32(2 * math.pi))
    assert philox_key(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)


@pytest.mark.parametrize("ctr, key, expected", KAT)
def test_philox_known_answers(ctr, key, expected):
    assert philox_scalar(ctr, key) == expected
    assert philox4x32_10(*ctr, *key) == expected  # Python ints: the host-scalar path
    out = philox4x32_10(*(torch.tensor([c]) for c in ctr), *key)
    assert tuple(int(w) for w in out) == expected
    out = philox4x32_10(*(torch.tensor([c]) for c in ctr), *(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in out) == expected


def test_philox_matches_scalar_near_overflow():
    rng = random.Random(1)
    edge = [0, 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    word = lambda: rng.choice(edge) if rng.random() < 0.4 else rng.getrandbits(32)
    for _ in range(8):
        key = (word(), word())
        ctrs = [tuple(word() for _ in range(4)) for _ in range(64)]
        out = philox4x32_10(*torch.tensor(ctrs).T, *key)
        got = torch.stack(out, dim=1).tolist()
        assert got == [list(philox_scalar(c, key)) for c in ctrs]


if triton is not None:

    @triton.jit
    def _triton_philox_words(c_ptr, out_ptr, seed, N: tl.constexpr):
        i = 4 * tl.arange(0, N)
        c0 = tl.load(c_ptr + i).to(tl.uint32)
        c1 = tl.load(c_ptr + i + 1).to(tl.uint32)
        c2 = tl.load(c_ptr + i + 2).to(tl.uint32)
        c3 = tl.load(c_ptr + i + 3).to(tl.uint32)
        w0, w1, w2, w3 = tl.random.philox(seed, c0, c1, c2, c3, 10)
        tl.store(out_ptr + i, w0.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i + 1, w1.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i + 2, w2.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + i + 3, w3.to(tl.int64) & 0xFFFFFFFF)


@pytest.mark.skipif(triton is None, reason="triton is not installed")
def test_philox_matches_triton():
    """The Triton kernels draw words with tl.random.philox: it must be this Philox."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not triton.knobs.runtime.interpret:
        pytest.skip("no GPU and TRITON_INTERPRET is not set: set TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(2)
    c = torch.randint(0, 2**32, (64, 4), generator=g, dtype=torch.int64)
    c[0], c[1] = 0, M32
    seed = 0xFEDCBA9876543210
    out = torch.empty_like(c, device=device)
    _triton_philox_words[(1,)](c.to(torch.int32).to(device), out, seed, N=64)
    expected = torch.stack(philox4x32_10(*c.T, *philox_key(seed)), dim=1)
    assert torch.equal(out.cpu(), expected)


def test_counter_layout_and_fp64_reference():
    """z(seed, s, n, e) from the scalar Philox and the float64 Box-Muller, element by element."""
    seed, numel = 2**64 - 3, 1823
    for step, n in ((0, [0, 1]), (2**32 - 1, [2**32 - 1, 5]), (17, [123456789])):
        z = gaussian(seed, step, torch.tensor(n), numel)
        assert z.shape == (len(n), numel) and z.dtype == torch.float32
        for row, ni in enumerate(n):
            for e in (0, 1, 2, 3, 4, 7, 1000, 1821, numel - 1):
                w = philox_scalar((e // 4, ni, step, 0), philox_key(seed))
                pair = torch.tensor(w[2 * (e % 4 // 2) : 2 * (e % 4 // 2) + 2])
                ref = normal64(pair[:1], pair[1:])[e % 2]
                assert abs(float(z[row, e]) - float(ref)) <= 1e-6, (step, ni, e)


def test_fp32_matches_fp64():
    """The fp32 pipeline is within 1e-6 of float64, including the tails (smallest u) and theta
    near 0 and +-pi (u of wb at both ends)."""
    w = torch.stack(philox4x32_10(torch.arange(2**17), 3, 1, 0, *philox_key(9)))  # (4, 2**17)
    k = torch.cat((torch.arange(512), 2**23 - 1 - torch.arange(512), 2**22 + torch.arange(64)))
    extreme = torch.cartesian_prod(k << 9, k << 9).T  # u at both ends, every pairing
    worst = 0.0
    for wa, wb in ((w[0], w[1]), (w[2], w[3]), (extreme[0], extreme[1])):
        for z32, z64 in zip(box_muller(wa, wb), normal64(wa, wb)):
            worst = max(worst, float((z32.double() - z64).abs().max()))
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("offset", [0, 5, 2**32 - 8])
def test_batch_size_and_position_invariance(offset):
    seed, step, shape = 31, 4, (3, 5, 7)
    z8 = randn_like_batch(seed, step, (8, *shape), sample_offset=offset)
    for b in (1, 3):
        for start in range(0, 8 - b + 1, 2):
            zb = randn_like_batch(seed, step, (b, *shape), sample_offset=offset + start)
            assert torch.equal(zb, z8[start : start + b])
    idx = torch.tensor([6, 0, 3]) + offset  # any order, any position
    assert torch.equal(gaussian(seed, step, idx, 105).reshape(3, *shape), z8[[6, 0, 3]])
    # z does not depend on how many elements are drawn either
    assert torch.equal(gaussian(seed, step, idx, 50), gaussian(seed, step, idx, 105)[:, :50])


def test_layout_is_logical_c_order():
    z = randn_like_batch(3, 2, (2, 4, 6, 5))
    flat = gaussian(3, 2, torch.arange(2), 4 * 6 * 5)
    assert torch.equal(z, flat.reshape(2, 4, 6, 5))
    half = randn_like_batch(3, 2, (2, 4, 6, 5), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, z.to(torch.bfloat16))


def test_distribution():
    z = gaussian(0, 0, torch.arange(4), 250_000)  # 1e6 values
    x = z.double().flatten()
    n = x.numel()
    assert abs(float(x.mean())) < 6 / math.sqrt(n)
    assert abs(float(x.var()) - 1) < 6 * math.sqrt(2 / n)
    assert stats.kstest(x.numpy(), "norm").pvalue > 1e-3
    lanes = z.reshape(4, -1, 4).transpose(0, 2).reshape(4, -1).double()  # (lane, n / 4)
    m = lanes.shape[1]
    for lane in lanes:
        assert abs(float(lane.mean())) < 6 / math.sqrt(m)
        assert abs(float(lane.var()) - 1) < 6 * math.sqrt(2 / m)
        assert stats.kstest(lane.numpy(), "norm").pvalue > 1e-3


def test_no_correlation():
    numel = 4 * 65_536
    z = gaussian(0, 0, torch.arange(4), numel)
    pairs = {
        "neighbouring elements": (z[:, :-1], z[:, 1:]),
        "neighbouring squares": (z[:, :-1] ** 2, z[:, 1:] ** 2),
        "lanes 0 and 2": (z[:, 0::4], z[:, 2::4]),
        "consecutive samples": (z[:-1], z[1:]),
        "consecutive steps": (z, gaussian(0, 1, torch.arange(4), numel)),
        "seeds 0 and 1": (z, gaussian(1, 0, torch.arange(4), numel)),
        "seeds 0 and 2**32": (z, gaussian(2**32, 0, torch.arange(4), numel)),
    }
    for name, (a, b) in pairs.items():
        c, n = corr(a, b)
        assert abs(c) < 5 / math.sqrt(n), (name, c)


def test_determinism_and_tensor_step():
    idx = torch.tensor([0, 9, 4])
    a = gaussian(77, 12, idx, 1823)
    assert torch.equal(a, gaussian(77, 12, idx, 1823))
    assert torch.equal(a, gaussian(77, torch.tensor(12), idx, 1823))
    assert torch.equal(a, gaussian(77, torch.tensor(12, dtype=torch.int32), idx, 1823))
    assert not torch.equal(a, gaussian(77, 13, idx, 1823))
    assert not torch.equal(a, gaussian(78, 12, idx, 1823))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_sync():
    step = torch.tensor(3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z = randn_like_batch(5, step, (3, 4, 33, 17), sample_offset=2, device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = randn_like_batch(5, 3, (3, 4, 33, 17), sample_offset=2)
    assert (z.cpu() - ref).abs().max() <= 1e-6


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: philox_key(-1), "seed"),
        (lambda: philox_key(2**64), "seed"),
        (lambda: gaussian(0, -1, torch.arange(2), 8), "step"),
        (lambda: gaussian(0, torch.ones(2, dtype=torch.int64), torch.arange(2), 8), "step"),
        (lambda: gaussian(0, 0, torch.zeros(2, 2, dtype=torch.int64), 8), "sample_index"),
        (lambda: randn_like_batch(0, 0, (2, 3), sample_offset=2**32 - 1), "sample indices"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
