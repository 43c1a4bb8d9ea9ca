"""Reference models: the UNet (its config, presets and checkpoints)."""

from fastdiff.models.config import PRESETS, UNetConfig
from fastdiff.models.unet import UNet

__all__ = ["PRESETS", "UNet", "UNetConfig"]
