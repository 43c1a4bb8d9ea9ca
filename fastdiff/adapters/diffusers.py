"""diffusers UNets as fastdiff models, and their attention and GroupNorm+SiLU on fastdiff's ops.

    model = wrap(unet)             # model(x, t, context=..., class_labels=...) -> tensor
    accelerate(unet)               # in place: attention processors and resnet norms swapped

`accelerate` changes no parameter: state dicts, LoRA loading and `save_pretrained` still work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from fastdiff.models.layers import GroupNormSiLU, conv_norm_silu
from fastdiff.ops.attention import attention as fused_attention
from fastdiff.ops.group_norm_silu import group_norm_silu

_CROSS_ATTENTION_UNETS = ("UNet2DConditionModel",)


class DiffusersDenoiser(nn.Module):
    """model(x, t, context=None, class_labels=None, **kwargs) -> the UNet's output tensor.
    `context` is passed as encoder_hidden_states; other keywords (added_cond_kwargs, ...) as
    they are."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.cross_attention = type(unet).__name__ in _CROSS_ATTENTION_UNETS

    @property
    def config(self):
        return self.unet.config

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        *,
        context: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        name = type(self.unet).__name__
        if self.cross_attention:
            if context is None:
                raise ValueError(
                    f"{name} needs context=(B, L, {self.unet.config.cross_attention_dim}) "
                    "(its encoder_hidden_states, e.g. text embeddings)"
                )
            kwargs["encoder_hidden_states"] = context
        elif context is not None:
            raise ValueError(f"{name} has no cross-attention: do not pass context")
        if class_labels is not None:
            kwargs["class_labels"] = class_labels
        return self.unet(x, t, return_dict=False, **kwargs)[0]


def wrap(unet: nn.Module) -> DiffusersDenoiser:
    """A diffusers UNet2DModel / UNet2DConditionModel as a fastdiff model (DiffusersDenoiser)."""
    return unet if isinstance(unet, DiffusersDenoiser) else DiffusersDenoiser(unet)


class FastdiffAttnProcessor:
    """diffusers' AttnProcessor2_0 with fastdiff.ops.attention in place of SDPA (calls with an
    attention mask keep SDPA: the fused op has no masks)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.dim() == 4 else None
        if image_shape is not None:
            B, C = image_shape[:2]
            hidden_states = hidden_states.view(B, C, -1).transpose(1, 2)  # (B, HW, C)
        B = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        q, k, v = (t.view(B, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)

        if attention_mask is None:
            out = fused_attention(q, k, v, scale=attn.scale)  # (B, heads, Lq, head_dim)
        else:
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], B)
            mask = mask.view(B, attn.heads, -1, mask.shape[-1])
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(B, -1, attn.heads * head_dim).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _fused_norm_silu(norm: nn.GroupNorm, x: torch.Tensor, **cond) -> torch.Tensor:
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, **cond)


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D with norm1+SiLU and (temb add | scale-shift)+norm2+SiLU as
    fastdiff.ops.group_norm_silu calls. Same parameters; installed by accelerate()."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs):
        x = input_tensor
        h = _fused_norm_silu(self.norm1, x)
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        proj = self.time_emb_proj
        if proj is not None and not self.skip_time_act:
            temb = self.nonlinearity(temb)
        # norm2(conv1(h) + temb) or norm2(conv1(h)) * (1 + scale) + shift, [scale | shift] = temb
        scale_shift = self.time_embedding_norm == "scale_shift"
        h = conv_norm_silu(self.conv1, self.norm2, h, temb, proj, scale_shift)
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


def _fusable(block: nn.Module) -> bool:
    return (
        type(block) is ResnetBlock2D
        and type(block.norm1) is nn.GroupNorm
        and type(block.norm2) is nn.GroupNorm
        and isinstance(block.nonlinearity, nn.SiLU)
        and block.time_embedding_norm in ("default", "scale_shift")
        and (block.time_emb_proj is not None or block.time_embedding_norm == "default")
    )


def accelerate(unet: nn.Module, *, attention: bool = True, norms: bool = True) -> nn.Module:
    """Route a diffusers model's attention (processors AttnProcessor / AttnProcessor2_0) and its
    GroupNorm+SiLU pairs (ResnetBlock2D, and conv_norm_out + conv_act) through fastdiff's fused
    ops, in place; returns the model. Blocks of other kinds are left as they are."""
    model = unet.unet if isinstance(unet, DiffusersDenoiser) else unet
    for module in model.modules():
        if attention and isinstance(module, Attention):
            if type(module.processor) in (AttnProcessor, AttnProcessor2_0):
                module.set_processor(FastdiffAttnProcessor())
        if norms and _fusable(module):
            module.__class__ = FusedResnetBlock2D
    norm_out = getattr(model, "conv_norm_out", None)
    act_out = getattr(model, "conv_act", None)
    if norms and type(norm_out) is nn.GroupNorm and isinstance(act_out, nn.SiLU):
        norm_out.__class__ = GroupNormSiLU
        model.conv_act = nn.Identity()
    return unet
