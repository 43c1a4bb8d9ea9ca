"""fastdiff.models.UNet: presets against diffusers' architectures (parameter counts, configs and
outputs of converted models), the fused-op path against the reference path, which ops a forward
runs, checkpoints, conditioning, a few training steps, and torch.compile without graph breaks."""

import json
from collections import Counter

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors import safe_open
from tolerance import assert_within_tolerance
from torch.profiler import ProfilerActivity, profile

from fastdiff.models import PRESETS, UNet, UNetConfig
from fastdiff.models import checkpoint as ckpt
from fastdiff.models.convert import config_from_diffusers, state_dict_from_diffusers
from fastdiff.ops import use
from fastdiff.ops._dispatch import triton_devices, triton_ready

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

# google/ddpm-cifar10-32's config.json (UNet2DModel)
DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
)
# Stable Diffusion 1.5's UNet (diffusers' UNet2DConditionModel defaults, CLIP ViT-L context)
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
TINY = dict(channels=(16, 32), norm_groups=4, heads=2, sample_size=8, layers_per_block=1)


def perturb_norms(model, seed=0):
    """Random init leaves norms at (1, 0); move them so a mix-up of norms shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def diffusers_count(cls, **config):
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**config).parameters())


def our_count(name):
    with torch.device("meta"):
        return sum(p.numel() for p in UNet.from_preset(name).parameters())


def test_presets_match_diffusers_architectures():
    assert our_count("ddpm-cifar10") == diffusers_count(UNet2DModel, **DDPM_CIFAR10) == 35_746_307
    assert our_count("sd-like") == diffusers_count(UNet2DConditionModel, **SD15) == 859_520_964
    assert 1_000_000 < our_count("digits") < 3_000_000
    with torch.device("meta"):
        d = UNet2DModel(**DDPM_CIFAR10)
        sd = UNet2DConditionModel(**SD15)
    assert config_from_diffusers(d.config, "UNet2DModel") == PRESETS["ddpm-cifar10"]
    assert config_from_diffusers(sd.config, "UNet2DConditionModel") == PRESETS["sd-like"]


def test_sd15_weights_convert():
    """Every SD1.5 tensor finds its place, with its shape (on the meta device: no memory)."""
    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15)
        ours = UNet.from_preset("sd-like")
    state = state_dict_from_diffusers(sd.state_dict())
    ckpt.check_state_dict(ours.state_dict(), state, "SD1.5", {})


def test_from_diffusers_ddpm_cifar10_equal():
    torch.manual_seed(0)
    d = perturb_norms(UNet2DModel(**DDPM_CIFAR10)).eval()
    ours = UNet.from_diffusers(d).eval()
    assert ours.config == PRESETS["ddpm-cifar10"]
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([7.0, 911.5])
    with torch.no_grad(), use("reference"):
        expected, out = d(x, t).sample, ours(x, t)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_from_diffusers_cross_attention_equal():
    torch.manual_seed(0)
    d = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    d = perturb_norms(d).eval()
    ours = UNet.from_diffusers(d).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 250.0]), torch.randn(2, 7, 24)
    with torch.no_grad():
        expected = d(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(ours(x, t, context=context), expected)


def test_from_diffusers_names_unsupported_options():
    with torch.device("meta"):
        d = UNet2DModel(**{**DDPM_CIFAR10, "resnet_time_scale_shift": "scale_shift"})
    with pytest.raises(ValueError, match="resnet_time_scale_shift='scale_shift'"):
        UNet.from_diffusers(d)


@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize(
    "overrides",
    [
        dict(TINY, attention_levels=(1,)),
        dict(TINY, attention_levels=(0,), context_dim=12, time_conditioning="add"),
        dict(TINY, attention_levels=(), num_classes=3, mid_attention=False),
    ],
    ids=["self-attention", "cross-attention", "classes"],
)
def test_fused_ops_match_reference_path(overrides, backend):
    """The whole network on CPU tensors against the same network on the reference ops: with
    automatic dispatch (the C++ `cpu` GroupNorm+SiLU kernel and `sdpa` attention; Triton runs
    CPU tensors only by name), and with both ops forced onto Triton (its interpreter on CPU,
    fed the UNet's strided q, k, v views)."""
    if backend == "triton" and (triton_ready() or "cpu" not in triton_devices()):
        pytest.skip(triton_ready() or "Triton runs CPU tensors only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model = perturb_norms(UNet.from_preset("digits", **overrides)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 600.0])
    cond = {}
    if model.config.context_dim:
        cond["context"] = torch.randn(2, 5, 12)
    if model.config.num_classes:
        cond["class_labels"] = torch.tensor([2, -1])
    with torch.no_grad():
        with use(backend):
            fast = model(x, t, **cond)
        with use("reference"):
            ref = model(x, t, **cond)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "preset, overrides, batch",
    [("ddpm-cifar10", {}, 4), ("sd-like", dict(channels=(64, 128, 128, 128), sample_size=32), 2)],
    ids=["ddpm-cifar10", "sd-like-narrow"],
)
def test_fused_ops_on_cuda(preset, overrides, batch, channels_last, dtype):
    """On a GPU, the whole network in 16-bit on the real kernels (automatic dispatch: CUDA or
    Triton GroupNorm+SiLU, Triton or SDPA attention) within the tolerance rule of the same
    network in 16-bit on the reference ops, both against it in fp64."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    model = perturb_norms(UNet.from_preset(preset, **overrides)).eval()
    cfg = model.config
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device="cuda")
    t = torch.linspace(3.0, 900.0, batch, device="cuda")
    cond = {}
    if cfg.context_dim is not None:
        cond["context"] = torch.randn(batch, 77, cfg.context_dim, device="cuda")
    exact = model.to("cuda", torch.float64)
    with torch.no_grad(), use("reference"):
        ref = exact(x.double(), t, **{k: v.double() for k, v in cond.items()})
    low = exact.to(dtype).to(memory_format=fmt)
    x, cond = x.to(dtype).contiguous(memory_format=fmt), {k: v.to(dtype) for k, v in cond.items()}
    with torch.no_grad():
        with use("reference"):
            plain = low(x, t, **cond)
        fast = low(x, t, **cond)
    assert_within_tolerance(fast, ref, plain, floor_ulps=4)


def op_counts(model, *args, **kwargs) -> Counter:
    """How often each dispatcher op ran in one forward, nested calls included: the profiler
    records a fused op, the backend kernel inside it and the aten ops alike."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(*args, **kwargs)
    return Counter({e.key: e.count for e in prof.key_averages()})


@pytest.mark.parametrize(
    "preset, overrides",
    [("ddpm-cifar10", {}), ("sd-like", dict(channels=(32, 64, 64, 64), sample_size=16))],
    ids=["ddpm-cifar10", "sd-like-narrow"],
)
def test_forward_runs_the_fused_ops(preset, overrides):
    """Every GroupNorm+SiLU of a forward is one fastdiff::group_norm_silu call and every
    attention one fastdiff::attention call, with the counts the config implies; on CPU tensors
    automatic dispatch runs them on the C++ kernel and on SDPA. The only plain GroupNorms are
    the attention blocks' own, the only SiLUs the timestep embedding's."""
    model = UNet.from_preset(preset, **overrides).eval()
    cfg = model.config
    x, t = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size), torch.tensor([9.0])
    cond = {} if cfg.context_dim is None else {"context": torch.randn(1, 5, cfg.context_dim)}
    n, layers = cfg.levels, cfg.layers_per_block
    res_blocks = n * layers + 2 + n * (layers + 1)  # down, middle, up (one more per level)
    attn_blocks = len(cfg.attention_levels) * (2 * layers + 1) + cfg.mid_attention
    # an AttentionBlock attends once; a SpatialTransformer twice per block (self, cross)
    attentions = attn_blocks * (1 if cfg.context_dim is None else 2 * cfg.transformer_depth)
    norm_silus = 2 * res_blocks + 1  # norm1 and norm2 of each residual block, then norm_out

    counts = op_counts(model, x, t, **cond)
    assert counts["fastdiff::group_norm_silu"] == norm_silus
    assert counts["fastdiff::group_norm_silu_fwd"] == norm_silus  # the `cpu` backend's kernel
    assert counts["aten::native_group_norm"] == attn_blocks  # the reference would add its own
    assert counts["aten::silu"] == 2  # TimestepEmbedding's and UNet.embed's
    assert counts["fastdiff::attention"] == attentions
    assert counts["aten::scaled_dot_product_attention"] == attentions  # the `sdpa` backend


