"""Fused ops: each has a PyTorch reference (its definition) and faster backends."""

from fastdiff.ops._dispatch import Backend, Op, use
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu

__all__ = ["Backend", "Op", "attention", "group_norm_silu", "use"]
