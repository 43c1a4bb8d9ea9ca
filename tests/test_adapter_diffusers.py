"""diffusers UNets as fastdiff models (wrap) and on fastdiff's fused ops (accelerate): outputs
within DESIGN.md's tolerance rule of the unpatched model, against an fp64 copy of it."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from tolerance import assert_within_tolerance

import fastdiff
from fastdiff.adapters import as_model
from fastdiff.adapters.diffusers import (
    DiffusersDenoiser,
    FastdiffAttnProcessor,
    FusedResnetBlock2D,
    accelerate,
    wrap,
)
from fastdiff.ops import use


def unet2d(time_scale_shift="default"):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 72),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=24,  # 3 heads of 24
        resnet_time_scale_shift=time_scale_shift,
    ).eval()


def unet2d_condition():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(40, 80),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,  # diffusers' SD naming: 4 heads (of 10 channels at 8x8)
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()


def count(model):
    fused = sum(type(m) is FusedResnetBlock2D for m in model.modules())
    procs = [getattr(m, "processor", None) for m in model.modules()]
    attn = sum(isinstance(p, FastdiffAttnProcessor) for p in procs)
    return fused, attn


def check_accelerated(unet, x, t, dtype, **cond):
    """accelerate(unet) in `dtype` vs unet in `dtype`, both against unet in fp64."""
    fast = accelerate(copy.deepcopy(unet).to(dtype))
    plain = wrap(copy.deepcopy(unet).to(dtype))
    exact = wrap(copy.deepcopy(unet).double())
    low = {k: v.to(dtype) for k, v in cond.items()}
    with torch.no_grad():
        ref = exact(x.double(), t, **{k: v.double() for k, v in cond.items()})
        assert_within_tolerance(
            wrap(fast)(x.to(dtype), t, **low), ref, plain(x.to(dtype), t, **low), floor_ulps=4
        )
    return fast


@pytest.mark.parametrize(
    "time_scale_shift, dtype",
    [("default", torch.float32), ("scale_shift", torch.float32), ("default", torch.bfloat16)],
    ids=["add-fp32", "scale_shift-fp32", "add-bf16"],
)
def test_accelerate_unet2d(time_scale_shift, dtype):
    unet = unet2d(time_scale_shift)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([4.0, 870.0])
    fast = check_accelerated(unet, x, t, dtype)
    assert count(fast) == (8, 4)  # every resnet and every attention
    assert type(fast.conv_norm_out).__name__ == "GroupNormSiLU"
    assert fast.state_dict().keys() == unet.state_dict().keys()


def test_accelerate_unet2d_condition():
    unet = unet2d_condition()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([9.0, 400.0]), torch.randn(2, 7, 24)
    fast = check_accelerated(unet, x, t, torch.float32, context=context)
    assert count(fast) == (8, 8)


def test_masked_cross_attention_keeps_sdpa():
    unet = unet2d_condition()
    fast = accelerate(copy.deepcopy(unet))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([9.0, 400.0]), torch.randn(2, 7, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad(), use("reference"):  # the routing is under test, not the kernels
        expected = unet(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        out = fast(x, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_wrap_calls_and_errors():
    unet, cond_unet = unet2d(), unet2d_condition()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    model = as_model(unet)
    assert isinstance(model, DiffusersDenoiser) and as_model(model) is model
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), unet(x, t).sample)
    with pytest.raises(ValueError, match="no cross-attention"):
        model(x, t, context=torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match="needs context"):
        wrap(cond_unet)(torch.randn(2, 4, 8, 8), t)
    plain = lambda x, t: x
    assert as_model(plain) is plain


def test_sample_with_accelerated_unet():
    """The integration: fastdiff.sample drives a wrapped, accelerated UNet (reference ops, for
    speed: the fused ones are checked above)."""
    unet = accelerate(unet2d_condition())
    context = torch.randn(1, 7, 24)
    with torch.no_grad(), use("reference"):
        out = fastdiff.sample(
            wrap(unet), (2, 4, 8, 8), sampler="ddim", steps=2, cond={"context": context}
        )
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