@pytest.mark.parametrize("conditioning", ["add", "scale_shift"])
def test_resblock_adds_conv1_bias_inside_the_norm(conditioning):
    """ResBlock adds conv1's bias inside norm2 instead of after conv1: the same function as
    conv1 (with its bias), then GroupNorm with the timestep term, then SiLU, in torch.nn terms."""
    import torch.nn.functional as F

    from fastdiff.models.layers import ResBlock

    torch.manual_seed(0)
    block = perturb_norms(ResBlock(8, 16, 12, 4, 1e-5, 0.0, conditioning)).eval()
    with torch.no_grad():
        block.conv1.bias.normal_(0, 3)  # large enough that dropping or doubling it shows
        x, emb = torch.randn(2, 8, 5, 6), torch.randn(2, 12)
        n1, n2 = block.norm1, block.norm2
        h = block.conv1(F.silu(F.group_norm(x, 4, n1.weight, n1.bias, 1e-5)))
        e = block.emb_proj(emb)[..., None, None]
        if conditioning == "add":
            h = F.group_norm(h + e, 4, n2.weight, n2.bias, 1e-5)
        else:
            scale, shift = e.chunk(2, dim=1)
            h = F.group_norm(h, 4, n2.weight, n2.bias, 1e-5) * (1 + scale) + shift
        expected = block.skip(x) + block.conv2(F.silu(h))
        torch.testing.assert_close(block(x, emb), expected, rtol=1e-4, atol=1e-5)


