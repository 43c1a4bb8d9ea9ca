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

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase


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


def check_accelerated(unet, x, t, dtype, device="cpu", **cond):
    """accelerate(unet) in `dtype` vs unet in `dtype`, both against unet in fp64, on `device`."""
    fast = accelerate(copy.deepcopy(unet).to(device, dtype))
    plain = wrap(copy.deepcopy(unet).to(device, dtype))
    exact = wrap(copy.deepcopy(unet).to(device, torch.float64))
    x, t = x.to(device), t.to(device)
    low = {k: v.to(device, dtype) for k, v in cond.items()}
    with torch.no_grad():
        ref = exact(x.double(), t, **{k: v.to(device, torch.float64) for k, v in cond.items()})
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_accelerate_on_cuda(dtype):
    """On a GPU, with the real kernels (CUDA GroupNorm+SiLU, Triton attention), both UNet kinds
    in 16-bit within the tolerance rule of the unpatched model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([4.0, 870.0])
    check_accelerated(unet2d("scale_shift"), x, t, dtype, "cuda")
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    check_accelerated(unet2d_condition(), x, t, dtype, "cuda", context=context)


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


def samples(model, shape, dtype=torch.float32, **kwargs):
    """fastdiff.sample with the settings every sampling comparison here shares (a stochastic
    sampler: the noise added at each step must line up too)."""
    with torch.no_grad():
        return fastdiff.sample(
            model, shape, sampler="euler_a", steps=4, seed=3, dtype=dtype, **kwargs
        )


def test_sample_diffusers_unet2d():
    """A raw UNet2DModel goes to fastdiff.sample as it is (its output's .sample is read); its
    conversion to fastdiff.UNet and its accelerated self sample the same images, within the
    tolerance rule of the raw model in fp32 against the raw model in fp64."""
    unet, shape = unet2d(), (2, 3, 8, 8)
    ref = samples(copy.deepcopy(unet).double(), shape, torch.float64)
    plain = samples(unet, shape)
    assert_within_tolerance(samples(fastdiff.UNet.from_diffusers(unet).eval(), shape), ref, plain)
    assert_within_tolerance(samples(accelerate(copy.deepcopy(unet)), shape), ref, plain)


def test_sample_with_accelerated_unet():
    """The integration: fastdiff.sample with classifier-free guidance drives a wrapped,
    accelerated UNet2DConditionModel to the unpatched model's samples (tolerance rule, against
    the unpatched model in fp64)."""
    unet, shape = unet2d_condition(), (2, 4, 8, 8)
    context, empty = torch.randn(1, 7, 24), torch.zeros(1, 7, 24)

    def guided(model, dtype=torch.float32):
        cond, uncond = {"context": context.to(dtype)}, {"context": empty.to(dtype)}
        return samples(model, shape, dtype, cond=cond, uncond=uncond, guidance_scale=4.0)

    ref = guided(wrap(copy.deepcopy(unet).double()), torch.float64)
    fast = guided(wrap(accelerate(copy.deepcopy(unet))))
    assert_within_tolerance(fast, ref, guided(wrap(unet)))
