"""fastdiff.ops.attention: every backend against the fp64 reference under DESIGN.md's tolerance
rule, on odd head dims and sequence lengths, self- and cross-attention; dispatch; torch.library
registration (opcheck) and the registered gradients."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_tolerance
from torch._subclasses.fake_tensor import FakeTensorMode

from fastdiff.ops import use
from fastdiff.ops.attention import ATTENTION, attention, attention_reference

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW = [torch.float16, torch.bfloat16]


def qkv(B, H, LQ, LKV, D, dtype, DV=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, LQ, D), (B, H, LKV, D), (B, H, LKV, DV or D)]
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE, dtype) for s in shapes]


def check_backend(backend, q, k, v, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = attention(q, k, v, scale=scale, backend=backend)
    assert out.shape == (*q.shape[:3], v.shape[-1]) and out.dtype == q.dtype
    ref = attention_reference(q.double(), k.double(), v.double(), scale)
    torch_out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert_within_tolerance(out, ref, torch_out)


# (B, heads, Lq, Lkv, head dim): odd lengths, non-power-of-two head dims, cross-attention
SHAPES = [
    (2, 3, 97, 97, 40),
    (1, 2, 97, 77, 72),
    (1, 2, 33, 129, 160),
    (2, 1, 16, 5, 80),
    (1, 1, 7, 300, 256),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_triton_matches_reference(shape, dtype):
    check_backend("triton", *qkv(*shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_backend(dtype):
    q, k, v = qkv(2, 3, 97, 77, 72, dtype)
    check_backend("sdpa", q.transpose(1, 2).contiguous().transpose(1, 2), k, v)


def test_triton_long_sequence():
    check_backend("triton", *qkv(1, 1, 1025, 1025, 64, torch.float16))


def test_triton_value_dim_and_scale():
    q, k, v = qkv(1, 2, 50, 61, 48, torch.float16, DV=24)
    check_backend("triton", q, k, v, scale=0.3)


def test_triton_strided_inputs():
    """(B, L, heads, d) projections viewed as (B, heads, L, d) need no copy."""
    g = torch.Generator().manual_seed(1)
    qkv_proj = torch.randn(2, 97, 3, 4, 40, generator=g).to(DEVICE, torch.float16)
    q, k, v = qkv_proj.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    check_backend("triton", q, k, v)


def test_reference_matches_sdpa_in_fp64():
    q, k, v = qkv(2, 2, 31, 17, 40, torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, backend="reference"), expected)


def test_dispatch_and_errors():
    q, k, v = qkv(1, 1, 8, 8, 300, torch.float32)
    assert ATTENTION.available(q, k, v, 0.1) == ["sdpa", "reference"]
    with pytest.raises(RuntimeError, match="head dim 300 > 256"):
        attention(q, k, v, backend="triton")
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="reference"))
    with pytest.raises(ValueError, match="valid backends"):
        attention(q, k, v, backend="flash")
    q, k, v = qkv(1, 1, 8, 8, 64, torch.float64)
    with use("triton"), pytest.raises(RuntimeError, match="dtype float64"):
        attention(q, k, v)
    with pytest.raises(ValueError, match=r"\(B, heads, L, d\)"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="share dtype"):
        attention(q, k.float(), v)


def test_why_not_with_q_alone():
    """why_not(name, q), the README's form for the step op: Triton's head-dim limit reads q."""
    q = torch.randn(1, 2, 9, 300, device=DEVICE)
    assert ATTENTION.why_not("triton", q) == ["head dim 300 > 256"]
    assert ATTENTION.why_not("triton", q[..., :72]) == []
    assert ATTENTION.why_not("sdpa", q) == ATTENTION.why_not("reference", q) == []


def test_use_forces_backend():
    q, k, v = qkv(1, 2, 9, 9, 40, torch.float32)
    # on CPU tensors Triton would be interpreted, and fp32 Triton spills registers on CUDA: both
    # run only when named
    auto = "sdpa"
    assert ATTENTION.select(q, k, v, 0.1).name == auto
    assert "triton" in ATTENTION.available(q, k, v, 0.1)
    with use("triton"):
        assert ATTENTION.select(q, k, v, 0.1).name == "triton"
    with use("reference"):
        assert ATTENTION.select(q, k, v, 0.1).name == "reference"


@pytest.mark.parametrize(
    ("dtype", "auto"),
    [(torch.float16, "triton"), (torch.bfloat16, "triton"), (torch.float32, "sdpa")],
)
def test_cuda_dispatch_passes_over_fp32_triton(dtype, auto):
    """On CUDA tensors (fake ones here: no memory, no GPU needed) 16-bit attention goes to the
    Triton kernel and fp32 to sdpa, while a named Triton backend still takes fp32."""
    with FakeTensorMode():
        q, k, v = (torch.empty(1, 2, 97, 40, dtype=dtype, device="cuda") for _ in range(3))
        assert ATTENTION.select(q, k, v, 0.1).name == auto
        assert ATTENTION.select(q, k, v, 0.1, backend="triton").name == "triton"
        reason = ATTENTION.get("triton").by_name_only(q, k, v, 0.1)
    assert (reason is None) == (auto == "triton")
    assert reason is None or "float32" in reason


def test_opcheck():
    q, k, v = qkv(1, 2, 13, 11, 40, torch.float32)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, 0.2, None))


def test_gradients():
    """The registered backward against autograd through SDPA, in fp64."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 19, 11, 40, torch.float64, DV=24))
    grad = torch.randn(2, 2, 19, 24, dtype=torch.float64, device=DEVICE)
    ours = torch.autograd.grad(attention(q, k, v, scale=0.3), (q, k, v), grad)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    expected = torch.autograd.grad(sdpa, (q, k, v), grad)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)
