"""The reference UNet (Ho et al. 2020; Dhariwal & Nichol 2021 for scale-shift conditioning;
Rombach et al. 2022 for cross-attention), called as a fastdiff model: `model(x, t, **cond)`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models import checkpoint
from fastdiff.models.config import PRESETS, UNetConfig
from fastdiff.models.layers import (
    AttentionBlock,
    Downsample,
    GroupNormSiLU,
    ResBlock,
    SpatialTransformer,
    TimestepEmbedding,
    Upsample,
    timestep_features,
)


class Level(nn.Module):
    """One resolution of the down or up path: residual blocks, each followed by attention at
    attention levels, then the resampling (none at the bottom of the down path / top of up)."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


class Middle(nn.Module):
    def __init__(self, res1: nn.Module, attn: nn.Module | None, res2: nn.Module):
        super().__init__()
        self.res1, self.attn, self.res2 = res1, attn, res2


class UNet(nn.Module):
    """model(x, t, context=None, class_labels=None) -> output shaped like x (with out_channels).

    x (B, in_channels, H, W); t (B,) or scalar float training timesteps (diffusers convention);
    context (B, L, context_dim) for cross-attention models; class_labels (B,) int64 for
    class-conditional ones (-1: no label)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = cfg.time_embed_dim
        self.time_embed = TimestepEmbedding(cfg.channels[0], emb_dim)
        self.class_embed = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)

        def res(cin, cout):
            g, eps, tc = cfg.norm_groups, cfg.norm_eps, cfg.time_conditioning
            return ResBlock(cin, cout, emb_dim, g, eps, cfg.dropout, tc)

        def attn(level, c):
            heads = cfg.heads_at(level)
            if cfg.context_dim is None:
                return AttentionBlock(c, heads, cfg.norm_groups, cfg.norm_eps)
            return SpatialTransformer(
                c, heads, cfg.norm_groups, cfg.context_dim, cfg.transformer_depth
            )

        n, layers = cfg.levels, cfg.layers_per_block
        skips = [cfg.channels[0]]  # channels of every tensor the down path hands to the up path
        self.down = nn.ModuleList()
        cin = cfg.channels[0]
        for i, c in enumerate(cfg.channels):
            blocks, attns = [], []
            for _ in range(layers):
                blocks.append(res(cin, c))
                attns += [attn(i, c)] if i in cfg.attention_levels else []
                cin = c
                skips.append(c)
            down = Downsample(c, cfg.downsample_padding) if i < n - 1 else None
            skips += [c] if down is not None else []
            self.down.append(Level(blocks, attns, down))

        c = cfg.channels[-1]
        mid_attn = attn(n - 1, c) if cfg.mid_attention else None
        self.mid = Middle(res(c, c), mid_attn, res(c, c))

        self.up = nn.ModuleList()  # up[0] is the lowest resolution
        for i in reversed(range(n)):
            c = cfg.channels[i]
            blocks, attns = [], []
            for _ in range(layers + 1):
                blocks.append(res(cin + skips.pop(), c))
                attns += [attn(i, c)] if i in cfg.attention_levels else []
                cin = c
            self.up.append(Level(blocks, attns, Upsample(c) if i > 0 else None))

        self.norm_out = GroupNormSiLU(cfg.norm_groups, cfg.channels[0], cfg.norm_eps)
        self.conv_out = nn.Conv2d(cfg.channels[0], cfg.out_channels, 3, padding=1)

    # -- construction and checkpoints ---------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, **overrides) -> UNet:
        """A preset (see PRESETS) with any UNetConfig field overridden, randomly initialised."""
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; presets: {sorted(PRESETS)}")
        return cls(PRESETS[name].replace(**overrides))

    @classmethod
    def from_diffusers(cls, unet: nn.Module) -> UNet:
        """The same network as a diffusers UNet2DModel or UNet2DConditionModel, its weights
        copied (raises naming the config options this UNet cannot express)."""
        from fastdiff.models.convert import config_from_diffusers, state_dict_from_diffusers

        config = config_from_diffusers(unet.config, type(unet).__name__)
        model, cfg_dict = cls(config), config.to_dict()
        p = next(unet.parameters())
        state = state_dict_from_diffusers(unet.state_dict())
        checkpoint.check_state_dict(model.state_dict(), state, "the diffusers UNet", cfg_dict)
        model.load_state_dict(state)
        return model.to(device=p.device, dtype=p.dtype)

    def save(self, path: str | Path) -> Path:
        """Write the weights and config (safetensors + JSON, no pickle); see checkpoint.save."""
        return checkpoint.save(self.state_dict(), self.config.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path, *, map_location: str | torch.device = "cpu") -> UNet:
        """A UNet built from a checkpoint's config, with its weights."""
        config, state = checkpoint.load(path, device=map_location)
        model = cls(UNetConfig.from_dict(config))
        checkpoint.check_state_dict(model.state_dict(), state, path, config)
        model.load_state_dict(state)
        return model.to(map_location)

    def load_weights(self, path: str | Path) -> UNet:
        """Load a checkpoint's weights into this model; a checkpoint made for another config
        raises, naming the missing, unexpected and mismatched keys and shapes."""
        config, state = checkpoint.load(path, device=next(self.parameters()).device)
        checkpoint.check_state_dict(self.state_dict(), state, path, config)
        self.load_state_dict(state)
        return self

    # -- forward --------------------------------------------------------------------------------

    def embed(self, x, t, class_labels) -> torch.Tensor:
        """SiLU(time embedding + class embedding): (B, time_embed_dim), what every block uses."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        features = timestep_features(t, cfg.channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embed(features.to(self.conv_in.weight.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError(
                    "this UNet is class-conditional (num_classes="
                    f"{cfg.num_classes}): pass class_labels=(B,) int64, -1 for no label"
                )
            keep = (class_labels >= 0).to(emb.dtype)[:, None]
            emb = emb + self.class_embed(class_labels.clamp(min=0)) * keep
        elif class_labels is not None:
            raise ValueError("class_labels given but this UNet has no num_classes")
        return F.silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        *,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (context is None) != (self.config.context_dim is None):
            raise ValueError(
                f"context (B, L, {self.config.context_dim}) is required by a cross-attention "
                "UNet and rejected by others: this UNet has context_dim="
                f"{self.config.context_dim}"
            )
        emb = self.embed(x, t, class_labels)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = block(h, emb)
                if len(level.attn):
                    h = level.attn[i](h, context)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid.res1(h, emb)
        if self.mid.attn is not None:
            h = self.mid.attn(h, context)
        h = self.mid.res2(h, emb)

        for level in self.up:
            for i, block in enumerate(level.res):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
                if len(level.attn):
                    h = level.attn[i](h, context)
            if level.resample is not None:
                h = level.resample(h, skips[-1].shape[-2:])
        return self.conv_out(self.norm_out(h))
