"""fastdiff: a compiled, high-performance sampler for diffusion models."""

from fastdiff.checkpoints import Checkpoint, load
from fastdiff.models import UNet, UNetConfig
from fastdiff.parameterization import PREDICTIONS
from fastdiff.sample import sample
from fastdiff.samplers import SAMPLERS, Plan, build_plan
from fastdiff.schedules import Schedule

__version__ = "0.1.0"

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "Checkpoint",
    "Plan",
    "Schedule",
    "UNet",
    "UNetConfig",
    "build_plan",
    "load",
    "sample",
]
