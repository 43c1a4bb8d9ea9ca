"""The tolerance rule of DESIGN.md, shared by the kernel tests."""

import torch


def assert_within_tolerance(fast, ref, torch_same_precision, floor_ulps=1.0):
    """DESIGN.md: max |fast - ref| <= 2 max |torch - ref| + floor, where ref is the fp64 (or
    fp32) reference and torch is plain PyTorch run in fast's precision; the floor is
    `floor_ulps` ulps of fast's dtype at the reference's largest magnitude."""
    ref = ref.double()
    err = (fast.double() - ref).abs().max().item()
    err_torch = (torch_same_precision.double() - ref).abs().max().item()
    floor = floor_ulps * torch.finfo(fast.dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * err_torch + floor, (
        f"error {err:.3g} > 2 x PyTorch's {err_torch:.3g} + floor {floor:.3g} ({fast.dtype})"
    )
