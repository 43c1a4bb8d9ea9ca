"""fastdiff.ops.group_norm_silu: every backend against the fp64 reference under DESIGN.md's
tolerance rule (NCHW and channels_last; residual and scale-shift conditioning; groups of 3 and
10 channels that fill no warp evenly; groups larger than one tile; two groups, each spread over
many blocks), the reference against
torch.nn.GroupNorm, dispatch, opcheck and the registered gradients."""

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_within_tolerance

from fastdiff.ops.group_norm_silu import (
    GROUP_NORM_SILU,
    group_norm_silu,
    group_norm_silu_reference,
)

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["cuda", "triton"] if DEVICE == "cuda" else ["triton", "cpu"]
CONDITIONING = ["none", "scale_shift", "temb", "residual"]


def require(backend):
    reason = GROUP_NORM_SILU.get(backend).ready()
    if reason:
        pytest.skip(f"{backend}: {reason}")


def inputs(shape, groups, dtype, conditioning, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]

    def randn(*s, mean=0.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) + mean).to(DEVICE, dtype)

    x = randn(*shape, mean=3.0)  # an offset mean: the variance must not cancel
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    cond = {}
    if conditioning == "scale_shift":
        cond["scale_shift"] = randn(B, 2 * C)
    elif conditioning == "temb":
        cond["residual"] = randn(B, C)
    elif conditioning == "residual":
        cond["residual"] = randn(*shape)
    return (x, groups, randn(C, mean=1.0), randn(C)), cond


def torch_group_norm_silu(x, groups, weight, bias, eps=1e-5, scale_shift=None, residual=None):
    """What a PyTorch model computes, in x's precision."""
    if residual is not None:
        x = x + (residual[..., None, None] if residual.dim() == 2 else residual)
    y = F.group_norm(x, groups, weight, bias, eps)
    if scale_shift is not None:
        scale, shift = scale_shift[..., None, None].chunk(2, dim=1)
        y = y * (1 + scale) + shift
    return F.silu(y)