def test_channels_last():
    """channels_last weights and input flow through the fused ops without a layout change."""
    torch.manual_seed(0)
    model = perturb_norms(UNet.from_preset("digits", **TINY, attention_levels=(1,))).eval()
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([300.0])
    with torch.no_grad():
        with use("reference"):
            expected = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_conditioning_errors_and_null_label():
    model = UNet.from_preset("digits", **TINY, attention_levels=(), num_classes=3).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 10.0])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t)
    with pytest.raises(ValueError, match="context"):
        model(x, t, context=torch.randn(2, 3, 8), class_labels=torch.tensor([0, 1]))
    with torch.no_grad(), use("reference"):
        null = model(x, t, class_labels=torch.tensor([-1, -1]))
        model.class_embed = None
        unconditional = model(x, t)
    torch.testing.assert_close(null, unconditional)


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        UNetConfig(channels=(48, 96))
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        UNet.from_preset("digits", chanels=(8,))
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNet.from_preset("cifar")


def test_checkpoint_roundtrip(tmp_path):
    model = perturb_norms(UNet.from_preset("digits", **TINY, num_classes=4))
    path = model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert UNetConfig.from_dict(config) == model.config
    with safe_open(str(path / "model.safetensors"), "pt") as f:  # plain safetensors, no pickle
        assert json.loads(f.metadata()["config"]) == config
    for source in (path, path / "model.safetensors"):
        loaded = UNet.load(source)
        assert loaded.config == model.config
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b)


def test_checkpoint_into_wrong_config_names_keys(tmp_path):
    UNet.from_preset("digits", **TINY).save(tmp_path / "a")
    other = UNet.from_preset("digits", **{**TINY, "channels": (16, 48)}, num_classes=2)
    with pytest.raises(ValueError) as e:
        other.load_weights(tmp_path / "a")
    msg = str(e.value)
    assert "shape mismatches" in msg and "checkpoint (32, 16, 3, 3) vs model (48, 16, 3, 3)" in msg
    assert "missing from the checkpoint: class_embed.weight" in msg
    with pytest.raises(ValueError, match="shape mismatches"):
        UNet.from_preset("digits", **{**TINY, "channels": (16, 48)}).load_weights(tmp_path / "a")


def test_training_steps_reduce_loss():
    """eps-prediction loss on a fixed batch falls over a few AdamW steps (gradients flow
    through the registered backward of both fused ops)."""
    torch.manual_seed(0)
    model = UNet.from_preset("digits")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x0 = torch.stack([torch.tanh(3 * (r - (xx**2 + yy**2).sqrt())) for r in (0.3, 0.5, 0.7, 0.9)])
    x0 = x0[:, None].repeat(2, 1, 1, 1)  # (8, 1, 16, 16) rings
    noise = torch.randn_like(x0)
    t = torch.linspace(50, 900, 8)
    alpha_bar = torch.cos(t / 1000 * torch.pi / 2)[:, None, None, None] ** 2
    xt = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    losses = []
    with use("reference"):
        for _ in range(8):
            loss = torch.mean((model(xt, t) - noise) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0], losses


def test_compile_has_no_graph_breaks():
    model = UNet.from_preset("digits", **TINY, attention_levels=(1,), context_dim=6).eval()
    x, t, context = torch.randn(1, 1, 8, 8), torch.tensor([40.0]), torch.randn(1, 3, 6)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x, t, context=context)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x, t, context=context), model(x, t, context=context))


@pytest.mark.slow
def test_compile_inductor():
    """Inductor (C++ codegen on CPU) around the opaque fused ops: same output as eager."""
    model = UNet.from_preset("digits", **TINY).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 900.0])
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-4, atol=1e-5)
