"""diffusers UNet2DModel / UNet2DConditionModel -> fastdiff UNet: the config and the weights."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fastdiff.models.config import UNetConfig

# option: the values this UNet can express (diffusers' defaults included)
_FIXED = {
    "center_input_sample": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "mid_block_scale_factor": (1, 1.0),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "class_embed_type": (None,),
    # UNet2DConditionModel only
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
}
_BLOCKS = {
    "UNet2DModel": ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"),
    "UNet2DConditionModel": (
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "UpBlock2D",
        "CrossAttnUpBlock2D",
    ),
}
_MID = {"UNet2DModel": "UNetMidBlock2D", "UNet2DConditionModel": "UNetMidBlock2DCrossAttn"}


def config_from_diffusers(cfg: Mapping, class_name: str) -> UNetConfig:
    """The UNetConfig of a diffusers UNet's config; raises listing every unsupported option."""
    if class_name not in _BLOCKS:
        raise TypeError(f"from_diffusers takes a UNet2DModel or UNet2DConditionModel: {class_name}")
    problems = [
        f"{k}={cfg[k]!r} (supported: {list(v)})"
        for k, v in _FIXED.items()
        if k in cfg and cfg[k] not in v
    ]
    down_plain, down_attn, up_plain, up_attn = _BLOCKS[class_name]
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(cfg["block_out_channels"])
    if set(down) - {down_plain, down_attn} or set(up) - {up_plain, up_attn}:
        problems.append(f"block types {down} / {up} (supported: {_BLOCKS[class_name]})")
    attn_down = tuple(i for i, b in enumerate(down) if b == down_attn)
    attn_up = tuple(sorted(n - 1 - i for i, b in enumerate(up) if b == up_attn))
    if attn_down != attn_up:
        problems.append(f"attention at down levels {attn_down} but up levels {attn_up}")
    if cfg.get("mid_block_type", _MID[class_name]) not in (_MID[class_name], None):
        problems.append(f"mid_block_type={cfg['mid_block_type']!r}")
    groups = cfg.get("norm_num_groups")
    if groups is None or cfg.get("attn_norm_num_groups") not in (None, groups):
        problems.append("norm_num_groups must be set and attn_norm_num_groups equal to it")
    extra = {}
    channels = tuple(cfg["block_out_channels"])
    if class_name == "UNet2DModel":
        head_dim = cfg.get("attention_head_dim")
        heads = 1 if head_dim is None else tuple(c // head_dim for c in channels)
        mid_attention = cfg.get("add_attention", True) and cfg.get("mid_block_type") is not None
    else:
        # diffusers' SD configs call the head count attention_head_dim
        heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
        mid_attention = cfg.get("mid_block_type", _MID[class_name]) is not None
        context_dim, depth = cfg["cross_attention_dim"], cfg.get("transformer_layers_per_block", 1)
        if not isinstance(context_dim, int) or not isinstance(depth, int):
            problems.append("per-block cross_attention_dim / transformer_layers_per_block")
        extra = dict(context_dim=context_dim, transformer_depth=depth)
    if problems:
        raise ValueError(
            f"this diffusers {class_name} uses options fastdiff's UNet does not implement: "
            + "; ".join(problems)
        )
    return UNetConfig(
        sample_size=cfg["sample_size"],
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        channels=channels,
        layers_per_block=cfg["layers_per_block"],
        attention_levels=attn_down,
        mid_attention=bool(mid_attention),
        heads=heads if isinstance(heads, int) else tuple(heads),
        norm_groups=groups,
        norm_eps=cfg["norm_eps"],
        dropout=cfg.get("dropout", 0.0),
        flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"],
        downsample_padding=cfg["downsample_padding"],
        num_classes=cfg.get("num_class_embeds"),
        **extra,
    )


# diffusers name -> fastdiff name, applied in order
_RENAMES = [
    (r"^time_embedding\.", "time_embed."),
    (r"^class_embedding\.", "class_embed."),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res."),
    (r"^(down|up)_blocks\.(\d+)\.attentions\.", r"\1.\2.attn."),
    (r"^(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.", r"\1.\2.resample."),
    (r"^mid_block\.resnets\.0\.", "mid.res1."),
    (r"^mid_block\.resnets\.1\.", "mid.res2."),
    (r"^mid_block\.attentions\.0\.", "mid.attn."),
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_out\.0\.", ".out."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj."),
    (r"\.ff\.net\.2\.", ".ff.out."),
]
_QKV = re.compile(r"^(.*)\.to_([qkv])\.(weight|bias)$")


def state_dict_from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename diffusers' keys to fastdiff's, fuse q/k/v (self-attention) and k/v
    (cross-attention) projections, and turn 1x1 conv projections into linear weights."""
    out, qkv = {}, {}
    for key, value in state.items():
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        if re.search(r"\.proj_(in|out)\.weight$", key) and value.dim() == 4:
            value = value[:, :, 0, 0]  # a 1x1 conv is a linear map on the channels
        out[key] = value
    for (prefix, kind), parts in qkv.items():
        if prefix.endswith(".attn2"):  # cross-attention: q from x, k and v from the context
            out[f"{prefix}.q.{kind}"] = parts["q"]
            out[f"{prefix}.kv.{kind}"] = torch.cat([parts["k"], parts["v"]])
        else:
            out[f"{prefix}.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out
