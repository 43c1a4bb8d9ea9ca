"""The UNet's building blocks. Attention goes through fastdiff.ops.attention and every
GroupNorm followed by SiLU through fastdiff.ops.group_norm_silu."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu


def timestep_features(
    t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: int = 10000
) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps t (B,) -> (B, dim), in fp32
    (Vaswani et al. 2017; DDPM's get_timestep_embedding with diffusers' shift and flip)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * -math.log(max_period)
    args = t.float()[:, None] * torch.exp(exponent / (half - freq_shift))[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


class GroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm then SiLU as one op, with the op's optional conditioning (same parameters
    and state dict keys as nn.GroupNorm)."""

    def forward(
        self,
        x: torch.Tensor,
        scale_shift: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return group_norm_silu(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            scale_shift=scale_shift,
            residual=residual,
        )


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm+SiLU before each and the timestep embedding in between."""

    def __init__(self, cin, cout, emb_dim, groups, eps, dropout, time_conditioning):
        super().__init__()
        self.scale_shift = time_conditioning == "scale_shift"
        self.norm1 = GroupNormSiLU(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * cout if self.scale_shift else cout)
        self.norm2 = GroupNormSiLU(groups, cout, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (B, cin, H, W); emb (B, emb_dim), already through SiLU."""
        h = conv_norm_silu(
            self.conv1, self.norm2, self.norm1(x), emb, self.emb_proj, self.scale_shift
        )
        return self.skip(x) + self.conv2(self.dropout(h))


def conv_norm_silu(
    conv: nn.Module,
    norm: nn.GroupNorm,
    x: torch.Tensor,
    emb: torch.Tensor | None,
    proj: nn.Module | None,
    scale_shift: bool,
) -> torch.Tensor:
    """A residual block's middle: silu(norm(conv(x) + proj(emb))), or with scale_shift
    silu(norm(conv(x)) * (1 + scale) + shift) for [scale | shift] = proj(emb); proj None adds emb
    itself (or nothing when emb is None). One group_norm_silu call after a bias-free convolution:
    a plain Conv2d's bias is added inside the norm, a vector add where after the convolution it
    is a pass over the whole output (on CUDA a kernel of its own)."""
    plain = type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
    if plain:
        h = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        bias = conv.bias
    else:
        h, bias = conv(x), None
    if scale_shift:
        residual = None if bias is None else bias.expand(x.shape[0], -1)
        return group_norm_silu(
            h, norm.num_groups, norm.weight, norm.bias, norm.eps,
            scale_shift=proj(emb), residual=residual,
        )  # fmt: skip
    if type(proj) is nn.Linear:  # the bias joins the projection's
        residual = F.linear(emb, proj.weight, _sum_or_none(proj.bias, bias))
    else:
        residual = _sum_or_none(emb if proj is None else proj(emb), bias)
        if residual is not None and residual.dim() == 1:
            residual = residual.expand(x.shape[0], -1)
    return group_norm_silu(h, norm.num_groups, norm.weight, norm.bias, norm.eps, residual=residual)


def _sum_or_none(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return b if a is None else a
    return a + b


class MultiHeadAttention(nn.Module):
    """Self-attention (context_dim None: one fused qkv projection) or cross-attention on a
    context (q from x, k and v from the context)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor, n: int) -> torch.Tensor:
        B, L, _ = t.shape
        return t.view(B, L, n, self.heads, -1).permute(2, 0, 3, 1, 4)  # (n, B, heads, L, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim), context (B, Lc, context_dim) -> (B, L, dim)."""
        if hasattr(self, "qkv"):
            q, k, v = self._split(self.qkv(x), 3)
        else:
            (q,) = self._split(self.q(x), 1)
            k, v = self._split(self.kv(context), 2)
        o = attention(q, k, v)  # (B, heads, L, d)
        return self.out(o.transpose(1, 2).flatten(2))


class AttentionBlock(MultiHeadAttention):
    """GroupNorm, multi-head self-attention over the H*W positions, residual (DDPM/ADM)."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float):
        super().__init__(channels, heads, bias=True)
        self.norm = nn.GroupNorm(groups, channels, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        return x + super().forward(h).transpose(1, 2).reshape(B, C, H, W)


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020) with a 4x hidden width."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 8 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = MultiHeadAttention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Stable Diffusion's attention at one resolution: GroupNorm, projection to tokens,
    transformer blocks with cross-attention on the context, projection back, residual."""

    def __init__(self, channels: int, heads: int, groups: int, context_dim: int, depth: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(
            TransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for block in self.blocks:
            h = block(h, context)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # DDPM's TF "SAME" padding for a stride-2 conv
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
