"""What several sections share: diffusers' twins of fastdiff's samplers and UNet presets, and
models built once per process."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util

import torch
from harness import Skip

from fastdiff import Schedule

# fastdiff sampler -> the diffusers scheduler computing the same update (tests/test_samplers_*)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", dict(clip_sample=False, set_alpha_to_one=False)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
}
# the same schedules on both sides: fastdiff.Schedule and diffusers' scheduler arguments
SCHEDULES = {
    "linear": (
        Schedule.from_betas("linear"),
        dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    ),
    "sd": (
        Schedule.stable_diffusion(),
        dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
        ),
    ),
}
SPACING = "trailing"  # fastdiff.sample's default; diffusers is configured to match

# UNet presets with a diffusers twin: the class and the config that build the same network
# (google/ddpm-cifar10-32's config.json; SD 1.5's UNet: UNet2DConditionModel's defaults)
DIFFUSERS_TWINS = {
    "ddpm-cifar10": (
        "UNet2DModel",
        dict(
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
        ),
    ),
    "sd-like": ("UNet2DConditionModel", dict(sample_size=64, cross_attention_dim=768)),
}


def diffusers():
    """The diffusers module, or Skip saying how to get it."""
    try:
        module = importlib.import_module("diffusers")
    except ImportError as e:
        raise Skip(f"diffusers is not installed ({e}); pip install diffusers==0.42.1") from None
    module.utils.logging.set_verbosity_error()  # no advice on loading hub checkpoints
    return module


def scheduler(sampler: str, schedule: str, device: torch.device):
    """diffusers' scheduler for `sampler` on `schedule`, timesteps set up later by the caller."""
    cls, kwargs = SCHEDULERS[sampler]
    return getattr(diffusers(), cls)(**SCHEDULES[schedule][1], **kwargs, timestep_spacing=SPACING)


def unet_class():
    """fastdiff.models.UNet, or Skip while the module is missing."""
    try:
        from fastdiff.models import UNet
    except ImportError as e:
        raise Skip(f"fastdiff.models.UNet is not available ({e})") from None
    return UNet


@functools.lru_cache(maxsize=1)  # the latest pair only: sd-like is 2 x 1.7 GB in fp16
def models(preset: str, device: torch.device, dtype: torch.dtype):
    """(fastdiff UNet, diffusers twin with the same weights or None) for `preset`, random init
    (seed 0), in eval mode. Without a twin, fastdiff's UNet is built from the preset."""
    UNet = unet_class()
    torch.manual_seed(0)
    if preset not in DIFFUSERS_TWINS:
        with torch.device(device):
            return UNet.from_preset(preset).to(dtype).eval(), None
    cls, config = DIFFUSERS_TWINS[preset]
    with torch.device(device):  # initialised where they run (sd-like: 860M parameters)
        twin = getattr(diffusers(), cls)(**config).to(dtype).eval()
        return UNet.from_diffusers(twin).eval(), twin


def stable_fast(twin, device: torch.device):
    """A copy of diffusers' `twin` compiled by stable-fast as its README sets it up for a UNet
    (TorchScript trace and freeze; on CUDA also its CUDA graphs and, where Triton imports, its
    Triton kernels), or Skip saying how to get it. Build one per input signature: stable-fast
    1.0.5 under torch 2.14 segfaults when a compiled module is traced a second time."""
    try:
        from sfast.compilers.diffusion_pipeline_compiler import CompilationConfig, compile_unet
    except ImportError as e:
        raise Skip(f"stable-fast is not installed ({e}); see benchmarks/README.md") from None
    config = CompilationConfig.Default()
    if device.type == "cuda":
        config.enable_cuda_graph = True
        config.enable_triton = importlib.util.find_spec("triton") is not None
    return compile_unet(copy.deepcopy(twin), config)


_TRITON_PATCHES: dict = {}  # launcher class -> the run method stable-fast patched into it


@contextlib.contextmanager
def stable_fast_scope():
    """Keeps stable-fast's patch of Triton inside its own contender. Importing its Triton kernels
    replaces Triton's JITFunction.run and Autotuner.run for the whole process (a wrapper that
    turns 0-d CPU integer tensors into ints on every launch), which would tax the launches of
    fastdiff's Triton kernels timed after it. Inside the scope the patched methods are in place
    (applied by the import the first time, restored from _TRITON_PATCHES later); outside it,
    Triton's own."""
    try:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
    except ImportError:  # no Triton: nothing to patch
        yield
        return
    launchers = (JITFunction, Autotuner)
    originals = [cls.run for cls in launchers]
    for cls in launchers:
        cls.run = _TRITON_PATCHES.get(cls, cls.run)
    try:
        yield
    finally:
        for cls, run in zip(launchers, originals):
            if cls.run is not run:
                _TRITON_PATCHES[cls] = cls.run
            cls.run = run


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def shape_name(shape) -> str:
    return "x".join(map(str, shape))
