"""The UNet's configuration and its named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

TIME_CONDITIONING = ("add", "scale_shift")


@dataclass(frozen=True)
class UNetConfig:
    """An ADM/DDPM UNet. Level i works at resolution sample_size / 2**i with channels[i]."""

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 256, 256)
    layers_per_block: int = 2
    # levels (0 = full resolution) with attention after every residual block, down and up
    attention_levels: tuple[int, ...] = (1,)
    mid_attention: bool = True
    # attention heads: one count for every level, or one per level (the middle uses the last)
    heads: int | tuple[int, ...] = 1
    norm_groups: int = 32
    norm_eps: float = 1e-6
    dropout: float = 0.0
    # how a residual block takes the timestep embedding: "add" it before the second norm (DDPM)
    # or "scale_shift" the normalised features by it (ADM's use_scale_shift_norm)
    time_conditioning: str = "add"
    # sinusoidal timestep features as in diffusers' Timesteps
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    # 1: symmetric padding in the stride-2 downsampling conv; 0: pad right/bottom only (DDPM)
    downsample_padding: int = 0
    # cross-attention on a (B, L, context_dim) context: attention levels become transformer
    # blocks (self-attention, cross-attention, GEGLU feed-forward) as in Stable Diffusion
    context_dim: int | None = None
    transformer_depth: int = 1
    # class conditioning: class_labels in [0, num_classes); -1 = no label (zero embedding)
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("channels", "attention_levels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.heads, int):
            object.__setattr__(self, "heads", tuple(self.heads))
        problems = self.problems()
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    def heads_at(self, level: int) -> int:
        return self.heads if isinstance(self.heads, int) else self.heads[level]

    def problems(self) -> list[str]:
        out = []
        if self.time_conditioning not in TIME_CONDITIONING:
            out.append(f"time_conditioning {self.time_conditioning!r} not in {TIME_CONDITIONING}")
        if not isinstance(self.heads, int) and len(self.heads) != self.levels:
            out.append(f"heads {self.heads} must have one entry per level ({self.levels})")
        bad_levels = [i for i in self.attention_levels if not 0 <= i < self.levels]
        if bad_levels:
            out.append(f"attention_levels {bad_levels} outside 0..{self.levels - 1}")
        for i, c in enumerate(self.channels):
            if c % self.norm_groups:
                out.append(f"channels[{i}]={c} is not divisible by norm_groups={self.norm_groups}")
            if (i in self.attention_levels or i == self.levels - 1) and c % self.heads_at(i):
                out.append(f"channels[{i}]={c} is not divisible by {self.heads_at(i)} heads")
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    def replace(self, **overrides) -> UNetConfig:
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}")
        return dataclasses.replace(self, **overrides)


PRESETS: dict[str, UNetConfig] = {
    # 16x16 grey digits (sklearn's load_digits upsampled): ~2M parameters, trains on a CPU
    "digits": UNetConfig(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        channels=(32, 64, 128),
        layers_per_block=1,
        attention_levels=(1,),
        heads=2,
        norm_groups=8,
        norm_eps=1e-5,
        time_conditioning="scale_shift",
        flip_sin_to_cos=True,
        freq_shift=0.0,
        downsample_padding=1,
    ),
    # diffusers' UNet2DModel of google/ddpm-cifar10-32 (35.7M parameters)
    "ddpm-cifar10": UNetConfig(),
    # Stable Diffusion 1.5's UNet shapes (860M parameters), 64x64x4 latents, CLIP-L context
    "sd-like": UNetConfig(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_levels=(0, 1, 2),
        heads=8,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0.0,
        downsample_padding=1,
        context_dim=768,
    ),
}