def check_backend(backend, args, cond):
    require(backend)
    out = group_norm_silu(*args, **cond, backend=backend)
    x = args[0]
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride() == x.stride()
    as64 = lambda t: t.double() if torch.is_tensor(t) else t
    ref = group_norm_silu_reference(*map(as64, args), **{k: as64(v) for k, v in cond.items()})
    assert_within_tolerance(out, ref, torch_group_norm_silu(*args, **cond))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conditioning", CONDITIONING)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_reference_fp16(backend, conditioning, channels_last):
    check_backend(backend, *inputs((2, 96, 7, 9), 32, torch.float16, conditioning, channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conditioning", ["scale_shift", "temb"])
def test_matches_reference_dtypes(backend, dtype, conditioning):
    check_backend(backend, *inputs((2, 80, 9, 13), 8, dtype, conditioning, channels_last=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("conditioning", ["none", "temb"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_groups_larger_than_a_tile(backend, dtype, conditioning, channels_last):
    """80 channels per group and 1640 positions: the statistics pass merges many tiles (the
    CPU kernel's channels_last blocks of 204 positions: 8 whole and a partial one; an fp32 x is
    read in place there, with a per-channel residual as centres)."""
    shape = (1, 160, 40, 41)
    check_backend(backend, *inputs(shape, 2, dtype, conditioning, channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("conditioning", CONDITIONING)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_16_byte_runs(backend, dtype, conditioning, channels_last):
    """16 channels per group and 8x8 positions: every group splits into 16-byte runs in both
    layouts (the CUDA kernels' vector path); the same call on a tensor one element off 16-byte
    alignment takes the element-wise path and must agree too."""
    args, cond = inputs((2, 256, 8, 8), 16, dtype, conditioning, channels_last)
    check_backend(backend, args, cond)
    x = args[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shifted = torch.empty(x.numel() + 1, dtype=dtype, device=DEVICE)[1:]
    shifted = shifted.view(x.permute(0, 2, 3, 1).shape if channels_last else x.shape)
    shifted = shifted.permute(0, 3, 1, 2) if channels_last else shifted
    assert shifted.is_contiguous(memory_format=fmt) and shifted.data_ptr() % 16
    shifted.copy_(x)
    check_backend(backend, (shifted, *args[1:]), cond)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("conditioning", ["scale_shift", "temb"])
@pytest.mark.parametrize("shape", [(2, 320, 8, 8), (2, 640, 4, 4), (2, 128, 8, 8)], ids=str)
def test_channels_last_short_runs(backend, dtype, conditioning, shape):
    """SD1.5's 10 and 20 channels per group and ddpm-cifar10's 4, in channels_last: the CUDA
    kernel moves runs of 2 or 4 channels (4 or 8 bytes; 16 in fp32 where they fit), with weight,
    bias and conditioning loaded as vectors too; in fp32 the same call with a weight one element
    off 16-byte alignment falls back to single elements and must agree."""
    args, cond = inputs(shape, 32, dtype, conditioning, channels_last=True)
    check_backend(backend, args, cond)
    x, groups, w, b = args
    if dtype == torch.float32:  # a 16-bit weight is converted into a fresh, aligned tensor
        shifted = torch.empty(w.numel() + 1, dtype=dtype, device=DEVICE)[1:].copy_(w)
        check_backend(backend, (x, groups, shifted, b), cond)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 64, 96, 96), (1, 60, 45, 47)], ids=["16-byte-runs", "elementwise"]
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_two_large_groups(backend, dtype, shape, channels_last):
    """Two groups of 64k-300k elements: on a GPU the CUDA kernel splits each group over a
    cluster of blocks that merge their statistics, and holds more runs per thread than its
    registers can (the rest are read twice); both run layouts."""
    check_backend(backend, *inputs(shape, 2, dtype, "residual", channels_last))


@pytest.mark.parametrize("shape", [(1, 64, 96, 96), (1, 60, 45, 47)], ids=["runs", "elements"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cuda_without_clusters(monkeypatch, shape, channels_last):
    """FASTDIFF_CUDA_CLUSTERS=0 runs the CUDA kernel as on a GPU before Hopper: groups of more
    than 4096 elements take the two-launch path (statistics into a workspace, then apply);
    smaller ones one block each."""
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA device")
    require("cuda")
    monkeypatch.setenv("FASTDIFF_CUDA_CLUSTERS", "0")
    check_backend("cuda", *inputs(shape, 2, torch.float16, "residual", channels_last))
    check_backend("cuda", *inputs((64, 64, 8, 8), 32, torch.float16, "temb", channels_last))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "shape, groups",
    [((4, 256, 32, 32), 32), ((3, 64, 48, 48), 2), ((3, 96, 7, 9), 32)],
    ids=["128-groups", "6-groups", "odd"],
)
def test_each_sample_is_independent_of_its_batch(backend, channels_last, shape, groups):
    """A sample's output is the same bit for bit alone or in a batch (DESIGN.md: a seed gives the
    same sample whatever the batch size): how a backend splits a group over blocks or programs
    depends on the group, never on how many groups the batch has."""
    require(backend)
    (x, groups, w, b), cond = inputs(shape, groups, torch.float16, "scale_shift", channels_last)
    batch = group_norm_silu(x, groups, w, b, **cond, backend=backend)
    for i in range(shape[0]):
        ss = cond["scale_shift"][i : i + 1].clone()
        alone = group_norm_silu(x[i : i + 1].clone(), groups, w, b, scale_shift=ss, backend=backend)
        assert torch.equal(alone, batch[i : i + 1]), i


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_affine_and_3d(backend):
    require(backend)
    x = torch.randn(3, 12, 50, device=DEVICE)
    expected = F.silu(F.group_norm(x, 4, eps=1e-6))
    torch.testing.assert_close(group_norm_silu(x, 4, eps=1e-6, backend=backend), expected)


def test_reference_is_groupnorm_then_silu():
    args, _ = inputs((2, 64, 5, 6), 16, torch.float64, "none")
    norm = torch.nn.GroupNorm(16, 64, eps=1e-5).double().to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(args[2])
        norm.bias.copy_(args[3])
    torch.testing.assert_close(group_norm_silu_reference(*args), F.silu(norm(args[0])))


def test_dispatch_and_errors():
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64, device=DEVICE)
    assert GROUP_NORM_SILU.available(x, 8, None, None, 1e-5, None, None) == ["reference"]
    with pytest.raises(RuntimeError, match="dtype float64"):
        group_norm_silu(x, 8, backend="triton")
    with pytest.raises(ValueError, match="num_groups=6"):
        group_norm_silu(x, 6)
    with pytest.raises(ValueError, match=r"scale_shift must have shape \(2, 128\)"):
        group_norm_silu(x, 8, scale_shift=torch.randn(2, 64, dtype=x.dtype))
    with pytest.raises(ValueError, match="residual must have shape"):
        group_norm_silu(x, 8, residual=torch.randn(2, 64, 4, dtype=x.dtype))


def test_why_not_with_x_alone():
    """why_not(name, x), the README's form for the step op: the backend of x's device takes a
    dense x and refuses a strided one; the other device's backend names x's device."""
    x = torch.randn(2, 8, 4, 4, device=DEVICE)
    other = "cpu" if DEVICE == "cuda" else "cuda"
    assert f"device {DEVICE} not in ['{other}']" in GROUP_NORM_SILU.why_not(other, x)
    require(DEVICE)
    assert GROUP_NORM_SILU.why_not(DEVICE, x) == []
    assert GROUP_NORM_SILU.why_not(DEVICE, x.contiguous(memory_format=torch.channels_last)) == []
    reasons = GROUP_NORM_SILU.why_not(DEVICE, x[..., ::2])
    assert len(reasons) == 1 and "neither contiguous nor channels_last" in reasons[0]


def test_cuda_backend_refuses_groups_of_2_31_elements():
    """The CUDA kernel indexes within a group in 32 bits: dispatch passes such calls on (asked
    with fake CUDA tensors, so nothing is allocated)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    require("cuda")  # fastdiff._C built with its CUDA kernels (CI builds them)
    with FakeTensorMode():
        w = torch.empty(4, device="cuda")
        x = torch.empty(1, 4, 2**15, 2**15, dtype=torch.float16, device="cuda")
        for groups, refused in ((1, True), (2, True), (4, False)):  # 2^32, 2^31, 2^30 elements
            reasons = GROUP_NORM_SILU.why_not("cuda", x, groups, w, w, 1e-5, None, None)
            assert any("2^31" in r for r in reasons) == refused, (groups, reasons)


def test_opcheck():
    args, cond = inputs((2, 32, 3, 5), 8, torch.float32, "scale_shift", channels_last=True)
    x, groups, w, b = args
    for t in (x, w, b, cond["scale_shift"]):
        t.requires_grad_()
    op = torch.ops.fastdiff.group_norm_silu.default
    torch.library.opcheck(op, (x, groups, w, b, 1e-5, cond["scale_shift"], None, None))


def test_opcheck_extension_op():
    """The C++/CUDA kernel op itself (its Meta kernel is the fake impl)."""
    require("cuda" if DEVICE == "cuda" else "cpu")
    args, cond = inputs((2, 32, 3, 5), 8, torch.float16, "temb", channels_last=True)
    x, groups, w, b = args
    op = torch.ops.fastdiff.group_norm_silu_fwd.default
    torch.library.opcheck(op, (x, groups, w.float(), b.float(), 1e-5, None, cond["residual"]))


@pytest.mark.parametrize("conditioning", CONDITIONING)
def test_gradients(conditioning):
    """The registered backward against autograd through torch's own ops, in fp64."""
    args, cond = inputs((2, 12, 3, 5), 3, torch.float64, conditioning)
    tensors = [args[0], args[2], args[3], *cond.values()]
    for t in tensors:
        t.requires_grad_()
    grad = torch.randn_like(args[0])
    ours = torch.autograd.grad(group_norm_silu(*args, **cond), tensors, grad)
    expected = torch.autograd.grad(torch_group_norm_silu(*args, **cond), tensors, grad)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e)


def test_triton_refuses_tensors_beyond_32_bit_offsets():
    """The Triton kernels' offsets are 32-bit: a tensor of 2^31 elements is refused (named),
    one element fewer is not (meta tensors: no memory)."""
    import importlib

    attention = importlib.import_module("fastdiff.ops.attention")  # the modules, not the ops
    group_norm_silu = importlib.import_module("fastdiff.ops.group_norm_silu")
    big = torch.empty(2, 64, 2**12, 2**12, device="meta")
    assert "2147483648 elements" in group_norm_silu._triton_check(big, 32)[0]
    assert group_norm_silu._triton_check(big[:, :63], 32) == []
    q = torch.empty(1, 8, 2**20, 256, device="meta", dtype=torch.float16)
    assert "2^31 or more" in attention._triton_check(q, q[:, :, :16], q[:, :, :16])[-1]
    assert attention._triton_check(q[:, :7], q[:, :, :16], q[:, :, :16]) == []
